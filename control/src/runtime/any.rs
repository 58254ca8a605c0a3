//! The daemon's runtime: the `netns` backend always, the `vm` backend where
//! QEMU and the guest are installed. New sandboxes go to the configured
//! default; every other call goes to the backend named in the sandbox's
//! handle, so sandboxes of either backend survive a change of default
//! across a restart.

use std::path::Path;

use super::netns::{self, NetnsRuntime};
use super::vm::{self, VmRuntime};
use super::{
    ExecOutput, ExecRequest, MemoryImage, NetworkInfo, Runtime, RuntimeError, RuntimeHandle,
    SandboxSpec,
};

/// Which backend new sandboxes get.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Processes in namespaces.
    Netns,
    /// QEMU microVMs.
    Vm,
}

impl Backend {
    /// The backend's name (as in [`RuntimeHandle::backend`]).
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Netns => netns::BACKEND,
            Backend::Vm => vm::BACKEND,
        }
    }
}

/// Both backends behind one [`Runtime`].
pub struct Runtimes {
    netns: NetnsRuntime,
    vm: Option<VmRuntime>,
    default: Backend,
}

impl Runtimes {
    /// `default` must be `Netns` unless `vm` is given.
    pub fn new(netns: NetnsRuntime, vm: Option<VmRuntime>, default: Backend) -> Self {
        let default = if vm.is_none() {
            Backend::Netns
        } else {
            default
        };
        Self { netns, vm, default }
    }

    /// The backend new sandboxes get.
    pub fn default_backend(&self) -> Backend {
        self.default
    }

    fn vm(&self) -> Result<&VmRuntime, RuntimeError> {
        self.vm.as_ref().ok_or_else(|| {
            RuntimeError::Unusable(
                "the vm runtime is not available on this host (QEMU or the guest image is missing)"
                    .into(),
            )
        })
    }

    /// A memory image is restored by the backend that took it; anything
    /// else starts on the default.
    fn wants_vm(&self, spec: &SandboxSpec) -> bool {
        match &spec.image {
            Some(image) => image.backend == vm::BACKEND,
            None => self.default == Backend::Vm,
        }
    }

    fn is_vm(handle: &RuntimeHandle) -> bool {
        handle.backend == vm::BACKEND
    }
}

impl Runtime for Runtimes {
    async fn start(
        &self,
        spec: &SandboxSpec,
        net: &NetworkInfo,
    ) -> Result<RuntimeHandle, RuntimeError> {
        if self.wants_vm(spec) {
            self.vm()?.start(spec, net).await
        } else {
            self.netns.start(spec, net).await
        }
    }

    async fn prepare(&self, spec: &SandboxSpec) -> Result<(), RuntimeError> {
        if self.wants_vm(spec) {
            self.vm()?.prepare(spec).await
        } else {
            self.netns.prepare(spec).await
        }
    }

    async fn connect(&self, spec: &SandboxSpec, net: &NetworkInfo) -> Result<(), RuntimeError> {
        if self.wants_vm(spec) {
            self.vm()?.connect(spec, net).await
        } else {
            self.netns.connect(spec, net).await
        }
    }

    fn prepared_alive(&self, id: &str) -> bool {
        self.netns.prepared_alive(id) && self.vm.as_ref().is_none_or(|vm| vm.prepared_alive(id))
    }

    async fn pause(&self, handle: &RuntimeHandle) -> Result<(), RuntimeError> {
        if Self::is_vm(handle) {
            self.vm()?.pause(handle).await
        } else {
            self.netns.pause(handle).await
        }
    }

    async fn resume(&self, handle: &RuntimeHandle) -> Result<(), RuntimeError> {
        if Self::is_vm(handle) {
            self.vm()?.resume(handle).await
        } else {
            self.netns.resume(handle).await
        }
    }

    async fn stop(&self, handle: &RuntimeHandle) -> Result<(), RuntimeError> {
        if Self::is_vm(handle) {
            self.vm()?.stop(handle).await
        } else {
            self.netns.stop(handle).await
        }
    }

    async fn exec(
        &self,
        handle: &RuntimeHandle,
        req: ExecRequest,
    ) -> Result<ExecOutput, RuntimeError> {
        if Self::is_vm(handle) {
            self.vm()?.exec(handle, req).await
        } else {
            self.netns.exec(handle, req).await
        }
    }

    async fn release(&self, id: &str, slot: u32) -> Result<(), RuntimeError> {
        // Without a handle the backend is unknown: release in both.
        self.netns.release(id, slot).await?;
        if let Some(vm) = &self.vm {
            vm.release(id, slot).await?;
        }
        Ok(())
    }

    fn is_alive(&self, handle: &RuntimeHandle) -> bool {
        if Self::is_vm(handle) {
            self.vm.as_ref().is_some_and(|vm| vm.is_alive(handle))
        } else {
            self.netns.is_alive(handle)
        }
    }

    async fn snapshot(
        &self,
        handle: &RuntimeHandle,
        dir: &Path,
    ) -> Result<Option<MemoryImage>, RuntimeError> {
        if Self::is_vm(handle) {
            self.vm()?.snapshot(handle, dir).await
        } else {
            self.netns.snapshot(handle, dir).await
        }
    }

    async fn install_ca(
        &self,
        id: &str,
        handle: &RuntimeHandle,
        ca_pem: &str,
    ) -> Result<(), RuntimeError> {
        if Self::is_vm(handle) {
            self.vm()?.install_ca(id, handle, ca_pem).await
        } else {
            self.netns.install_ca(id, handle, ca_pem).await
        }
    }
}
