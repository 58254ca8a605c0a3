//! tollgate's eBPF layer: TC ingress programs on each sandbox link that enforce the
//! platform floor and `allow_cidrs` and steer TCP to the sandbox's proxy.
//!
//! This crate is a placeholder until the eBPF enforcement work lands; the control
//! plane depends on it so the workspace shape matches `DESIGN.md` from the start.
#![forbid(unsafe_code)]

/// Name of the pinned-object directory under bpffs that this crate will own.
pub const PIN_ROOT: &str = "/sys/fs/bpf/tollgate";
