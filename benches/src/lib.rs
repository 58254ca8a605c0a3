//! Shared bench harness (scenarios, baselines, summary).
