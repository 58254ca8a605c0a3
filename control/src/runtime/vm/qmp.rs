//! A QMP client: one short-lived connection per operation on a VM's monitor
//! socket (`-qmp unix:…,server=on,wait=off`).
//!
//! QEMU's monitor serves one client at a time; the runtime connects, runs a
//! few commands and disconnects, so that nothing is held across a daemon
//! restart and a re-adopted VM is driven the same way as a fresh one.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// Why a QMP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be reached or broke (QEMU gone?).
    #[error("QMP socket {path}: {reason}")]
    Io {
        /// Socket path.
        path: String,
        /// What happened.
        reason: String,
    },
    /// QEMU answered with an error.
    #[error("QMP {command}: {class}: {desc}")]
    Command {
        /// The command that failed.
        command: String,
        /// QMP error class.
        class: String,
        /// QEMU's message.
        desc: String,
    },
    /// QEMU said something that is not QMP.
    #[error("QMP {0}: unexpected answer")]
    Protocol(String),
    /// No answer in time.
    #[error("QMP {0}: no answer in time")]
    Timeout(String),
}

/// An open QMP session (capabilities negotiated).
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    path: String,
    line: String,
}

/// How long one command may take to be answered.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

impl Qmp {
    /// Connects to the monitor at `path`, retrying for up to `wait` while the
    /// socket does not exist yet or refuses (QEMU still starting).
    pub async fn connect(path: &Path, wait: Duration) -> Result<Self, QmpError> {
        let label = path.display().to_string();
        let deadline = tokio::time::Instant::now() + wait;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err(e) => {
                    return Err(QmpError::Io {
                        path: label,
                        reason: e.to_string(),
                    })
                }
            }
        };
        let (r, w) = stream.into_split();
        let mut qmp = Self {
            reader: BufReader::new(r),
            writer: w,
            path: label,
            line: String::new(),
        };
        let greeting = qmp.read_message("greeting").await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol("greeting".into()));
        }
        qmp.execute("qmp_capabilities", json!({})).await?;
        Ok(qmp)
    }

    async fn read_message(&mut self, what: &str) -> Result<Value, QmpError> {
        self.line.clear();
        let n = tokio::time::timeout(COMMAND_TIMEOUT, self.reader.read_line(&mut self.line))
            .await
            .map_err(|_| QmpError::Timeout(what.to_owned()))?
            .map_err(|e| QmpError::Io {
                path: self.path.clone(),
                reason: e.to_string(),
            })?;
        if n == 0 {
            return Err(QmpError::Io {
                path: self.path.clone(),
                reason: format!("closed by QEMU during {what}"),
            });
        }
        serde_json::from_str(&self.line).map_err(|_| QmpError::Protocol(what.to_owned()))
    }

    /// Runs `command` with `arguments` and returns its `return` value.
    /// Events that arrive meanwhile are skipped.
    pub async fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if arguments.as_object().is_some_and(|a| !a.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut text = msg.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .await
            .map_err(|e| QmpError::Io {
                path: self.path.clone(),
                reason: e.to_string(),
            })?;
        loop {
            let reply = self.read_message(command).await?;
            if reply.get("event").is_some() {
                continue;
            }
            if let Some(r) = reply.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = reply.get("error") {
                return Err(QmpError::Command {
                    command: command.to_owned(),
                    class: e["class"].as_str().unwrap_or("").to_owned(),
                    desc: e["desc"].as_str().unwrap_or("").to_owned(),
                });
            }
            return Err(QmpError::Protocol(command.to_owned()));
        }
    }

    /// The VM's run state (`running`, `paused`, `inmigrate`, `postmigrate`, …).
    pub async fn status(&mut self) -> Result<String, QmpError> {
        let r = self.execute("query-status", json!({})).await?;
        r["status"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| QmpError::Protocol("query-status".into()))
    }

    /// Turns the `x-ignore-shared` migration capability on or off: with it, a
    /// RAM block mapped shared from a file is left out of the stream.
    pub async fn ignore_shared(&mut self, on: bool) -> Result<(), QmpError> {
        self.execute(
            "migrate-set-capabilities",
            json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": on }] }),
        )
        .await?;
        // The default bandwidth cap (128 MiB/s) would make a RAM-carrying
        // stream crawl; the stream never leaves the host.
        self.execute(
            "migrate-set-parameters",
            json!({ "max-bandwidth": 64u64 << 30 }),
        )
        .await
        .map(|_| ())
    }

    /// Waits until the outgoing migration ends; `Err` unless it completed.
    pub async fn wait_migration(&mut self, limit: Duration) -> Result<(), QmpError> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let r = self.execute("query-migrate", json!({})).await?;
            match r["status"].as_str().unwrap_or("") {
                "completed" => return Ok(()),
                "failed" | "cancelled" => {
                    return Err(QmpError::Command {
                        command: "migrate".into(),
                        class: r["status"].as_str().unwrap_or("").to_owned(),
                        desc: r["error-desc"].as_str().unwrap_or("").to_owned(),
                    })
                }
                _ => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(QmpError::Timeout("migrate".into()));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Waits until an incoming migration has been loaded (the state leaves
    /// `inmigrate`) and returns the new state.
    pub async fn wait_loaded(&mut self, limit: Duration) -> Result<String, QmpError> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let s = self.status().await?;
            if s != "inmigrate" {
                return Ok(s);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(QmpError::Timeout("incoming migration".into()));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}
