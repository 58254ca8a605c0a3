//! A real `tollgate serve` process for a test, run inside a [`Lab`]'s host
//! namespace so that nothing a sandbox sends can leave the machine: its own
//! state dir, config, port and keys. Dropping it deletes every sandbox it
//! still holds (so no namespace or link outlives the test) and stops it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::Value;

use crate::lab::{in_netns, Lab};
use crate::openapi::Contract;

/// Key of the `default` organization in every test daemon.
pub const KEY_DEFAULT: &str = "tg_test_default_key_0001";
/// Key of a second organization, `other`.
pub const KEY_OTHER: &str = "tg_test_other_org_key_0002";
/// Port of the API inside the lab's host namespace (each lab has its own).
pub const API_PORT: u16 = 8080;

/// A running daemon.
pub struct Daemon {
    child: Option<Child>,
    /// Base URL of its API (reachable from the lab's host namespace).
    pub url: String,
    /// Its state dir.
    pub state_dir: PathBuf,
    /// Its config file.
    pub config: PathBuf,
    /// The closed world it runs in.
    pub lab: Arc<Lab>,
    contract: Option<Contract>,
    keep_state: bool,
}

/// What a stopped daemon leaves for its restart. Dropped without a restart
/// (a test failed in between), it starts the daemon once more to delete
/// every sandbox, so no namespace, pin or process outlives the test.
pub struct Stopped {
    /// State dir.
    pub state_dir: PathBuf,
    /// Config file.
    pub config: PathBuf,
    /// The lab its sandboxes still live in.
    pub lab: Arc<Lab>,
    armed: bool,
}

impl Stopped {
    fn new(state_dir: PathBuf, config: PathBuf, lab: Arc<Lab>) -> Self {
        Self {
            state_dir,
            config,
            lab,
            armed: true,
        }
    }

    fn disarm(mut self) -> (PathBuf, PathBuf, Arc<Lab>) {
        self.armed = false;
        (
            self.state_dir.clone(),
            self.config.clone(),
            self.lab.clone(),
        )
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let s = Stopped::new(
            self.state_dir.clone(),
            self.config.clone(),
            self.lab.clone(),
        );
        // The restarted daemon's own Drop deletes every sandbox.
        let cleanup = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            drop(Daemon::spawn(s, Some(KEY_DEFAULT)))
        }));
        if cleanup.is_err() {
            eprintln!(
                "cleanup of a stopped test daemon failed; see {}",
                self.state_dir.with_extension("log").display()
            );
        }
    }
}

/// One API answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Status.
    pub status: StatusCode,
    /// Parsed JSON body (`Null` when empty).
    pub body: Value,
}

/// Config used by the API tests unless a test gives its own: two
/// organizations, the default limit of 3 live sandboxes, a small host budget.
pub fn default_config(pool: &str) -> String {
    format!(
        r#"
[[organizations]]
name = "other"
api_keys = ["{KEY_OTHER}"]
max_sandboxes = 2

[host]
vcpu = 6
memory_mib = 6144

[network]
pool = "{pool}"
"#
    )
}

impl Daemon {
    /// Starts a daemon in a new lab on a fresh state dir with `config` (TOML).
    pub fn start(name: &str, config: &str) -> Self {
        let (state, cfg) = fresh_state(name, config);
        Self::spawn(
            Stopped::new(state, cfg, Arc::new(Lab::new())),
            Some(KEY_DEFAULT),
        )
    }

    /// Starts a daemon again on what a stopped one left (a restart).
    pub fn restart(stopped: Stopped) -> Self {
        Self::spawn(stopped, Some(KEY_DEFAULT))
    }

    /// Starts a daemon without `TOLLGATE_API_KEY` in its environment, so that
    /// it uses (or generates) the key kept in its state dir.
    pub fn restart_without_key(stopped: Stopped) -> Self {
        Self::spawn(stopped, None)
    }

    /// A fresh lab and state, for [`Daemon::restart_without_key`].
    pub fn prepare(name: &str, config: &str) -> Stopped {
        let (state_dir, config) = fresh_state(name, config);
        Stopped::new(state_dir, config, Arc::new(Lab::new()))
    }

    fn spawn(s: Stopped, key: Option<&str>) -> Self {
        crate::privileged::require_root();
        let (state_dir, config, lab) = s.disarm();
        let url = format!("http://127.0.0.1:{API_PORT}");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(state_dir.with_extension("log"))
            .expect("open daemon log");
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", lab.host_ns))
            .arg("--")
            .arg(crate::privileged::tollgate_bin())
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{API_PORT}"),
                "--state-dir",
            ])
            .arg(&state_dir)
            .arg("--config")
            .arg(&config)
            .env("TOLLGATE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        match key {
            Some(k) => cmd.env("TOLLGATE_API_KEY", k),
            None => cmd.env_remove("TOLLGATE_API_KEY"),
        };
        let child = cmd.spawn().expect("spawn tollgate serve");
        let mut d = Self {
            child: Some(child),
            url,
            state_dir,
            config,
            lab,
            contract: None,
            keep_state: false,
        };
        d.wait_ready();
        d
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("tollgate serve exited early ({st}); log: {}", self.log());
                }
            }
            if let Ok(a) = self.call_raw(Method::GET, "/healthz", None, None) {
                if a.status == StatusCode::OK {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "daemon not ready in 20 s; log: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.state_dir.with_extension("log")).unwrap_or_default()
    }

    /// `tollgate` CLI command run in the daemon's namespace, with
    /// `TOLLGATE_API_URL` and `TOLLGATE_API_KEY` set for it.
    pub fn cli(&self) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.lab.host_ns))
            .arg("--")
            .arg(crate::privileged::tollgate_bin())
            .env("TOLLGATE_API_URL", &self.url)
            .env("TOLLGATE_API_KEY", KEY_DEFAULT);
        cmd
    }

    /// Ids of the warm sandboxes the daemon's log says became ready, oldest
    /// first.
    pub fn warm_ready(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains("warm sandbox ready"))
            .filter_map(|l| {
                let at = l.find("sbx-")?;
                Some(
                    l[at..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                        .collect(),
                )
            })
            .collect()
    }

    /// Sends a request with `key` (None: no credentials).
    pub fn call_raw(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Option<&Value>,
    ) -> anyhow::Result<Answer> {
        let headers = key
            .map(|k| ("authorization".to_string(), format!("Bearer {k}")))
            .into_iter()
            .collect();
        self.send(method, path, headers, body.cloned())
    }

    /// Sends a request with one header of the caller's choosing (credentials
    /// in a form the default client does not use).
    pub fn call_header(&self, method: Method, path: &str, name: &str, value: &str) -> Answer {
        self.call_headers(method, path, &[(name, value)])
    }

    /// Sends a request with the headers of the caller's choosing.
    pub fn call_headers(&self, method: Method, path: &str, headers: &[(&str, &str)]) -> Answer {
        let headers = headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        self.send(method, path, headers, None)
            .unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn send(
        &self,
        method: Method,
        path: &str,
        headers: Vec<(String, String)>,
        body: Option<Value>,
    ) -> anyhow::Result<Answer> {
        let url = self.url.clone();
        let path = path.to_string();
        in_netns(&self.lab.host_ns, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (status, body) = rt.block_on(request(&url, method, &path, headers, body))?;
            Ok(Answer { status, body })
        })
    }

    /// Sends a request as `key` and checks the answer against the OpenAPI
    /// document for `template` (the path as documented).
    pub fn call(
        &mut self,
        method: Method,
        path: &str,
        template: &str,
        key: &str,
        body: Option<&Value>,
    ) -> Answer {
        let a = self
            .call_raw(method.clone(), path, Some(key), body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        if self.contract.is_none() {
            let doc = self
                .call_raw(Method::GET, "/v1/openapi.json", None, None)
                .expect("openapi.json");
            assert_eq!(doc.status, StatusCode::OK);
            self.contract = Some(Contract::new(doc.body));
        }
        if let Some(c) = &self.contract {
            c.check(&method, template, a.status, &a.body);
        }
        a
    }

    /// Stops the daemon with SIGTERM (sandboxes keep running) and keeps the
    /// state dir and lab, for [`Daemon::restart`].
    pub fn stop_keep_state(mut self) -> Stopped {
        self.keep_state = true;
        self.terminate();
        Stopped::new(
            self.state_dir.clone(),
            self.config.clone(),
            self.lab.clone(),
        )
    }

    /// Kills the daemon with SIGKILL (no chance to clean up).
    pub fn kill_keep_state(mut self) -> Stopped {
        self.keep_state = true;
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        Stopped::new(
            self.state_dir.clone(),
            self.config.clone(),
            self.lab.clone(),
        )
    }

    fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Creates a sandbox (512 MiB) with `policy` as the default
    /// organization; its id. Panics unless `201`.
    pub fn create_sandbox(&mut self, policy: &Value) -> String {
        let c = self.call(
            Method::POST,
            "/v1/sandbox",
            "/v1/sandbox",
            KEY_DEFAULT,
            Some(&serde_json::json!({"memory": 512, "network_policy": policy})),
        );
        assert_eq!(c.status, StatusCode::CREATED, "{}", c.body);
        c.body["id"].as_str().expect("id").to_string()
    }

    /// The sandbox's network events (up to 1,000), oldest first.
    pub fn events(&mut self, id: &str) -> Vec<Value> {
        let a = self.call(
            Method::GET,
            &format!("/v1/sandbox/{id}/network/events?limit=1000"),
            "/v1/sandbox/{id}/network/events",
            KEY_DEFAULT,
            None,
        );
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        a.body["items"].as_array().cloned().unwrap_or_default()
    }

    /// `POST /v1/sandbox/{id}/process/execute` with `/bin/sh -c command`
    /// (bounded by `timeout_s`): (exit code, stdout, stderr).
    pub fn sh(&mut self, id: &str, command: &str, timeout_s: u64) -> (i64, String, String) {
        let a = self.call(
            Method::POST,
            &format!("/v1/sandbox/{id}/process/execute"),
            "/v1/sandbox/{id}/process/execute",
            KEY_DEFAULT,
            Some(&serde_json::json!({"command": command, "timeout": timeout_s})),
        );
        assert_eq!(a.status, StatusCode::OK, "{command}: {}", a.body);
        (
            a.body["exit_code"].as_i64().expect("exit_code"),
            a.body["stdout"].as_str().unwrap_or_default().to_string(),
            a.body["stderr"].as_str().unwrap_or_default().to_string(),
        )
    }

    /// Deletes every sandbox of both test organizations.
    /// `DELETE /v1/sandbox/{id}/` with the default organization's key,
    /// checked against the API contract like every [`Daemon::call`].
    pub fn delete_sandbox(&mut self, id: &str) -> Answer {
        self.call(
            Method::DELETE,
            &format!("/v1/sandbox/{id}/"),
            "/v1/sandbox/{id}/",
            KEY_DEFAULT,
            None,
        )
    }

    pub fn delete_all(&self) {
        for key in [KEY_DEFAULT, KEY_OTHER] {
            let Ok(a) = self.call_raw(Method::GET, "/v1/sandboxes?page-size=100", Some(key), None)
            else {
                continue;
            };
            let items = a.body["items"].as_array().cloned().unwrap_or_default();
            for it in items {
                if let Some(id) = it["id"].as_str() {
                    let _ = self.call_raw(
                        Method::DELETE,
                        &format!("/v1/sandbox/{id}/"),
                        Some(key),
                        None,
                    );
                }
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() && !self.keep_state {
            self.delete_all();
        }
        self.terminate();
        if !self.keep_state && !std::thread::panicking() {
            remove_state(&self.state_dir);
        }
    }
}

/// The `[runtime]` section of a daemon that runs QEMU microVMs on the guest
/// image `./scripts/guest-image` built in `target/guest`, with the template
/// images cached in `target/vm-templates` (shared by every test daemon, so
/// a template is cold-booted once per test run, not per test). Panics with
/// the command to run when the image or QEMU is missing.
pub fn vm_runtime_section() -> String {
    let guest = crate::privileged::guest_image_dir();
    let templates = guest.parent().expect("target dir").join("vm-templates");
    format!(
        r#"
[runtime]
backend = "vm"

[runtime.vm]
kernel = "{}"
initramfs = "{}"
template_dir = "{}"
"#,
        guest.join("vmlinuz").display(),
        guest.join("initramfs.img").display(),
        templates.display()
    )
}

/// A new, empty state dir and a config file beside it.
pub fn fresh_state(name: &str, config: &str) -> (PathBuf, PathBuf) {
    let state = std::env::temp_dir().join(format!("tollgate-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    std::fs::create_dir_all(&state).expect("create test state dir");
    let cfg = state.with_extension("toml");
    // Tests pick their runtime; those that do not say run on netns (they
    // use host tools inside their sandboxes), whatever the host has.
    let config = if config.contains("[runtime]") {
        config.to_owned()
    } else {
        format!("{config}\n[runtime]\nbackend = \"netns\"\n")
    };
    std::fs::write(&cfg, config).expect("write test config");
    (state, cfg)
}

/// Removes a test daemon's state dir, config and log.
pub fn remove_state(state: &Path) {
    let _ = std::fs::remove_dir_all(state);
    let _ = std::fs::remove_file(state.with_extension("toml"));
    let _ = std::fs::remove_file(state.with_extension("log"));
}

async fn request(
    base: &str,
    method: Method,
    path: &str,
    headers: Vec<(String, String)>,
    body: Option<Value>,
) -> anyhow::Result<(StatusCode, Value)> {
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::TokioIo;
    let uri: http::Uri = format!("{base}{path}").parse()?;
    let host = uri.host().unwrap_or("127.0.0.1").to_string();
    let port = uri.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let payload = match &body {
        Some(v) => bytes::Bytes::from(serde_json::to_vec(v)?),
        None => bytes::Bytes::new(),
    };
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, format!("{host}:{port}"))
        .header(http::header::CONTENT_TYPE, "application/json");
    for (name, value) in headers {
        req = req.header(name, value);
    }
    let resp = sender.send_request(req.body(Full::new(payload))?).await?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    let v = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or(Value::Null)
    };
    Ok((status, v))
}
