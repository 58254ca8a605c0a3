//! Per-sandbox network events: every packet the eBPF layer drops and every
//! connection it steers to the sandbox's proxy listener. Kept in a bounded
//! in-memory ring per sandbox, appended to `state_dir/events/<id>.jsonl` so
//! that a daemon restart keeps them, and written to the daemon's log.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, Write};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// Events kept per sandbox (older ones are dropped from memory and file).
pub const EVENTS_PER_SANDBOX: usize = 1000;

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The packet was dropped (eBPF) or the connection denied (proxy).
    Denied,
    /// The connection was handed to the sandbox's proxy listener.
    Steered,
}

/// One network event of one sandbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetEvent {
    /// Sequence number within the sandbox (monotonic across restarts).
    pub seq: u64,
    /// Unix time in milliseconds.
    pub time_ms: i64,
    /// The sandbox.
    pub sandbox_id: String,
    /// Denied or steered.
    pub kind: Kind,
    /// `tcp`, `udp`, `icmp`, `icmpv6` or the IP protocol number.
    pub protocol: String,
    /// Destination address (the sandbox's original destination).
    pub destination: Option<IpAddr>,
    /// Destination port (0 when the protocol has none).
    pub port: u16,
    /// Name the decision used (SNI / Host), when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Stable snake_case reason code (`floor`, `deny_all`, `steered`, …).
    pub reason: String,
}

struct Ring {
    events: VecDeque<NetEvent>,
    next_seq: u64,
    lines_in_file: usize,
}

/// The event log of every sandbox.
pub struct EventLog {
    dir: PathBuf,
    rings: Mutex<HashMap<String, Ring>>,
}

impl EventLog {
    /// A log persisted under `dir` (created if needed).
    pub fn new(dir: PathBuf) -> Self {
        use std::os::unix::fs::DirBuilderExt;
        if let Err(e) = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
        {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot create the events dir");
        }
        Self {
            dir,
            rings: Mutex::new(HashMap::new()),
        }
    }

    fn file(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.jsonl"))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Ring>> {
        self.rings.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn load(&self, id: &str) -> Ring {
        let mut events = VecDeque::new();
        let mut lines = 0;
        if let Ok(f) = std::fs::File::open(self.file(id)) {
            for line in std::io::BufReader::new(f).lines().map_while(Result::ok) {
                lines += 1;
                if let Ok(ev) = serde_json::from_str::<NetEvent>(&line) {
                    if events.len() == EVENTS_PER_SANDBOX {
                        events.pop_front();
                    }
                    events.push_back(ev);
                }
            }
        }
        let next_seq = events.back().map_or(1, |e| e.seq + 1);
        Ring {
            events,
            next_seq,
            lines_in_file: lines,
        }
    }

    /// Records an event (its `seq` and `time_ms` are assigned here).
    pub fn record(&self, mut ev: NetEvent) {
        let mut rings = self.lock();
        if !rings.contains_key(&ev.sandbox_id) {
            let ring = self.load(&ev.sandbox_id);
            rings.insert(ev.sandbox_id.clone(), ring);
        }
        let Some(ring) = rings.get_mut(&ev.sandbox_id) else {
            return;
        };
        ev.seq = ring.next_seq;
        ring.next_seq += 1;
        ev.time_ms = time::OffsetDateTime::now_utc().unix_timestamp_nanos() as i64 / 1_000_000;
        tracing::info!(
            target: "tollgate::events",
            sandbox = %ev.sandbox_id, kind = ?ev.kind, protocol = %ev.protocol,
            destination = ?ev.destination, port = ev.port, name = ?ev.name, reason = %ev.reason,
            "network event"
        );
        if ring.events.len() == EVENTS_PER_SANDBOX {
            ring.events.pop_front();
        }
        ring.events.push_back(ev.clone());
        // Append; rewrite the file from memory when it grows past twice the cap.
        let path = self.file(&ev.sandbox_id);
        let result = if ring.lines_in_file >= 2 * EVENTS_PER_SANDBOX {
            ring.lines_in_file = ring.events.len();
            rewrite(&path, &ring.events)
        } else {
            ring.lines_in_file += 1;
            append(&path, &ev)
        };
        if let Err(e) = result {
            tracing::warn!(path = %path.display(), error = %e, "cannot persist a network event");
        }
    }

    /// The newest `limit` events of a sandbox with `seq > after`, oldest first.
    pub fn list(&self, id: &str, after: u64, limit: usize) -> Vec<NetEvent> {
        let mut rings = self.lock();
        if !rings.contains_key(id) {
            let ring = self.load(id);
            rings.insert(id.to_string(), ring);
        }
        let Some(ring) = rings.get(id) else {
            return Vec::new();
        };
        let matching: Vec<&NetEvent> = ring.events.iter().filter(|e| e.seq > after).collect();
        let skip = matching.len().saturating_sub(limit);
        matching.into_iter().skip(skip).cloned().collect()
    }

    /// Forgets a deleted sandbox's events.
    pub fn remove(&self, id: &str) {
        self.lock().remove(id);
        let _ = std::fs::remove_file(self.file(id));
    }
}

fn append(path: &std::path::Path, ev: &NetEvent) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    let mut line = serde_json::to_vec(ev).map_err(std::io::Error::other)?;
    line.push(b'\n');
    f.write_all(&line)
}

fn rewrite(path: &std::path::Path, events: &VecDeque<NetEvent>) -> std::io::Result<()> {
    let tmp = path.with_extension("jsonl.tmp");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        for ev in events {
            let mut line = serde_json::to_vec(ev).map_err(std::io::Error::other)?;
            line.push(b'\n');
            f.write_all(&line)?;
        }
        f.sync_all()?;
    }
    std::fs::rename(tmp, path)
}

#[cfg(test)]
mod tests;
