//! Sandbox lifecycle: restore, create, pause, snapshot, delete, exec, policy
//! updates, timeouts, quotas, and re-adoption after a daemon restart.
//!
//! The record map is guarded by one mutex that is never held across a runtime
//! call; a sandbox's state (`Starting`, `Deleting`, …) keeps concurrent
//! operations on it apart.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tollgate_proxy::policy::{FieldError, NetworkPolicy};

use crate::config::Config;
use crate::dataplane::{Dataplane, DataplaneError};
use crate::events::NetEvent;
use crate::model::{new_id, now, SandboxRecord, SnapshotRecord, State, WarmRecord};
use crate::net::{self, NetPlan};
use crate::runtime::{
    ExecOutput, ExecRequest, MemoryImage, Runtime, RuntimeError, RuntimeHandle, SandboxSpec,
    Template,
};
use crate::store::{Store, StoreError};
use crate::validate::{CreateRequest, ExecRequestBody, RestoreRequest, SnapshotRequest};

/// How long a stopping daemon waits for warm sandboxes being built.
const WARM_BUILD_WAIT: Duration = Duration::from_secs(30);

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
    /// Slots of sandboxes and of warm sandboxes (ready or being built).
    slots: BTreeSet<u32>,
    /// Warm sandboxes ready to be taken, least recently built first.
    warm: Vec<WarmEntry>,
    /// Keys of warm sandboxes being built.
    warming: HashSet<WarmKey>,
}

/// What a warm sandbox was built for: a launch with the same key takes it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct WarmKey {
    template: String,
    /// The memory image's directory (none: the template's own).
    image: Option<PathBuf>,
    vcpu: u32,
    memory_mib: u32,
}

/// A sandbox built ahead of its request: network, deny-all enforcement, CA,
/// and the runtime's preparation (a QEMU waiting for its memory, its tap on
/// the wire). A launch with its key takes it; the rest of the request (org,
/// policy, environment) is applied then.
struct WarmEntry {
    id: String,
    slot: u32,
    key: WarmKey,
    network: net::NetworkInfo,
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
    /// How many warm sandboxes to keep (`[runtime] warm`).
    warm_size: usize,
    /// Set when the daemon stops: no more warm sandboxes.
    closing: AtomicBool,
    /// This service, for background work.
    me: Weak<Self>,
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
        // Warm sandboxes of the previous run were never handed out: release them.
        for w in store.warm()? {
            if !sandboxes.contains_key(&w.id) {
                match release_and_teardown(&runtime, &dataplane, &cfg, &w.id, w.slot).await {
                    Ok(()) => {
                        tracing::info!(sandbox = %w.id, slot = w.slot, "released a warm sandbox of the previous run")
                    }
                    Err(e) => {
                        tracing::warn!(sandbox = %w.id, error = %e, "cannot release a warm sandbox of the previous run");
                        continue;
                    }
                }
            }
            store.delete_warm(&w.id)?;
        }
        reclaim_leftovers(&dataplane, &cfg, &sandboxes).await;
        let snapshots = store
            .snapshots()?
            .into_iter()
            .map(|s| (s.id.clone(), s))
            .collect();
        let orgs = orgs.into_iter().map(|o| (o.name.clone(), o)).collect();
        let warm_size = cfg.runtime.warm.unwrap_or(0) as usize;
        Ok(Arc::new_cyclic(|me| Self {
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
                warm: Vec::new(),
                warming: HashSet::new(),
            }),
            warm_size,
            closing: AtomicBool::new(false),
            me: me.clone(),
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
        let key = WarmKey {
            template: template.name.clone(),
            image: image.as_ref().map(|i| i.dir.clone()),
            vcpu,
            memory_mib,
        };
        let max = self.orgs.get(org).map_or(0, |o| o.max_sandboxes);
        let t0 = std::time::Instant::now();
        // At most twice: a second pass after a warm sandbox gave up its slot.
        let mut attempt = 0;
        let (record, warm) = loop {
            attempt += 1;
            let evicted = {
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
                let warm = inner
                    .warm
                    .iter()
                    .position(|w| w.key == key)
                    .map(|i| inner.warm.remove(i));
                let slot = match &warm {
                    Some(w) => Some(w.slot),
                    None => self.free_slot(&inner),
                };
                match slot {
                    Some(slot) => {
                        let t = now();
                        let r = SandboxRecord {
                            id: warm
                                .as_ref()
                                .map_or_else(|| new_id("sbx-"), |w| w.id.clone()),
                            org: org.to_string(),
                            template_id: template.name.clone(),
                            vcpu,
                            memory_mib,
                            disk_mib: DISK_MIB,
                            timeout_secs,
                            auto_pause,
                            env_vars: env_vars.clone(),
                            network_policy: network_policy.clone(),
                            state: State::Starting,
                            status_reason: None,
                            created_at: t,
                            state_changed_at: t,
                            timeout_at: t.saturating_add(timeout_secs as i64),
                            slot,
                            uid: self.cfg.network.uid_base.saturating_add(slot),
                            snapshot_id: snapshot_id.clone(),
                            runtime: None,
                        };
                        let stored = match &warm {
                            Some(_) => self.store.put_sandbox_from_warm(&r),
                            None => self.store.put_sandbox(&r),
                        };
                        if let Err(e) = stored {
                            if let Some(w) = warm {
                                inner.warm.push(w);
                            }
                            return Err(e.into());
                        }
                        inner.slots.insert(slot);
                        inner.sandboxes.insert(r.id.clone(), r.clone());
                        break (r, warm);
                    }
                    None if attempt == 1 && !inner.warm.is_empty() => inner.warm.remove(0),
                    None => {
                        return Err(ServiceError::Capacity(
                            "the address pool is exhausted".into(),
                        ))
                    }
                }
            };
            // The address pool is full: the least recently used warm
            // sandbox gives up its slot.
            tracing::info!(sandbox = %evicted.id, "warm sandbox released: its slot is needed");
            self.release_warm(evicted).await;
        };
        let spec = SandboxSpec {
            id: record.id.clone(),
            slot: record.slot,
            template: template.clone(),
            env_vars: record.env_vars.clone(),
            uid: record.uid,
            vcpu,
            memory_mib,
            ca_pem: None,
            image: image.clone(),
        };
        let was_warm = warm.is_some();
        let mut phases = (0.0, 0.0);
        let started = async {
            let network = match warm {
                // Built ahead, enforcing deny-all: it gets its own policy
                // before its first instruction runs.
                Some(w) => {
                    if let Err(e) = self
                        .dataplane
                        .set_policy(&spec.id, &record.network_policy)
                        .await
                    {
                        self.undo_network(&spec.id, &w.network).await;
                        self.release_prepared(&spec.id, spec.slot).await;
                        return Err(ServiceError::from(e));
                    }
                    phases = (0.0, t0.elapsed().as_secs_f64() * 1e3);
                    w.network
                }
                None => {
                    let (network, network_ms) = self.build(&spec, &record.network_policy).await?;
                    phases = (network_ms, t0.elapsed().as_secs_f64() * 1e3);
                    network
                }
            };
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
                // The next launch like this one finds a warm sandbox.
                self.refill(key, template, image);
                let mut inner = self.lock();
                let r = inner
                    .sandboxes
                    .get_mut(&record.id)
                    .ok_or(ServiceError::NotFound("sandbox"))?;
                r.runtime = Some(handle);
                r.state = State::Running;
                r.state_changed_at = now();
                self.store.put_sandbox(r)?;
                tracing::info!(sandbox = %r.id, org, slot = r.slot, warm = was_warm, network_ms = phases.0,
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

    /// Builds sandbox `spec`'s network and enforcement (`policy`) while the
    /// runtime gets ready (a VM's QEMU starts, waiting for its memory).
    /// Enforcement is in place before the sandbox's first process runs, and
    /// so is its CA, which the runtime makes the guest trust. On failure
    /// nothing is left. Returns the network and when it was up (ms).
    async fn build(
        &self,
        spec: &SandboxSpec,
        policy: &NetworkPolicy,
    ) -> Result<(net::NetworkInfo, f64), ServiceError> {
        let t0 = std::time::Instant::now();
        let network_and_enforcement = async {
            let network = net::setup(&self.net_plan(), &spec.id, spec.slot)
                .await
                .map_err(RuntimeError::from)?;
            let network_ms = t0.elapsed().as_secs_f64() * 1e3;
            match self.dataplane.attach(&spec.id, &network, policy).await {
                Ok(()) => Ok((network, network_ms)),
                Err(e) => {
                    self.undo_network(&spec.id, &network).await;
                    Err(ServiceError::from(e))
                }
            }
        };
        let (built, prepared) = tokio::join!(network_and_enforcement, self.runtime.prepare(spec));
        match (built, prepared) {
            (Ok(b), Ok(())) => Ok(b),
            (Ok((network, _)), Err(e)) => {
                self.undo_network(&spec.id, &network).await;
                self.release_prepared(&spec.id, spec.slot).await;
                Err(ServiceError::from_runtime(e))
            }
            (Err(e), _) => {
                self.release_prepared(&spec.id, spec.slot).await;
                Err(e)
            }
        }
    }

    // === warm sandboxes ===

    /// Makes sure a warm sandbox for `key` exists or is being built, in the
    /// background; the least recently used one makes room when
    /// `[runtime] warm` are there already.
    fn refill(&self, key: WarmKey, template: Template, image: Option<MemoryImage>) {
        if self.warm_size == 0 || self.closing.load(Ordering::Acquire) {
            return;
        }
        let Some(me) = self.me.upgrade() else {
            return;
        };
        let evicted = {
            let mut inner = self.lock();
            if inner.warming.contains(&key) || inner.warm.iter().any(|w| w.key == key) {
                return;
            }
            let full = inner.warm.len() + inner.warming.len() >= self.warm_size;
            if full && inner.warm.is_empty() {
                return;
            }
            inner.warming.insert(key.clone());
            full.then(|| inner.warm.remove(0))
        };
        tokio::spawn(async move {
            if let Some(w) = evicted {
                me.release_warm(w).await;
            }
            me.build_warm(key, template, image).await;
        });
    }

    /// Builds one warm sandbox for `key`: network, deny-all enforcement, CA
    /// and the runtime's preparation joined to the network.
    async fn build_warm(&self, key: WarmKey, template: Template, image: Option<MemoryImage>) {
        let t0 = std::time::Instant::now();
        let claimed = {
            let mut inner = self.lock();
            match self.free_slot(&inner) {
                Some(slot) => {
                    inner.slots.insert(slot);
                    Some(slot)
                }
                None => {
                    inner.warming.remove(&key);
                    None
                }
            }
        };
        let Some(slot) = claimed else {
            tracing::info!(template = %key.template, "no warm sandbox: the address pool is full");
            return;
        };
        let rec = WarmRecord {
            id: new_id("sbx-"),
            slot,
            created_at: now(),
        };
        let spec = SandboxSpec {
            id: rec.id.clone(),
            slot,
            template: template.clone(),
            env_vars: Default::default(),
            uid: self.cfg.network.uid_base.saturating_add(slot),
            vcpu: key.vcpu,
            memory_mib: key.memory_mib,
            ca_pem: None,
            image: image.clone(),
        };
        let built = async {
            self.store.put_warm(&rec)?;
            let (network, _) = self.build(&spec, &NetworkPolicy::deny_all()).await?;
            if let Err(e) = self.runtime.connect(&spec, &network).await {
                self.undo_network(&spec.id, &network).await;
                self.release_prepared(&spec.id, spec.slot).await;
                return Err(ServiceError::from_runtime(e));
            }
            Ok::<_, ServiceError>(network)
        }
        .await;
        let entry = built.map(|network| WarmEntry {
            id: rec.id.clone(),
            slot,
            key: key.clone(),
            network,
        });
        let unwanted = {
            let mut inner = self.lock();
            inner.warming.remove(&key);
            match entry {
                Ok(w) => {
                    // A snapshot deleted meanwhile. (A stopping daemon
                    // releases the pool once nothing is being built.)
                    let gone = key.image.as_ref().is_some_and(|d| !d.exists());
                    if gone {
                        Some(w)
                    } else {
                        tracing::info!(sandbox = %w.id, slot, template = %key.template,
                            image = ?key.image, ms = t0.elapsed().as_secs_f64() * 1e3,
                            "warm sandbox ready");
                        inner.warm.push(w);
                        None
                    }
                }
                Err(e) => {
                    tracing::warn!(sandbox = %rec.id, error = %e, "cannot build a warm sandbox");
                    inner.slots.remove(&slot);
                    drop(inner);
                    if let Err(e) = self.store.delete_warm(&rec.id) {
                        tracing::warn!(sandbox = %rec.id, error = %e, "cannot forget a warm sandbox");
                    }
                    None
                }
            }
        };
        if let Some(w) = unwanted {
            self.release_warm(w).await;
        }
    }

    /// Releases a warm sandbox (removed from the pool by the caller): its
    /// runtime's preparation, enforcement, network, slot and record.
    async fn release_warm(&self, w: WarmEntry) {
        if let Err(e) =
            release_and_teardown(&self.runtime, &self.dataplane, &self.cfg, &w.id, w.slot).await
        {
            tracing::warn!(sandbox = %w.id, error = %e, "cannot release a warm sandbox");
            return;
        }
        self.lock().slots.remove(&w.slot);
        if let Err(e) = self.store.delete_warm(&w.id) {
            tracing::warn!(sandbox = %w.id, error = %e, "cannot forget a warm sandbox");
        }
    }

    /// Releases the warm sandboxes built from the memory image in `dir`.
    fn release_warm_of_image(&self, dir: &std::path::Path) {
        let unwanted: Vec<WarmEntry> = {
            let mut inner = self.lock();
            let (gone, kept) = std::mem::take(&mut inner.warm)
                .into_iter()
                .partition(|w| w.key.image.as_deref() == Some(dir));
            inner.warm = kept;
            gone
        };
        if unwanted.is_empty() {
            return;
        }
        if let Some(me) = self.me.upgrade() {
            tokio::spawn(async move {
                for w in unwanted {
                    me.release_warm(w).await;
                }
            });
        }
    }

    /// Ids of the warm sandboxes ready now.
    pub fn warm_ids(&self) -> Vec<String> {
        self.lock().warm.iter().map(|w| w.id.clone()).collect()
    }

    /// A stopping daemon releases its warm sandboxes (real sandboxes keep
    /// running), after those being built are done (bounded; what is still
    /// being built then is released at the next start).
    pub async fn release_all_warm(&self) {
        self.closing.store(true, Ordering::Release);
        let deadline = std::time::Instant::now() + WARM_BUILD_WAIT;
        while !self.lock().warming.is_empty() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let all = std::mem::take(&mut self.lock().warm);
        for w in all {
            self.release_warm(w).await;
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

    /// The lowest slot no sandbox of ours holds and no leftover link of
    /// another daemon's sandbox occupies.
    fn free_slot(&self, inner: &Inner) -> Option<u32> {
        (0..self.slot_capacity()).find(|s| !inner.slots.contains(s) && !net::host_link_present(*s))
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
        // Running clones keep their private mapping of the RAM file; warm
        // sandboxes made for it go.
        let dir = self.snapshot_dir(&key);
        self.release_warm_of_image(&dir);
        remove_snapshot_files(&dir);
        Ok(())
    }

    // === dead sandboxes ===

    /// Finds running or paused sandboxes whose process (the netns
    /// supervisor, the VM's QEMU) died, releases what they held (network,
    /// data plane, runtime files) and reports them `deleted` with a
    /// `status_reason`. Called periodically by the daemon.
    pub async fn reap_dead(&self) {
        let lost: Vec<WarmEntry> = {
            let mut inner = self.lock();
            let (lost, kept) = std::mem::take(&mut inner.warm)
                .into_iter()
                .partition(|w| !self.runtime.prepared_alive(&w.id));
            inner.warm = kept;
            lost
        };
        for w in lost {
            tracing::warn!(sandbox = %w.id, "warm sandbox lost: what its runtime prepared exited; releasing it");
            self.release_warm(w).await;
        }
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

/// Releases what earlier daemons left on the host that no store knows (see
/// [`crate::reclaim`]), logging each; a leftover another daemon keeps is
/// logged and left.
async fn reclaim_leftovers(
    dataplane: &Dataplane,
    cfg: &Config,
    known: &HashMap<String, SandboxRecord>,
) {
    let me = std::fs::canonicalize(&cfg.state_dir).unwrap_or_else(|_| cfg.state_dir.clone());
    for id in crate::reclaim::ids_on_host(dataplane.pin_root()) {
        if known.contains_key(&id) {
            continue;
        }
        let owner = crate::reclaim::owner_of(&id);
        if let crate::reclaim::Verdict::Foreign(whose) =
            crate::reclaim::verdict(owner.as_deref(), &me)
        {
            tracing::info!(sandbox = %id, owner = %whose, "leftover of another daemon: left alone");
            continue;
        }
        let sid = id.clone();
        let killed = tokio::task::spawn_blocking(move || crate::reclaim::kill_processes(&sid))
            .await
            .unwrap_or(0);
        let namespaces: Vec<String> = [net::netns_name(&id), net::router_netns_name(&id)]
            .into_iter()
            .filter(|n| net::netns_exists(n))
            .collect();
        let detached = dataplane.detach(&id).await;
        let mut failed = detached.err().map(|e| e.to_string());
        for n in &namespaces {
            if let Err(e) = net::delete_netns(n) {
                failed = Some(e.to_string());
            }
        }
        net::unclaim(&id);
        match failed {
            None => tracing::warn!(sandbox = %id, owner = ?owner, processes_killed = killed,
                namespaces = ?namespaces, "reclaimed a leftover sandbox no store knows"),
            Some(e) => {
                tracing::error!(sandbox = %id, error = %e, "cannot reclaim a leftover sandbox")
            }
        }
    }
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
