//! tollgate-agent: the guest side of a tollgate microVM. Runs under /init,
//! finds the virtio-serial port `org.tollgate.agent` and serves the host's
//! newline-delimited JSON requests (ping, configure, exec, spawn) on it.
//!
//! The port reads EOF (0) whenever no host process is connected to its
//! host-side socket (e.g. right after a snapshot restore): that is not an
//! end, the agent sleeps briefly and reads again on the same fd.

mod configure;
mod exec;
mod sys;

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use configure::Config;

const PORT_NAME: &str = "org.tollgate.agent";
/// How long to look for the port before exiting (init starts us again).
const PORT_WAIT: Duration = Duration::from_secs(60);
/// Sleep between reads while the host side is not connected.
const EOF_BACKOFF: Duration = Duration::from_millis(5);
/// A request line longer than this is dropped (answered with an error).
const MAX_LINE: usize = 64 << 20;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct Agent {
    started: Instant,
    out: Mutex<File>,
    config: Mutex<Config>,
}

impl Agent {
    /// Writes one whole response line; a response whose write fails (no host
    /// connected) is dropped.
    fn respond(&self, id: Option<u64>, result: Result<Value, String>) {
        let msg = match result {
            Ok(v) => json!({ "id": id, "ok": v }),
            Err(e) => json!({ "id": id, "error": e }),
        };
        let mut line = match serde_json::to_vec(&msg) {
            Ok(l) => l,
            Err(e) => {
                format!("{{\"id\":null,\"error\":\"cannot encode response: {e}\"}}").into_bytes()
            }
        };
        line.push(b'\n');
        let mut out = lock(&self.out);
        if let Err(e) = out.write_all(&line).and_then(|()| out.flush()) {
            eprintln!(
                "tollgate-agent: dropped response {id:?} ({} bytes): {e}",
                line.len()
            );
        }
    }

    fn handle_line(self: &Arc<Self>, line: &[u8]) {
        let req: Value = match serde_json::from_slice(line) {
            Ok(v) => v,
            Err(e) => return self.respond(None, Err(format!("invalid JSON: {e}"))),
        };
        let Some(obj) = req.as_object() else {
            return self.respond(None, Err("a request must be a JSON object".into()));
        };
        let Some(id) = obj.get("id").and_then(Value::as_u64) else {
            return self.respond(
                None,
                Err("a request needs an unsigned integer \"id\"".into()),
            );
        };
        let Some(op) = obj.get("op").and_then(Value::as_str).map(str::to_owned) else {
            return self.respond(Some(id), Err("a request needs a string \"op\"".into()));
        };
        match op.as_str() {
            "ping" => self.respond(
                Some(id),
                Ok(json!({
                    "uptime_ms": u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
                    "pid": std::process::id(),
                })),
            ),
            // In line, so requests after it run with the new config.
            "configure" => {
                let res = configure::configure(&mut lock(&self.config), req);
                self.respond(Some(id), res);
            }
            "exec" | "spawn" => {
                // The env snapshot is taken here, in request order.
                let env = lock(&self.config).env.clone();
                let prepared = if op == "exec" {
                    exec::prepare_exec(req, &env)
                } else {
                    exec::prepare_spawn(req, &env)
                };
                let prepared = match prepared {
                    Ok(p) => p,
                    Err(e) => return self.respond(Some(id), Err(e)),
                };
                let agent = Arc::clone(self);
                let is_exec = op == "exec";
                let spawned = std::thread::Builder::new().name(format!("{op}-{id}")).spawn(move || {
                    let res = if is_exec {
                        exec::run_exec(prepared)
                    } else {
                        exec::run_spawn(prepared)
                    };
                    agent.respond(Some(id), res);
                });
                if let Err(e) = spawned {
                    self.respond(Some(id), Err(format!("cannot start a thread: {e}")));
                }
            }
            other => self.respond(Some(id), Err(format!("unknown op {other:?}"))),
        }
    }
}

/// The /dev node of the virtio-serial port named `name`, if it exists.
fn find_port(name: &str) -> Option<PathBuf> {
    for entry in fs::read_dir("/sys/class/virtio-ports").ok()?.flatten() {
        let Ok(n) = fs::read_to_string(entry.path().join("name")) else {
            continue;
        };
        if n.trim_end() == name {
            return Some(PathBuf::from("/dev").join(entry.file_name()));
        }
    }
    None
}

fn open_port(wait: Duration) -> io::Result<(PathBuf, File)> {
    let deadline = Instant::now() + wait;
    let mut last = String::from("no such port");
    loop {
        if let Some(path) = find_port(PORT_NAME) {
            match File::options().read(true).write(true).open(&path) {
                Ok(f) => return Ok((path, f)),
                Err(e) => last = format!("{}: {e}", path.display()),
            }
        }
        if Instant::now() >= deadline {
            return Err(io::Error::other(format!(
                "virtio-serial port {PORT_NAME} not found: {last}"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Splits the read stream into lines and hands each to the agent. Keeps a
/// partial line across reads and across EOFs.
struct LineReader {
    buf: Vec<u8>,
    /// Inside a line that got too long: drop bytes until its newline.
    discarding: bool,
}

impl LineReader {
    fn feed(&mut self, data: &[u8], mut on_line: impl FnMut(Result<&[u8], String>)) {
        let mut rest = data;
        while !rest.is_empty() {
            match rest.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    let (part, tail) = (&rest[..i], &rest[i + 1..]);
                    rest = tail;
                    if self.discarding {
                        self.discarding = false;
                        self.buf.clear();
                        on_line(Err(format!(
                            "request line longer than {MAX_LINE} bytes dropped"
                        )));
                        continue;
                    }
                    self.buf.extend_from_slice(part);
                    let line = std::mem::take(&mut self.buf);
                    let trimmed = line.trim_ascii();
                    if !trimmed.is_empty() {
                        on_line(Ok(trimmed));
                    }
                }
                None => {
                    if !self.discarding {
                        self.buf.extend_from_slice(rest);
                        if self.buf.len() > MAX_LINE {
                            self.discarding = true;
                            self.buf = Vec::new();
                        }
                    }
                    rest = &[];
                }
            }
        }
    }
}

fn serve(agent: &Arc<Agent>, mut port: File) -> io::Result<()> {
    let mut lines = LineReader {
        buf: Vec::new(),
        discarding: false,
    };
    let mut chunk = vec![0u8; 64 << 10];
    let mut errors = 0u32;
    loop {
        match port.read(&mut chunk) {
            // No host connected: not the end.
            Ok(0) => std::thread::sleep(EOF_BACKOFF),
            Ok(n) => {
                errors = 0;
                lines.feed(&chunk[..n], |line| match line {
                    Ok(l) => agent.handle_line(l),
                    Err(e) => agent.respond(None, Err(e)),
                });
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                errors += 1;
                if errors >= 100 {
                    return Err(e);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn main() {
    let started = Instant::now();
    let (path, port) = match open_port(PORT_WAIT) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("tollgate-agent: {e}");
            std::process::exit(1);
        }
    };
    let out = match port.try_clone() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("tollgate-agent: {}: {e}", path.display());
            std::process::exit(1);
        }
    };
    let agent = Arc::new(Agent {
        started,
        out: Mutex::new(out),
        config: Mutex::new(Config::default()),
    });
    if let Err(e) = serve(&agent, port) {
        eprintln!("tollgate-agent: reading {}: {e}", path.display());
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(r: &mut LineReader, data: &[u8]) -> Vec<Result<Vec<u8>, String>> {
        let mut got = Vec::new();
        r.feed(data, |l| got.push(l.map(<[u8]>::to_vec)));
        got
    }

    #[test]
    fn lines_survive_split_reads() {
        let mut r = LineReader {
            buf: Vec::new(),
            discarding: false,
        };
        assert!(collect(&mut r, b"{\"id\":1,").is_empty());
        assert!(collect(&mut r, b"").is_empty());
        let got = collect(&mut r, b"\"op\":\"ping\"}\n\n  \n{\"id\":2}\n{\"id\"");
        assert_eq!(
            got,
            vec![
                Ok(b"{\"id\":1,\"op\":\"ping\"}".to_vec()),
                Ok(b"{\"id\":2}".to_vec())
            ]
        );
        assert_eq!(
            collect(&mut r, b":3}\r\n"),
            vec![Ok(b"{\"id\":3}".to_vec())]
        );
    }

    #[test]
    fn overlong_line_is_dropped_and_reading_goes_on() {
        let mut r = LineReader {
            buf: Vec::new(),
            discarding: false,
        };
        let big = vec![b'x'; MAX_LINE + 1];
        assert!(collect(&mut r, &big).is_empty());
        let got = collect(&mut r, b"yyy\n{\"id\":4}\n");
        assert_eq!(got.len(), 2);
        assert!(got[0].is_err());
        assert_eq!(got[1], Ok(b"{\"id\":4}".to_vec()));
    }
}
