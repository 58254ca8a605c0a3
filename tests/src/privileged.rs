//! Helpers for tests that need root, namespaces or eBPF (STUB: being implemented).
