//! The host side of the guest agent's channel: newline-delimited JSON over
//! the VM's virtio-serial port (`org.tollgate.agent`), whose host end is a
//! unix socket QEMU serves.
//!
//! One connection per VM, kept open (QEMU serves one client at a time and
//! the guest sees every connect and disconnect); requests carry an `id` and
//! may overlap, answers are matched by it. A connection that breaks fails
//! its pending requests and is replaced by the next call.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Map, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::oneshot;

/// Name of the virtio-serial port the agent listens on.
pub const PORT_NAME: &str = "org.tollgate.agent";

/// Why an agent call failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The channel could not be opened or broke.
    #[error("guest agent channel: {0}")]
    Channel(String),
    /// No answer in time.
    #[error("guest agent: no answer to {0} in time")]
    Timeout(String),
    /// The agent answered with an error.
    #[error("guest agent: {0}")]
    Refused(String),
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value, String>>>>>;

/// One open channel to a guest agent.
pub struct AgentConn {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    next: AtomicU64,
    broken: Arc<AtomicBool>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for AgentConn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl AgentConn {
    /// Connects to the agent socket at `path`, retrying for up to `wait`.
    pub async fn connect(path: &Path, wait: Duration) -> Result<Self, AgentError> {
        let deadline = tokio::time::Instant::now() + wait;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err(e) => {
                    return Err(AgentError::Channel(format!("{}: {e}", path.display())));
                }
            }
        };
        let (r, mut w) = stream.into_split();
        // The agent keeps a partial line across disconnects: a bare newline
        // ends whatever an earlier connection left half-written (the agent
        // answers it with one error line, which matches no call).
        w.write_all(b"\n")
            .await
            .map_err(|e| AgentError::Channel(format!("{}: {e}", path.display())))?;
        let pending: Pending = Arc::default();
        let broken = Arc::new(AtomicBool::new(false));
        let reader = {
            let pending = Arc::clone(&pending);
            let broken = Arc::clone(&broken);
            tokio::spawn(async move {
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    deliver(&pending, &line);
                }
                broken.store(true, Ordering::SeqCst);
                // Dropping the senders fails every waiting call.
                lock(&pending).clear();
            })
        };
        Ok(Self {
            writer: tokio::sync::Mutex::new(w),
            pending,
            next: AtomicU64::new(1),
            broken,
            reader,
        })
    }

    /// Is the channel known to be broken?
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
    }

    /// Sends `op` with `fields` and waits up to `timeout` for the answer's
    /// `ok` object.
    pub async fn call(
        &self,
        op: &str,
        fields: Map<String, Value>,
        timeout: Duration,
    ) -> Result<Value, AgentError> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut msg = fields;
        msg.insert("id".into(), Value::from(id));
        msg.insert("op".into(), Value::from(op));
        let mut text = Value::Object(msg).to_string();
        text.push('\n');
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        if self.is_broken() {
            lock(&self.pending).remove(&id);
            return Err(AgentError::Channel("closed".into()));
        }
        let sent = self.writer.lock().await.write_all(text.as_bytes()).await;
        if let Err(e) = sent {
            lock(&self.pending).remove(&id);
            self.broken.store(true, Ordering::SeqCst);
            return Err(AgentError::Channel(e.to_string()));
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err(msg))) => Err(AgentError::Refused(msg)),
            Ok(Err(_)) => Err(AgentError::Channel("closed before the answer".into())),
            Err(_) => {
                lock(&self.pending).remove(&id);
                Err(AgentError::Timeout(op.to_owned()))
            }
        }
    }
}

/// Hands one answer line to its waiting call (lines that match none are
/// dropped: answers to calls that timed out, or garbage).
fn deliver(pending: &Pending, line: &str) {
    let Ok(v) = serde_json::from_str::<Value>(line) else {
        tracing::debug!("guest agent: unparsable line dropped");
        return;
    };
    let Some(id) = v.get("id").and_then(Value::as_u64) else {
        return;
    };
    let Some(tx) = lock(pending).remove(&id) else {
        return;
    };
    let result = match (v.get("ok"), v.get("error")) {
        (Some(ok), _) => Ok(ok.clone()),
        (None, Some(e)) => Err(e.as_str().unwrap_or("error").to_owned()),
        (None, None) => Err("answer without ok or error".to_owned()),
    };
    let _ = tx.send(result);
}

/// The agent channels of every VM, by sandbox id: connected on first use,
/// replaced when broken.
#[derive(Default)]
pub struct Channels {
    conns: Mutex<HashMap<String, Arc<AgentConn>>>,
}

impl Channels {
    /// The open channel of sandbox `id` (socket `path`), connecting if there
    /// is none or it broke.
    pub async fn get(&self, id: &str, path: &Path) -> Result<Arc<AgentConn>, AgentError> {
        if let Some(c) = lock(&self.conns).get(id) {
            if !c.is_broken() {
                return Ok(Arc::clone(c));
            }
        }
        let conn = Arc::new(AgentConn::connect(path, Duration::from_secs(2)).await?);
        lock(&self.conns).insert(id.to_owned(), Arc::clone(&conn));
        Ok(conn)
    }

    /// Installs a freshly opened channel for sandbox `id`.
    pub fn put(&self, id: &str, conn: Arc<AgentConn>) {
        lock(&self.conns).insert(id.to_owned(), conn);
    }

    /// Closes and forgets sandbox `id`'s channel.
    pub fn remove(&self, id: &str) {
        lock(&self.conns).remove(id);
    }
}
