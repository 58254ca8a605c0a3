//! Sandbox lifecycle: restore, create, pause, snapshot, delete, exec, policy
//! updates, timeouts, quotas, and re-adoption after a daemon restart.
//!
//! The record map is guarded by one mutex that is never held across a runtime
//! call; a sandbox's state (`Starting`, `Deleting`, …) keeps concurrent
//! operations on it apart.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tollgate_proxy::policy::{FieldError, NetworkPolicy};

use crate::config::Config;
use crate::dataplane::{Dataplane, DataplaneError};
use crate::events::NetEvent;
use crate::model::{new_id, now, SandboxRecord, SnapshotRecord, State};
use crate::net::{self, NetPlan};
use crate::runtime::{
    ExecOutput, ExecRequest, MemoryImage, Runtime, RuntimeError, RuntimeHandle, SandboxSpec,
    Template,
};
use crate::store::{Store, StoreError};
use crate::validate::{CreateRequest, ExecRequestBody, RestoreRequest, SnapshotRequest};

/// Disk size reported for every sandbox of the netns runtime (MiB).
pub const DISK_MIB: u32 = 10240;

/// Why an operation failed; the variant picks the HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Request fields are invalid (400).
    #[error("invalid request")]
    Invalid(Vec<FieldError>),
    /// No such object for this organization (404).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The object exists but is in a state that forbids the operation (409).
    #[error("{0}")]
    Conflict(String),
    /// The organization's live-sandbox limit is reached (429).
    #[error("organization sandbox limit reached ({0} live sandboxes)")]
    OrgLimit(u32),
    /// The host has no room for the requested compute (503).
    #[error("no runner capacity: {0}")]
    Capacity(String),
    /// The runtime failed (500; a snapshot the runtime cannot use is a
    /// [`ServiceError::Conflict`], see [`ServiceError::from_runtime`]).
    #[error("runtime: {0}")]
    Runtime(#[from] RuntimeError),
    /// The store failed (500).
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The data plane (eBPF filter, listeners) failed (500).
    #[error("data plane: {0}")]
    Dataplane(#[from] DataplaneError),
}

impl ServiceError {
    /// A runtime failure: 409 when the runtime cannot use what it was given
    /// (a snapshot whose files are gone, or of a backend this host lacks),
    /// else 500.
    pub fn from_runtime(e: RuntimeError) -> Self {
        match e {
            RuntimeError::Unusable(m) => ServiceError::Conflict(m),
            other => ServiceError::Runtime(other),
        }
    }
}

/// An organization as the service knows it.
#[derive(Clone, Debug)]
pub struct Org {
    /// Name.
    pub name: String,
    /// Live-sandbox limit.
    pub max_sandboxes: u32,
}

struct Inner {
    sandboxes: HashMap<String, SandboxRecord>,
    snapshots: HashMap<String, SnapshotRecord>,
    slots: BTreeSet<u32>,
}

/// The lifecycle service.
pub struct Service<R: Runtime> {
    cfg: Config,
    orgs: HashMap<String, Org>,
    templates: HashMap<String, Template>,
    store: Store,
    runtime: R,
    dataplane: Arc<Dataplane>,
    inner: Mutex<Inner>,
    /// Serialises policy updates so the data plane and the store agree.
    policy_updates: tokio::sync::Mutex<()>,
}

impl<R: Runtime> Service<R> {
    /// Loads the store and re-adopts what is still running. Sandboxes whose
    /// process is gone are kept, reported as `deleted` with a `status_reason`,
    /// and their leftovers are released.
    pub async fn open(
        cfg: Config,
        orgs: Vec<Org>,
        runtime: R,
        dataplane: Arc<Dataplane>,
    ) -> anyhow::Result<Arc<Self>> {
        let store = Store::open(&cfg.state_dir)?;
        let templates = cfg
            .templates()
            .into_iter()
            .map(|t| (t.name.clone(), t))
            .collect();
        let mut sandboxes = HashMap::new();
        let mut slots = BTreeSet::new();
        for mut r in store.sandboxes()? {
            match r.state {
                State::Deleted => {}
                State::Deleting => {
                    if let Some(h) = &r.runtime {
                        if let Err(e) = stop_and_teardown(&runtime, &dataplane, &r.id, h).await {
                            tracing::warn!(sandbox = %r.id, error = %e, "cannot finish a deletion");
                            r.status_reason = Some(format!("deletion failed: {e}"));
                            store.put_sandbox(&r)?;
                            slots.insert(r.slot);
                            sandboxes.insert(r.id.clone(), r);
                            continue;
                        }
                    }
                    store.delete_sandbox(&r.id)?;
                    continue;
                }
                _ => {
                    let alive = r.runtime.as_ref().is_some_and(|h| runtime.is_alive(h));
                    if alive {
                        if r.state == State::Snapshotting || r.state == State::Unpausing {
                            r.state = State::Running;
                        }
                        tracing::info!(sandbox = %r.id, state = r.state.as_str(), "re-adopted");
                        if let Some(h) = &r.runtime {
                            match dataplane.adopt(&r.id, &h.network, &r.network_policy).await {
                                Ok(()) => {
                                    r.status_reason = None;
                                    // The guest's bundle matches the CA the
                                    // proxy uses (a replaced CA included).
                                    if let Some(pem) = dataplane.ca_pem(&r.id) {
                                        if let Err(e) = runtime.install_ca(&r.id, h, &pem).await {
                                            tracing::warn!(sandbox = %r.id, error = %e, "cannot reinstall the sandbox's CA bundle");
                                        }
                                    }
                                }
                                Err(e) => {
                                    // The pinned filter keeps enforcing; without
                                    // listeners TCP is dropped (fail closed).
                                    tracing::error!(sandbox = %r.id, error = %e, "cannot re-adopt the data plane");
                                    r.status_reason =
                                        Some(format!("data plane not re-adopted: {e}"));
                                }
                            }
                        }
                    } else {
                        let released = match &r.runtime {
                            Some(h) => stop_and_teardown(&runtime, &dataplane, &r.id, h).await,
                            None => {
                                release_and_teardown(&runtime, &dataplane, &cfg, &r.id, r.slot)
                                    .await
                            }
                        };
                        if let Err(e) = released {
                            tracing::warn!(sandbox = %r.id, error = %e, "cannot release a lost sandbox");
                        }
                        tracing::warn!(sandbox = %r.id, "lost: its process did not survive the daemon restart");
                        r.status_reason = Some(format!(
                            "lost: its process was gone when the daemon restarted (was {})",
                            r.state.as_str()
                        ));
                        r.state = State::Deleted;
                        r.state_changed_at = now();
                        r.runtime = None;
                    }
                    store.put_sandbox(&r)?;
                }
            }
            if r.state.is_live() {
                slots.insert(r.slot);
            }
            sandboxes.insert(r.id.clone(), r);
        }
        let snapshots = store
            .snapshots()?
            .into_iter()
            .map(|s| (s.id.clone(), s))
            .collect();
        let orgs = orgs.into_iter().map(|o| (o.name.clone(), o)).collect();
        Ok(Arc::new(Self {
            cfg,
            orgs,
            templates,
            store,
            runtime,
            dataplane,
            policy_updates: tokio::sync::Mutex::new(()),
            inner: Mutex::new(Inner {
                sandboxes,
                snapshots,
                slots,
            }),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The daemon's configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Paths a sandbox must never see.
    pub fn hidden_paths(&self) -> Vec<PathBuf> {
        vec![self.cfg.state_dir.clone()]
    }

    // === sandboxes ===

    /// `POST /v1/snapshot/resume` and `/v1/snapshot/restore`.
    pub async fn restore(
        &self,
        org: &str,
        req: RestoreRequest,
    ) -> Result<SandboxRecord, ServiceError> {
        let snap = {
            let inner = self.lock();
            inner
                .snapshots
                .values()
                .find(|s| {
                    s.org == org && (s.name == req.snapshot_name || s.id == req.snapshot_name)
                })
                .cloned()
                .ok_or(ServiceError::NotFound("snapshot"))?
        };
        let template = self
            .templates
            .get(&snap.template_id)
            .cloned()
            .ok_or_else(|| {
                ServiceError::Conflict(format!(
                    "the snapshot's template {:?} is not available on this host",
                    snap.template_id
                ))
            })?;
        let policy = req
            .network_policy
            .unwrap_or_else(|| snap.network_policy.clone());
        self.launch(
            org,
            template,
            snap.vcpu,
            snap.memory_mib,
            snap.env_vars.clone(),
            policy,
            req.timeout_secs,
            req.auto_pause,
            Some(snap.id),
            snap.memory.clone(),
        )
        .await
    }

    /// `POST /v1/sandbox`.
    pub async fn create(
        &self,
        org: &str,
        req: CreateRequest,
    ) -> Result<SandboxRecord, ServiceError> {
        let template = self
            .templates
            .get(&req.template_name)
            .cloned()
            .ok_or_else(|| {
                ServiceError::Invalid(vec![FieldError {
                    field: "template_name".into(),
                    error: format!("no template named {:?} on this host", req.template_name),
                }])
            })?;
        let policy = req.network_policy.unwrap_or_else(NetworkPolicy::allow_all);
        self.launch(
            org,
            template,
            req.vcpu,
            req.memory_mib,
            req.env_vars,
            policy,
            req.timeout_secs,
            req.auto_pause,
            None,
            None,
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn launch(
        &self,
        org: &str,
        template: Template,
        vcpu: u32,
        memory_mib: u32,
        env_vars: std::collections::BTreeMap<String, String>,
        network_policy: NetworkPolicy,
        timeout_secs: u64,
        auto_pause: bool,
        snapshot_id: Option<String>,
        image: Option<MemoryImage>,
    ) -> Result<SandboxRecord, ServiceError> {
        let max = self.orgs.get(org).map_or(0, |o| o.max_sandboxes);
        let record = {
            let mut inner = self.lock();
            let live = inner
                .sandboxes
                .values()
                .filter(|s| s.org == org && s.state.is_live())
                .count();
            if live as u32 >= max {
                return Err(ServiceError::OrgLimit(max));
            }
            let (used_cpu, used_mem) = inner
                .sandboxes
                .values()
                .filter(|s| s.state.is_live())
                .fold((0u64, 0u64), |(c, m), s| {
                    (c + u64::from(s.vcpu), m + u64::from(s.memory_mib))
                });
            let host = &self.cfg.host;
            if used_cpu + u64::from(vcpu) > u64::from(host.vcpu)
                || used_mem + u64::from(memory_mib) > host.memory_mib
            {
                return Err(ServiceError::Capacity(format!(
                    "needs {vcpu} vCPU / {memory_mib} MiB; host has {} vCPU / {} MiB free",
                    u64::from(host.vcpu).saturating_sub(used_cpu),
                    host.memory_mib.saturating_sub(used_mem)
                )));
            }
            let capacity = self.slot_capacity();
            let slot = (0..capacity)
                .find(|s| !inner.slots.contains(s))
                .ok_or_else(|| ServiceError::Capacity("the address pool is exhausted".into()))?;
            let t = now();
            let r = SandboxRecord {
                id: new_id("sbx-"),
                org: org.to_string(),
                template_id: template.name.clone(),
                vcpu,
                memory_mib,
                disk_mib: DISK_MIB,
                timeout_secs,
                auto_pause,
                env_vars,
                network_policy,
                state: State::Starting,
                status_reason: None,
                created_at: t,
                state_changed_at: t,
                timeout_at: t.saturating_add(timeout_secs as i64),
                slot,
                uid: self.cfg.network.uid_base.saturating_add(slot),
                snapshot_id,
                runtime: None,
            };
            self.store.put_sandbox(&r)?;
            inner.slots.insert(slot);
            inner.sandboxes.insert(r.id.clone(), r.clone());
            r
        };
        let spec = SandboxSpec {
            id: record.id.clone(),
            slot: record.slot,
            template,
            env_vars: record.env_vars.clone(),
            uid: record.uid,
            vcpu,
            memory_mib,
            ca_pem: None,
            image,
        };
        let t0 = std::time::Instant::now();
        let mut phases = (0.0, 0.0);
        let started = async {
            // The runtime gets ready (a VM's QEMU starts, waiting for its
            // memory) while the network and its enforcement are built.
            let network_and_enforcement = async {
                let network = net::setup(&self.net_plan(), &spec.id, spec.slot)
                    .await
                    .map_err(RuntimeError::from)?;
                let network_ms = t0.elapsed().as_secs_f64() * 1e3;
                // Enforcement is in place before the sandbox's first process
                // runs. So is the sandbox's CA, which the runtime makes the
                // guest trust.
                match self
                    .dataplane
                    .attach(&spec.id, &network, &record.network_policy)
                    .await
                {
                    Ok(()) => Ok((network, network_ms)),
                    Err(e) => {
                        self.undo_network(&spec.id, &network).await;
                        Err(ServiceError::from(e))
                    }
                }
            };
            let (built, prepared) =
                tokio::join!(network_and_enforcement, self.runtime.prepare(&spec));
            let (network, network_ms) = match (built, prepared) {
                (Ok(b), Ok(())) => b,
                (Ok((network, _)), Err(e)) => {
                    self.undo_network(&spec.id, &network).await;
                    self.release_prepared(&spec.id, spec.slot).await;
                    return Err(ServiceError::from_runtime(e));
                }
                (Err(e), _) => {
                    self.release_prepared(&spec.id, spec.slot).await;
                    return Err(e);
                }
            };
            phases = (network_ms, t0.elapsed().as_secs_f64() * 1e3);
            let spec = SandboxSpec {
                ca_pem: self.dataplane.ca_pem(&spec.id),
                ..spec.clone()
            };
            let started = self
                .runtime
                .start(&spec, &network)
                .await
                .map_err(ServiceError::from_runtime);
            if started.is_err() {
                self.undo_network(&spec.id, &network).await;
            }
            started
        }
        .await;
        match started {
            Ok(handle) => {
                let mut inner = self.lock();
                let r = inner
                    .sandboxes
                    .get_mut(&record.id)
                    .ok_or(ServiceError::NotFound("sandbox"))?;
                r.runtime = Some(handle);
                r.state = State::Running;
                r.state_changed_at = now();
                self.store.put_sandbox(r)?;
                tracing::info!(sandbox = %r.id, org, slot = r.slot, network_ms = phases.0,
                    dataplane_ms = phases.1 - phases.0, total_ms = t0.elapsed().as_secs_f64() * 1e3,
                    "sandbox running");
                Ok(r.clone())
            }
            Err(e) => {
                tracing::warn!(sandbox = %record.id, error = %e, "start failed; released");
                let mut inner = self.lock();
                inner.sandboxes.remove(&record.id);
                inner.slots.remove(&record.slot);
                self.store.delete_sandbox(&record.id)?;
                Err(e)
            }
        }
    }

    /// A failed start: detaches the data plane and removes the network.
    async fn undo_network(&self, id: &str, network: &net::NetworkInfo) {
        if let Err(e) = self.dataplane.detach(id).await {
            tracing::warn!(sandbox = %id, error = %e, "failed start: data plane detach");
        }
        if let Err(te) = net::teardown(network).await {
            tracing::warn!(sandbox = %id, error = %te, "failed start: network teardown");
        }
    }

    /// A failed start: releases what [`Runtime::prepare`] started.
    async fn release_prepared(&self, id: &str, slot: u32) {
        if let Err(e) = self.runtime.release(id, slot).await {
            tracing::warn!(sandbox = %id, error = %e, "failed start: runtime release");
        }
    }

    /// Where the memory image of snapshot `id` is kept.
    fn snapshot_dir(&self, id: &str) -> PathBuf {
        self.cfg.state_dir.join("snapshots").join(id)
    }

    fn slot_capacity(&self) -> u32 {
        self.net_plan().capacity()
    }

    /// The per-sandbox network plan of this daemon.
    fn net_plan(&self) -> NetPlan {
        NetPlan::from(&self.cfg.network)
    }

    /// One sandbox of `org`.
    pub fn get(&self, org: &str, id: &str) -> Result<SandboxRecord, ServiceError> {
        let inner = self.lock();
        inner
            .sandboxes
            .get(id)
            .filter(|r| r.org == org)
            .cloned()
            .ok_or(ServiceError::NotFound("sandbox"))
    }

    /// Every sandbox of `org`.
    pub fn list(&self, org: &str) -> Vec<SandboxRecord> {
        self.lock()
            .sandboxes
            .values()
            .filter(|r| r.org == org)
            .cloned()
            .collect()
    }

    /// Moves a sandbox from one of `from` states to `to`, returning the record
    /// as it was.
    fn transition(
        &self,
        org: &str,
        id: &str,
        from: &[State],
        to: State,
    ) -> Result<SandboxRecord, ServiceError> {
        let mut inner = self.lock();
        let r = inner
            .sandboxes
            .get_mut(id)
            .filter(|r| r.org == org)
            .ok_or(ServiceError::NotFound("sandbox"))?;
        if !from.contains(&r.state) {
            return Err(ServiceError::Conflict(format!(
                "sandbox is {}",
                r.state.as_str()
            )));
        }
        let before = r.clone();
        r.state = to;
        r.state_changed_at = now();
        self.store.put_sandbox(r)?;
        Ok(before)
    }

    fn set_state(&self, id: &str, state: State) -> Result<SandboxRecord, ServiceError> {
        let mut inner = self.lock();
        let r = inner
            .sandboxes
            .get_mut(id)
            .ok_or(ServiceError::NotFound("sandbox"))?;
        r.state = state;
        r.state_changed_at = now();
        self.store.put_sandbox(r)?;
        Ok(r.clone())
    }

    /// `DELETE /v1/sandbox/{id}/`: kills the sandbox and releases its network.
    pub async fn delete(&self, org: &str, id: &str) -> Result<(), ServiceError> {
        let before = self.transition(
            org,
            id,
            &[
                State::Running,
                State::Paused,
                State::Deleted,
                State::Deleting,
            ],
            State::Deleting,
        )?;
        if let Some(h) = &before.runtime {
            if let Err(e) = stop_and_teardown(&self.runtime, &self.dataplane, id, h).await {
                let mut inner = self.lock();
                if let Some(r) = inner.sandboxes.get_mut(id) {
                    r.status_reason = Some(format!("deletion failed: {e}"));
                    self.store.put_sandbox(r)?;
                }
                return Err(e);
            }
        }
        let mut inner = self.lock();
        if let Some(r) = inner.sandboxes.remove(id) {
            inner.slots.remove(&r.slot);
        }
        self.store.delete_sandbox(id)?;
        self.dataplane.events().remove(id);
        tracing::info!(sandbox = %id, org, "sandbox deleted");
        Ok(())
    }

    /// `POST /v1/sandbox/{id}/pause`: freezes the sandbox (idempotent).
    pub async fn pause(&self, org: &str, id: &str) -> Result<SandboxRecord, ServiceError> {
        let current = self.get(org, id)?;
        if current.state == State::Paused {
            return Ok(current);
        }
        let before = self.transition(org, id, &[State::Running], State::Paused)?;
        if let Some(h) = &before.runtime {
            if let Err(e) = self.runtime.pause(h).await {
                self.set_state(id, State::Running)?;
                return Err(e.into());
            }
        }
        tracing::info!(sandbox = %id, org, "sandbox paused");
        self.get(org, id)
    }

    /// Thaws a paused sandbox.
    pub async fn resume_paused(&self, org: &str, id: &str) -> Result<SandboxRecord, ServiceError> {
        let current = self.get(org, id)?;
        if current.state == State::Running {
            return Ok(current);
        }
        let before = self.transition(org, id, &[State::Paused], State::Unpausing)?;
        if let Some(h) = &before.runtime {
            if let Err(e) = self.runtime.resume(h).await {
                self.set_state(id, State::Paused)?;
                return Err(e.into());
            }
        }
        self.set_state(id, State::Running)
    }

    /// `POST /v1/sandbox/{id}/snapshot/create`.
    pub async fn snapshot(
        &self,
        org: &str,
        id: &str,
        req: SnapshotRequest,
    ) -> Result<SnapshotRecord, ServiceError> {
        let name = req.name.unwrap_or_else(|| new_id("snap-"));
        {
            let inner = self.lock();
            if inner
                .snapshots
                .values()
                .any(|s| s.org == org && s.name == name)
            {
                return Err(ServiceError::Conflict(format!(
                    "a snapshot named {name:?} already exists"
                )));
            }
        }
        let before = self.transition(
            org,
            id,
            &[State::Running, State::Paused],
            State::Snapshotting,
        )?;
        let snap_id = new_id("snp-");
        let dir = self.snapshot_dir(&snap_id);
        let memory = match &before.runtime {
            Some(h) => match self.runtime.snapshot(h, &dir).await {
                Ok(m) => m,
                Err(e) => {
                    self.set_state(id, before.state)?;
                    return Err(ServiceError::from_runtime(e));
                }
            },
            None => None,
        };
        let snap = SnapshotRecord {
            id: snap_id,
            name,
            org: org.to_string(),
            template_id: before.template_id.clone(),
            vcpu: before.vcpu,
            memory_mib: before.memory_mib,
            disk_mib: before.disk_mib,
            env_vars: before.env_vars.clone(),
            network_policy: before.network_policy.clone(),
            source_sandbox: before.id.clone(),
            created_at: now(),
            memory,
        };
        let stored = {
            let mut inner = self.lock();
            if inner
                .snapshots
                .values()
                .any(|s| s.org == org && s.name == snap.name)
            {
                Err(ServiceError::Conflict(format!(
                    "a snapshot named {:?} already exists",
                    snap.name
                )))
            } else {
                self.store
                    .put_snapshot(&snap)
                    .map(|()| {
                        inner.snapshots.insert(snap.id.clone(), snap.clone());
                    })
                    .map_err(ServiceError::from)
            }
        };
        self.set_state(id, before.state)?;
        if stored.is_err() {
            remove_snapshot_files(&dir);
        }
        stored?;
        tracing::info!(sandbox = %id, snapshot = %snap.id, org, "snapshot stored");
        if req.kill_sandbox_after {
            self.delete(org, id).await?;
        }
        Ok(snap)
    }

    /// `PUT /v1/sandbox/{id}/network_policy`: the data plane switches to the
    /// new policy atomically, then it is stored. A failure leaves both at the
    /// old policy.
    pub async fn set_policy(
        &self,
        org: &str,
        id: &str,
        policy: NetworkPolicy,
    ) -> Result<SandboxRecord, ServiceError> {
        let _serial = self.policy_updates.lock().await;
        let current = self.get(org, id)?;
        if !current.state.is_live()
            || current.state == State::Deleting
            || current.state == State::Starting
        {
            return Err(ServiceError::Conflict(format!(
                "sandbox is {}",
                current.state.as_str()
            )));
        }
        if current.runtime.is_some() {
            self.dataplane.set_policy(id, &policy).await?;
        }
        let stored = {
            let mut inner = self.lock();
            let r = inner
                .sandboxes
                .get_mut(id)
                .ok_or(ServiceError::NotFound("sandbox"))?;
            let mut updated = r.clone();
            updated.network_policy = policy;
            self.store.put_sandbox(&updated).map(|()| {
                *r = updated.clone();
                updated
            })
        };
        match stored {
            Ok(updated) => {
                tracing::info!(sandbox = %id, org, mode = ?updated.network_policy.mode, "network policy updated");
                Ok(updated)
            }
            Err(e) => {
                // Keep the data plane and the record in agreement.
                if current.runtime.is_some() {
                    if let Err(de) = self.dataplane.set_policy(id, &current.network_policy).await {
                        tracing::error!(sandbox = %id, error = %de, "cannot restore the old policy after a store failure");
                    }
                }
                Err(e.into())
            }
        }
    }

    /// The sandbox's newest network events (`seq > after`, at most `limit`).
    pub fn network_events(
        &self,
        org: &str,
        id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<NetEvent>, ServiceError> {
        self.get(org, id)?;
        Ok(self.dataplane.events().list(id, after, limit))
    }

    /// `GET /v1/sandbox/{id}/ca.pem`: the sandbox's CA certificate (PEM),
    /// never its key. 409 for a sandbox that no longer has one (deleted).
    pub fn ca_pem(&self, org: &str, id: &str) -> Result<String, ServiceError> {
        let r = self.get(org, id)?;
        if r.state == State::Deleted {
            return Err(ServiceError::Conflict(format!(
                "sandbox is {}",
                r.state.as_str()
            )));
        }
        self.dataplane
            .ca_pem(id)
            .ok_or_else(|| ServiceError::Conflict("sandbox has no CA".into()))
    }

    /// Packets per eBPF verdict since the sandbox's filter was attached.
    pub fn network_counters(
        &self,
        org: &str,
        id: &str,
    ) -> Result<std::collections::BTreeMap<String, u64>, ServiceError> {
        let r = self.get(org, id)?;
        if r.runtime.is_none() {
            return Err(ServiceError::Conflict(format!(
                "sandbox is {}",
                r.state.as_str()
            )));
        }
        Ok(self.dataplane.counters(id)?)
    }

    /// `POST /v1/sandbox/{id}/process/execute`.
    pub async fn exec(
        &self,
        org: &str,
        id: &str,
        body: ExecRequestBody,
    ) -> Result<ExecOutput, ServiceError> {
        let r = self.get(org, id)?;
        if r.state != State::Running {
            return Err(ServiceError::Conflict(format!(
                "sandbox is {}",
                r.state.as_str()
            )));
        }
        let handle = r.runtime.ok_or(RuntimeError::NotRunning)?;
        let req = ExecRequest {
            argv: body.argv,
            env: body.envs,
            cwd: body.cwd.map(PathBuf::from),
            timeout: Duration::from_secs(body.timeout_secs),
        };
        Ok(self.runtime.exec(&handle, req).await?)
    }

    // === snapshots ===

    /// Every snapshot of `org`.
    pub fn snapshots(&self, org: &str) -> Vec<SnapshotRecord> {
        self.lock()
            .snapshots
            .values()
            .filter(|s| s.org == org)
            .cloned()
            .collect()
    }

    /// `DELETE /v1/snapshot/{id}` (by id or name).
    pub fn delete_snapshot(&self, org: &str, id: &str) -> Result<(), ServiceError> {
        let mut inner = self.lock();
        let key = inner
            .snapshots
            .values()
            .find(|s| s.org == org && (s.id == id || s.name == id))
            .map(|s| s.id.clone())
            .ok_or(ServiceError::NotFound("snapshot"))?;
        self.store.delete_snapshot(&key)?;
        inner.snapshots.remove(&key);
        drop(inner);
        // Running clones keep their private mapping of the RAM file.
        remove_snapshot_files(&self.snapshot_dir(&key));
        Ok(())
    }

    // === dead sandboxes ===

    /// Finds running or paused sandboxes whose process (the netns
    /// supervisor, the VM's QEMU) died, releases what they held (network,
    /// data plane, runtime files) and reports them `deleted` with a
    /// `status_reason`. Called periodically by the daemon.
    pub async fn reap_dead(&self) {
        let candidates: Vec<SandboxRecord> = self
            .lock()
            .sandboxes
            .values()
            .filter(|r| matches!(r.state, State::Running | State::Paused))
            .filter(|r| {
                r.runtime
                    .as_ref()
                    .is_some_and(|h| !self.runtime.is_alive(h))
            })
            .cloned()
            .collect();
        for r in candidates {
            let Some(h) = r.runtime.clone() else { continue };
            // Claim it: a concurrent delete or snapshot wins.
            if self
                .transition(
                    &r.org,
                    &r.id,
                    &[State::Running, State::Paused],
                    State::Deleting,
                )
                .is_err()
            {
                continue;
            }
            let what = if h.backend == crate::runtime::vm::BACKEND {
                format!("its VM (QEMU pid {}) exited", h.pid)
            } else {
                format!("its process (pid {}) exited", h.pid)
            };
            tracing::warn!(sandbox = %r.id, reason = %what, "sandbox died; releasing it");
            let released = stop_and_teardown(&self.runtime, &self.dataplane, &r.id, &h).await;
            let mut inner = self.lock();
            let Some(rec) = inner.sandboxes.get_mut(&r.id) else {
                continue;
            };
            match released {
                Ok(()) => {
                    rec.state = State::Deleted;
                    rec.runtime = None;
                    rec.status_reason = Some(format!("lost: {what} (was {})", r.state.as_str()));
                }
                Err(e) => {
                    rec.status_reason = Some(format!("lost: {what}; release failed: {e}"));
                }
            }
            rec.state_changed_at = now();
            if let Err(e) = self.store.put_sandbox(rec) {
                tracing::error!(sandbox = %r.id, error = %e, "cannot store a dead sandbox");
            }
            if rec.state == State::Deleted {
                let slot = rec.slot;
                inner.slots.remove(&slot);
            }
        }
    }

    // === timeouts ===

    /// Acts on every sandbox whose timeout has passed: pause if `auto_pause`,
    /// else delete. Called periodically by the daemon.
    pub async fn expire(&self) {
        let t = now();
        let due: Vec<SandboxRecord> = self
            .lock()
            .sandboxes
            .values()
            .filter(|r| r.timeout_at <= t && r.state == State::Running)
            .cloned()
            .collect();
        for r in due {
            let result = if r.auto_pause {
                self.pause(&r.org, &r.id).await.map(|_| ())
            } else {
                self.delete(&r.org, &r.id).await
            };
            match result {
                Ok(()) => {
                    tracing::info!(sandbox = %r.id, auto_pause = r.auto_pause, "timeout reached")
                }
                Err(e) => tracing::warn!(sandbox = %r.id, error = %e, "timeout action failed"),
            }
        }
    }
}

/// Stops a sandbox's processes, detaches its data plane, then removes its
/// network.
async fn stop_and_teardown<R: Runtime>(
    runtime: &R,
    dataplane: &Dataplane,
    id: &str,
    h: &RuntimeHandle,
) -> Result<(), ServiceError> {
    runtime.stop(h).await?;
    dataplane.detach(id).await?;
    net::teardown(&h.network)
        .await
        .map_err(RuntimeError::from)?;
    Ok(())
}

/// Releases what an interrupted start of sandbox `id` on `slot` left behind
/// (processes, then network), without a runtime handle.
async fn release_and_teardown<R: Runtime>(
    runtime: &R,
    dataplane: &Dataplane,
    cfg: &Config,
    id: &str,
    slot: u32,
) -> Result<(), ServiceError> {
    runtime.release(id, slot).await?;
    dataplane.detach(id).await?;
    let info = net::info_for(&NetPlan::from(&cfg.network), id, slot).map_err(RuntimeError::from)?;
    net::teardown(&info).await.map_err(RuntimeError::from)?;
    Ok(())
}

/// Removes a snapshot's memory image directory (best effort: a failure is
/// logged, the record is already gone or never stored).
fn remove_snapshot_files(dir: &std::path::Path) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot remove a snapshot's files")
        }
    }
}
