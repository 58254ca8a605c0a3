//! `exec` (run, wait, collect output) and `spawn` (detached daemon).

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::sys;

/// The PATH every command starts with (the configured or request env may
/// override it).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Each of stdout and stderr is cut at this many bytes (the rest is read and
/// dropped so the command never blocks on a full pipe).
pub const OUTPUT_CAP: usize = 16 << 20;
/// How long to wait for the pipes' EOF after the command itself exited.
const DRAIN_GRACE: Duration = Duration::from_millis(500);

#[derive(Deserialize)]
struct ExecRequest {
    argv: Vec<String>,
    #[serde(default)]
    env: Option<BTreeMap<String, String>>,
    #[serde(default)]
    cwd: Option<String>,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

#[derive(Deserialize)]
struct SpawnRequest {
    argv: Vec<String>,
    #[serde(default)]
    env: Option<BTreeMap<String, String>>,
    #[serde(default)]
    cwd: Option<String>,
}

/// A parsed, validated exec or spawn: ready to run in a worker thread.
pub struct Prepared {
    argv: Vec<String>,
    env: BTreeMap<String, String>,
    cwd: PathBuf,
    timeout: Option<Duration>,
}

pub fn check_env(env: &BTreeMap<String, String>) -> Result<(), String> {
    for (k, v) in env {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(format!("invalid environment variable name {k:?}"));
        }
        if v.contains('\0') {
            return Err(format!("environment variable {k} contains a NUL byte"));
        }
    }
    Ok(())
}

fn prepare(
    argv: Vec<String>,
    request_env: Option<BTreeMap<String, String>>,
    cwd: Option<String>,
    timeout: Option<Duration>,
    configured_env: &BTreeMap<String, String>,
) -> Result<Prepared, String> {
    if argv.is_empty() {
        return Err("argv is empty".into());
    }
    if argv.iter().any(|a| a.contains('\0')) {
        return Err("argv contains a NUL byte".into());
    }
    if argv[0].is_empty() {
        return Err("argv[0] is empty".into());
    }
    let request_env = request_env.unwrap_or_default();
    check_env(&request_env)?;
    let mut env = BTreeMap::new();
    env.insert("PATH".to_string(), DEFAULT_PATH.to_string());
    env.insert("HOME".to_string(), "/root".to_string());
    env.extend(configured_env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.extend(request_env);
    let cwd = PathBuf::from(cwd.unwrap_or_else(|| "/".to_string()));
    if cwd.as_os_str().as_encoded_bytes().contains(&0) {
        return Err("cwd contains a NUL byte".into());
    }
    if !cwd.is_dir() {
        return Err(format!("cwd {}: no such directory", cwd.display()));
    }
    Ok(Prepared {
        argv,
        env,
        cwd,
        timeout,
    })
}

pub fn prepare_exec(
    req: Value,
    configured_env: &BTreeMap<String, String>,
) -> Result<Prepared, String> {
    let r: ExecRequest =
        serde_json::from_value(req).map_err(|e| format!("bad exec request: {e}"))?;
    prepare(
        r.argv,
        r.env,
        r.cwd,
        // Absent, null or 0: no timeout.
        r.timeout_ms.filter(|&t| t > 0).map(Duration::from_millis),
        configured_env,
    )
}

pub fn prepare_spawn(
    req: Value,
    configured_env: &BTreeMap<String, String>,
) -> Result<Prepared, String> {
    let r: SpawnRequest =
        serde_json::from_value(req).map_err(|e| format!("bad spawn request: {e}"))?;
    prepare(r.argv, r.env, r.cwd, None, configured_env)
}

enum Resolved {
    Found(PathBuf),
    /// Exit code 127 / 126 and the shell-like message.
    Failed(i32, String),
}

fn is_executable(p: &Path) -> Option<bool> {
    let md = std::fs::metadata(p).ok()?;
    Some(md.is_file() && md.permissions().mode() & 0o111 != 0)
}

/// The program's path like a shell finds it: as given when it has a slash,
/// else the first executable file of that name in PATH.
fn resolve(prog: &str, path_var: Option<&String>) -> Resolved {
    if prog.contains('/') {
        let p = PathBuf::from(prog);
        return match is_executable(&p) {
            None => Resolved::Failed(127, format!("{prog}: not found\n")),
            Some(false) => Resolved::Failed(126, format!("{prog}: Permission denied\n")),
            Some(true) => Resolved::Found(p),
        };
    }
    let mut denied = false;
    for dir in path_var.map(String::as_str).unwrap_or("").split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let candidate = Path::new(dir).join(prog);
        match is_executable(&candidate) {
            Some(true) => return Resolved::Found(candidate),
            Some(false) => denied = true,
            None => {}
        }
    }
    if denied {
        Resolved::Failed(126, format!("{prog}: Permission denied\n"))
    } else {
        Resolved::Failed(127, format!("{prog}: not found\n"))
    }
}

fn spawn_error_code(e: &io::Error) -> i32 {
    if e.kind() == io::ErrorKind::NotFound {
        127
    } else {
        126
    }
}

fn exit_code(status: ExitStatus) -> i32 {
    if let Some(code) = status.code() {
        code
    } else if let Some(sig) = status.signal() {
        128 + sig
    } else {
        1
    }
}

/// Appends `chunk` to `buf` up to the cap.
fn push_capped(buf: &mut Vec<u8>, chunk: &[u8]) {
    let room = OUTPUT_CAP.saturating_sub(buf.len());
    buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
}

fn result(code: i32, stdout: &[u8], stderr: &[u8]) -> Value {
    json!({
        "exit_code": code,
        "stdout": String::from_utf8_lossy(stdout),
        "stderr": String::from_utf8_lossy(stderr),
    })
}

/// Runs the command to completion (or timeout) and returns the ok body.
pub fn run_exec(p: Prepared) -> Result<Value, String> {
    let path = match resolve(&p.argv[0], p.env.get("PATH")) {
        Resolved::Found(path) => path,
        Resolved::Failed(code, msg) => return Ok(result(code, b"", msg.as_bytes())),
    };
    let mut cmd = Command::new(&path);
    cmd.arg0(&p.argv[0])
        .args(&p.argv[1..])
        .env_clear()
        .envs(&p.env)
        .current_dir(&p.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    sys::new_session_on_exec(&mut cmd);
    let started = Instant::now();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let msg = format!("{}: {e}\n", p.argv[0]);
            return Ok(result(spawn_error_code(&e), b"", msg.as_bytes()));
        }
    };
    let pid = child.id();
    let (Some(mut stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take()) else {
        sys::kill_group(pid);
        let _ = child.wait();
        return Err("exec: child pipes missing".into());
    };

    // A waiter thread reaps the child; closing `notify_w` wakes the poll.
    let (notify_r, notify_w) = sys::pipe().map_err(|e| format!("exec: pipe: {e}"))?;
    let (tx, rx) = mpsc::channel::<io::Result<ExitStatus>>();
    std::thread::Builder::new()
        .name(format!("wait-{pid}"))
        .spawn(move || {
            let status = child.wait();
            let _ = tx.send(status);
            drop(notify_w);
        })
        .map_err(|e| {
            sys::kill_group(pid);
            format!("exec: thread: {e}")
        })?;

    let deadline = p.timeout.map(|t| started + t);
    let mut out = Vec::new();
    let mut err = Vec::new();
    let (mut out_eof, mut err_eof) = (false, false);
    let mut status: Option<io::Result<ExitStatus>> = None;
    let mut exited_at: Option<Instant> = None;
    let mut timed_out = false;
    let mut chunk = vec![0u8; 64 << 10];

    loop {
        if status.is_some() && out_eof && err_eof {
            break;
        }
        let now = Instant::now();
        if let Some(t) = exited_at {
            if now >= t + DRAIN_GRACE {
                break;
            }
        }
        if status.is_none() && !timed_out {
            if let Some(d) = deadline {
                if now >= d {
                    sys::kill_group(pid);
                    timed_out = true;
                }
            }
        }
        // Next wakeup: the timeout (while running) or the end of the grace.
        let mut wake: Option<Instant> = exited_at.map(|t| t + DRAIN_GRACE);
        if status.is_none() && !timed_out {
            wake = match (wake, deadline) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        let mut fds: Vec<RawFd> = Vec::with_capacity(3);
        let mut which: Vec<u8> = Vec::with_capacity(3);
        if !out_eof {
            fds.push(stdout.as_raw_fd());
            which.push(1);
        }
        if !err_eof {
            fds.push(stderr.as_raw_fd());
            which.push(2);
        }
        if status.is_none() {
            fds.push(notify_r.as_raw_fd());
            which.push(0);
        }
        let ready = sys::poll_readable(&fds, wake.map(|w| w.saturating_duration_since(now)))
            .map_err(|e| format!("exec: poll: {e}"))?;
        for (i, r) in ready.iter().enumerate() {
            if !r {
                continue;
            }
            match which[i] {
                0 => {
                    // The waiter sent the status before closing its end.
                    status = Some(
                        rx.recv()
                            .unwrap_or_else(|_| Err(io::Error::other("waiter thread vanished"))),
                    );
                    exited_at = Some(Instant::now());
                }
                1 => match stdout.read(&mut chunk) {
                    Ok(0) => out_eof = true,
                    Ok(n) => push_capped(&mut out, &chunk[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => out_eof = true,
                },
                _ => match stderr.read(&mut chunk) {
                    Ok(0) => err_eof = true,
                    Ok(n) => push_capped(&mut err, &chunk[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => err_eof = true,
                },
            }
        }
    }

    let status = status.unwrap_or_else(|| Err(io::Error::other("no exit status")));
    let code = if timed_out {
        124
    } else {
        match status {
            Ok(s) => exit_code(s),
            Err(e) => return Err(format!("exec: wait: {e}")),
        }
    };
    Ok(result(code, &out, &err))
}

/// Starts the detached daemon and returns the ok body with its pid.
pub fn run_spawn(p: Prepared) -> Result<Value, String> {
    let path = match resolve(&p.argv[0], p.env.get("PATH")) {
        Resolved::Found(path) => path,
        Resolved::Failed(_, msg) => return Err(format!("spawn: {}", msg.trim_end())),
    };
    let cstr = |s: &[u8]| CString::new(s).map_err(|_| "spawn: NUL byte in argument".to_string());
    let path_c = cstr(path.as_os_str().as_encoded_bytes())?;
    let cwd_c = cstr(p.cwd.as_os_str().as_encoded_bytes())?;
    let argv_c = p
        .argv
        .iter()
        .map(|a| cstr(a.as_bytes()))
        .collect::<Result<Vec<_>, _>>()?;
    let envp_c = p
        .env
        .iter()
        .map(|(k, v)| cstr(format!("{k}={v}").as_bytes()))
        .collect::<Result<Vec<_>, _>>()?;
    let pid = sys::spawn_detached(&path_c, &argv_c, &envp_c, &cwd_c)
        .map_err(|e| format!("spawn: {}: {e}", p.argv[0]))?;
    Ok(json!({ "pid": pid }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(script: &str, timeout_ms: Option<u64>) -> Value {
        let req = json!({"argv": ["sh", "-c", script], "timeout_ms": timeout_ms});
        let p = prepare_exec(req, &BTreeMap::new()).expect("prepare");
        run_exec(p).expect("run")
    }

    #[test]
    fn exit_codes_and_output() {
        let r = run("echo out; echo err >&2; exit 7", Some(10_000));
        assert_eq!(
            r,
            json!({"exit_code": 7, "stdout": "out\n", "stderr": "err\n"})
        );
        assert_eq!(run("kill -KILL $$", None)["exit_code"], 137);
    }

    #[test]
    fn timeout_kills_the_group_and_background_children_do_not_hold_the_answer() {
        let t = Instant::now();
        assert_eq!(run("sleep 30 & sleep 30", Some(200))["exit_code"], 124);
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        let t = Instant::now();
        let r = run("sleep 3 & echo started", Some(10_000));
        assert_eq!(r["stdout"], "started\n");
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    }

    #[test]
    fn output_is_capped() {
        let r = run("head -c 17000000 /dev/zero", None);
        assert_eq!(r["stdout"].as_str().map(str::len), Some(OUTPUT_CAP));
        assert_eq!(r["exit_code"], 0);
    }

    #[test]
    fn not_found_and_not_executable_like_a_shell() {
        let env = BTreeMap::new();
        let p = prepare_exec(json!({"argv": ["no-such-program-xyz"]}), &env).expect("prepare");
        let r = run_exec(p).expect("run");
        assert_eq!(r["exit_code"], 127);
        let p = prepare_exec(json!({"argv": ["/etc/passwd"]}), &env).expect("prepare");
        assert_eq!(run_exec(p).expect("run")["exit_code"], 126);
        assert!(prepare_exec(json!({"argv": []}), &env).is_err());
        assert!(prepare_exec(json!({"argv": ["sh"], "cwd": "/no/such/dir"}), &env).is_err());
        assert!(prepare_exec(json!({"argv": ["sh"], "env": {"A=B": "c"}}), &env).is_err());
    }

    #[test]
    fn spawn_reports_the_pid_or_the_exec_error() {
        let env = BTreeMap::new();
        let p = prepare_spawn(json!({"argv": ["true"]}), &env).expect("prepare");
        let pid = run_spawn(p).expect("spawn")["pid"].as_i64().expect("pid");
        assert!(pid > 1);
        let p = prepare_spawn(json!({"argv": ["no-such-daemon-xyz"]}), &env).expect("prepare");
        assert!(run_spawn(p).is_err());
        // Found in PATH but the exec itself fails (no interpreter): reported.
        let dir = std::env::temp_dir().join(format!("tollgate-agent-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let script = dir.join("bad-interp");
        std::fs::write(&script, "#!/no/such/interpreter\n").expect("write");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let p = prepare_spawn(json!({"argv": [script.to_str().expect("utf-8")]}), &env)
            .expect("prepare");
        let err = run_spawn(p).expect_err("exec error");
        assert!(err.contains("No such file"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn env_layers_request_over_configured_over_defaults() {
        let configured = BTreeMap::from([
            ("A".to_string(), "configured".to_string()),
            ("B".to_string(), "configured".to_string()),
        ]);
        let p = prepare_exec(
            json!({"argv": ["sh", "-c", "echo $A $B $HOME $PATH"], "env": {"B": "request"}}),
            &configured,
        )
        .expect("prepare");
        let r = run_exec(p).expect("run");
        assert_eq!(
            r["stdout"],
            format!("configured request /root {DEFAULT_PATH}\n")
        );
    }
}
