//! The control API against its contract: every field rule, 401 / 404 / 429 /
//! 503 paths, the lifecycle, secrets redaction, timeouts, restarts. Runs a
//! real daemon (root: sandboxes are network namespaces). Every answer is
//! checked against `/v1/openapi.json` by the harness.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde_json::{json, Value};
use tollgate_proxy::intercept::SandboxCa;
use tollgate_tests::daemon::{default_config, remove_state, Daemon, KEY_DEFAULT, KEY_OTHER};
use tollgate_tests::lab::in_netns;
use tollgate_tests::privileged::{require_root, tollgate_bin, TempDir};

/// One daemon at a time per test binary: they share the host's namespace table.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

fn fields(a: &tollgate_tests::daemon::Answer) -> HashSet<String> {
    a.body["errors"]
        .as_array()
        .map_or_else(HashSet::new, |errs| {
            errs.iter()
                .filter_map(|e| e["field"].as_str().map(str::to_string))
                .collect()
        })
}

/// Creates a sandbox, snapshots it as `name`, deletes the sandbox.
fn make_snapshot(d: &mut Daemon, key: &str, name: &str, policy: Option<Value>) -> Value {
    let mut body = json!({"template_name": "system/debian:bookworm", "vcpu": 1, "memory": 512});
    if let Some(p) = policy {
        body["network_policy"] = p;
    }
    let a = d.call(Method::POST, "/v1/sandbox", "/v1/sandbox", key, Some(&body));
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    let id = a.body["id"].as_str().expect("id").to_string();
    let s = d.call(
        Method::POST,
        &format!("/v1/sandbox/{id}/snapshot/create"),
        "/v1/sandbox/{id}/snapshot/create",
        key,
        Some(&json!({"name": name, "kill_sandbox_after": true})),
    );
    assert_eq!(s.status, StatusCode::CREATED, "{}", s.body);
    let g = d.call(
        Method::GET,
        &format!("/v1/sandbox/{id}/"),
        "/v1/sandbox/{id}/",
        key,
        None,
    );
    assert_eq!(
        g.status,
        StatusCode::NOT_FOUND,
        "kill_sandbox_after must delete the source sandbox"
    );
    s.body
}

#[test]
fn resume_rejects_every_bad_field_at_once() {
    let _g = serial();
    let mut d = Daemon::start("fields", &default_config("10.210.0.0/20"));
    let mut domains: Vec<Value> = (0..51)
        .map(|i| json!(format!("d{i}.example.com")))
        .collect();
    domains[1] = json!("*");
    let body = json!({
        "timeout_min": 481,
        "auto_pause": "yes",
        "surprise": 1,
        "network_policy": {
            "mode": "custom",
            "allow_domains": domains,
            "allow_cidrs": ["10.1.2.3/8"],
            "transforms": [{"domain": "api.example.com", "inject_headers": {"Bad Name": "x", "Authorization": "a\r\nX-Evil: 1"}}]
        }
    });
    let a = d.call(
        Method::POST,
        "/v1/snapshot/resume",
        "/v1/snapshot/resume",
        KEY_DEFAULT,
        Some(&body),
    );
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.body);
    let f = fields(&a);
    for want in [
        "snapshot_name",
        "timeout_min",
        "auto_pause",
        "surprise",
        "network_policy.allow_domains",
        "network_policy.allow_domains[1]",
        "network_policy.allow_cidrs[0]",
        "network_policy.transforms[0].inject_headers[\"Bad Name\"]",
        "network_policy.transforms[0].inject_headers.Authorization",
    ] {
        assert!(f.contains(want), "no error for {want}: {}", a.body);
    }
    let text = a.body.to_string();
    assert!(
        !text.contains("X-Evil"),
        "a rejected secret value was echoed: {text}"
    );
    assert!(
        text.contains("10.0.0.0/8"),
        "the CIDR error must name the network meant: {text}"
    );

    // timeout_min lower bound, mode required, non-object policy.
    let a = d.call(
        Method::POST,
        "/v1/snapshot/resume",
        "/v1/snapshot/resume",
        KEY_DEFAULT,
        Some(&json!({"snapshot_name": "x", "timeout_min": 0, "network_policy": {"allow_domains": []}})),
    );
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    let f = fields(&a);
    assert!(
        f.contains("timeout_min") && f.contains("network_policy.mode"),
        "{}",
        a.body
    );

    // Not JSON, not an object.
    let a = d.call(
        Method::POST,
        "/v1/snapshot/resume",
        "/v1/snapshot/resume",
        KEY_DEFAULT,
        Some(&json!([1, 2])),
    );
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(fields(&a).contains("body"));
}

#[test]
fn restore_and_create_field_rules() {
    let _g = serial();
    let mut d = Daemon::start("fields2", &default_config("10.210.16.0/20"));
    for (body, field) in [
        (json!({"snapshot_name": "s", "timeout": 0}), "timeout"),
        (json!({"snapshot_name": "s", "timeout": 28801}), "timeout"),
        (json!({"snapshot_name": ""}), "snapshot_name"),
        (json!({"snapshot_name": "x".repeat(65)}), "snapshot_name"),
        (
            json!({"snapshot_name": "s", "network_policy": {"mode": "sometimes"}}),
            "network_policy.mode",
        ),
    ] {
        let a = d.call(
            Method::POST,
            "/v1/snapshot/restore",
            "/v1/snapshot/restore",
            KEY_DEFAULT,
            Some(&body),
        );
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{body}");
        assert!(fields(&a).contains(field), "{body} → {}", a.body);
    }
    for (body, field) in [
        (json!({"vcpu": 9}), "vcpu"),
        (json!({"vcpu": 0}), "vcpu"),
        (json!({"memory": 513}), "memory"),
        (json!({"memory": 256}), "memory"),
        (json!({"timeout": 28801}), "timeout"),
        (json!({"env_vars": {"1BAD": "x"}}), "env_vars.1BAD"),
        (
            json!({"template_name": "no/such:template"}),
            "template_name",
        ),
        (
            json!({"network_policy": {"mode": "custom", "transforms": [{"domain": "a.com"}, {"domain": "A.com."}]}}),
            "network_policy.transforms[1].domain",
        ),
        (
            json!({"network_policy": {"mode": "custom", "allow_domains": ["ok.example.com", "-bad.example.com"]}}),
            "network_policy.allow_domains[1]",
        ),
        (
            json!({"network_policy": {"mode": "custom", "allow_domains": ["xn--a.example.com"]}}),
            "network_policy.allow_domains[0]",
        ),
    ] {
        let a = d.call(
            Method::POST,
            "/v1/sandbox",
            "/v1/sandbox",
            KEY_DEFAULT,
            Some(&body),
        );
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{body} → {}", a.body);
        assert!(fields(&a).contains(field), "{body} → {}", a.body);
    }
    let a = d.call(
        Method::GET,
        "/v1/sandboxes?page-size=101&order-by=up",
        "/v1/sandboxes",
        KEY_DEFAULT,
        None,
    );
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    let f = fields(&a);
    assert!(
        f.contains("page-size") && f.contains("order-by"),
        "{}",
        a.body
    );
}

#[test]
fn auth_401_and_404_paths() {
    let _g = serial();
    let mut d = Daemon::start("auth", &default_config("10.210.32.0/20"));
    let a = d
        .call_raw(Method::GET, "/v1/sandboxes", None, None)
        .expect("call");
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert!(a.body["message"].is_string());
    let a = d.call(
        Method::GET,
        "/v1/sandboxes",
        "/v1/sandboxes",
        "wrong-key-000000000",
        None,
    );
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        a.body.as_object().map(|o| o.len()),
        Some(1),
        "401 body is {{message}}: {}",
        a.body
    );
    // An empty X-API-Key is no key; two different keys are refused.
    let bearer = format!("Bearer {KEY_DEFAULT}");
    let a = d.call_headers(
        Method::GET,
        "/v1/sandboxes",
        &[("x-api-key", ""), ("authorization", &bearer)],
    );
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let a = d.call_headers(
        Method::GET,
        "/v1/sandboxes",
        &[("x-api-key", KEY_OTHER), ("authorization", &bearer)],
    );
    assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{}", a.body);
    assert!(
        a.body["message"]
            .as_str()
            .is_some_and(|m| m.contains("different")),
        "{}",
        a.body
    );

    let a = d.call(
        Method::POST,
        "/v1/snapshot/resume",
        "/v1/snapshot/resume",
        KEY_DEFAULT,
        Some(&json!({"snapshot_name": "does-not-exist"})),
    );
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert!(a.body["message"]
        .as_str()
        .is_some_and(|m| m.contains("snapshot")));

    // Cross-organization objects are 404.
    make_snapshot(&mut d, KEY_DEFAULT, "mine", None);
    let a = d.call(
        Method::POST,
        "/v1/snapshot/restore",
        "/v1/snapshot/restore",
        KEY_OTHER,
        Some(&json!({"snapshot_name": "mine"})),
    );
    assert_eq!(
        a.status,
        StatusCode::NOT_FOUND,
        "other org restored my snapshot: {}",
        a.body
    );
    let c = d.call(
        Method::POST,
        "/v1/sandbox",
        "/v1/sandbox",
        KEY_DEFAULT,
        Some(&json!({"memory": 512})),
    );
    assert_eq!(c.status, StatusCode::CREATED);
    let id = c.body["id"].as_str().expect("id").to_string();
    let p = format!("/v1/sandbox/{id}/");
    assert_eq!(
        d.call(Method::GET, &p, "/v1/sandbox/{id}/", KEY_OTHER, None)
            .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        d.call(Method::DELETE, &p, "/v1/sandbox/{id}/", KEY_OTHER, None)
            .status,
        StatusCode::NOT_FOUND
    );
    let l = d.call(
        Method::GET,
        "/v1/sandboxes",
        "/v1/sandboxes",
        KEY_OTHER,
        None,
    );
    assert_eq!(
        l.body["total_items"], 0,
        "other org sees my sandbox: {}",
        l.body
    );
    let snaps = d.call(
        Method::GET,
        "/v1/snapshots",
        "/v1/snapshots",
        KEY_OTHER,
        None,
    );
    assert_eq!(snaps.body["total_items"], 0);
    let del = d.call(
        Method::DELETE,
        "/v1/snapshot/mine",
        "/v1/snapshot/{id}",
        KEY_OTHER,
        None,
    );
    assert_eq!(del.status, StatusCode::NOT_FOUND);
    // X-API-Key and the bare key work too; a key of another org is a 404.
    assert_eq!(
        d.call_header(Method::GET, &p, "x-api-key", KEY_DEFAULT)
            .status,
        StatusCode::OK
    );
    assert_eq!(
        d.call_header(Method::GET, &p, "authorization", KEY_DEFAULT)
            .status,
        StatusCode::OK
    );
    assert_eq!(
        d.call_header(Method::GET, &p, "x-api-key", KEY_OTHER)
            .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        d.call_header(Method::GET, &p, "authorization", "Bearer not-a-key-000000")
            .status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        d.call(Method::DELETE, &p, "/v1/sandbox/{id}/", KEY_DEFAULT, None)
            .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        d.call(Method::GET, &p, "/v1/sandbox/{id}/", KEY_DEFAULT, None)
            .status,
        StatusCode::NOT_FOUND
    );
}

#[test]
fn org_limit_429_and_capacity_503() {
    let _g = serial();
    let mut d = Daemon::start("limits", &default_config("10.210.48.0/20"));
    // Host budget is 6 vCPU: 8 can never fit.
    let a = d.call(
        Method::POST,
        "/v1/sandbox",
        "/v1/sandbox",
        KEY_DEFAULT,
        Some(&json!({"vcpu": 8, "memory": 512})),
    );
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.body);
    assert!(a.body["message"].is_string());
    // `other` may hold 2 live sandboxes.
    for _ in 0..2 {
        let a = d.call(
            Method::POST,
            "/v1/sandbox",
            "/v1/sandbox",
            KEY_OTHER,
            Some(&json!({"memory": 512})),
        );
        assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    }
    let a = d.call(
        Method::POST,
        "/v1/sandbox",
        "/v1/sandbox",
        KEY_OTHER,
        Some(&json!({"memory": 512})),
    );
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "{}", a.body);
    // The default org is not affected by other's quota; 5 vCPU would exceed
    // the remaining 4 of the host budget → 503.
    let a = d.call(
        Method::POST,
        "/v1/sandbox",
        "/v1/sandbox",
        KEY_DEFAULT,
        Some(&json!({"vcpu": 5, "memory": 512})),
    );
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.body);
    let a = d.call(
        Method::POST,
        "/v1/sandbox",
        "/v1/sandbox",
        KEY_DEFAULT,
        Some(&json!({"vcpu": 4, "memory": 512})),
    );
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
}

#[test]
fn lifecycle_snapshot_resume_policy_and_redaction() {
    let _g = serial();
    let mut d = Daemon::start("life", &default_config("10.210.64.0/20"));
    let stored = json!({"mode": "custom", "allow_domains": ["Example.COM."]});
    let snap = make_snapshot(&mut d, KEY_DEFAULT, "base", Some(stored));
    assert_eq!(
        snap["network_policy"]["allow_domains"],
        json!(["example.com"]),
        "normalised: {snap}"
    );

    // Resume without a policy: the snapshot's applies.
    let a = d.call(
        Method::POST,
        "/v1/snapshot/resume",
        "/v1/snapshot/resume",
        KEY_DEFAULT,
        Some(&json!({"snapshot_name": "base"})),
    );
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    assert_eq!(a.body["network_policy"]["mode"], "custom");
    assert_eq!(a.body["state"], "running");
    assert_eq!(a.body["timeout"], 300, "timeout_min defaults to 5");
    let first = a.body["id"].as_str().expect("id").to_string();

    // Resume with a policy: it overrides; secrets are write-only.
    let secret = "Bearer sk-live-0123456789abcdef";
    let policy = json!({"mode": "custom", "allow_domains": ["*.pypi.org"], "allow_cidrs": ["192.168.7.0/24"],
        "transforms": [{"domain": "api.openai.com", "inject_headers": {"Authorization": secret}, "strip_headers": ["X-Api-Key"]}]});
    let a = d.call(
        Method::POST,
        "/v1/snapshot/resume",
        "/v1/snapshot/resume",
        KEY_DEFAULT,
        Some(&json!({"snapshot_name": "base", "timeout_min": 30, "auto_pause": true, "network_policy": policy})),
    );
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
    assert_eq!(a.body["timeout"], 1800);
    assert_eq!(a.body["auto_pause"], true);
    assert_eq!(
        a.body["network_policy"]["transforms"][0]["inject_headers"]["Authorization"],
        "[REDACTED]"
    );
    assert_eq!(
        a.body["network_policy"]["allow_domains"],
        json!(["*.pypi.org"])
    );
    let id = a.body["id"].as_str().expect("id").to_string();
    assert!(id.starts_with("sbx-"));
    let g = d.call(
        Method::GET,
        &format!("/v1/sandbox/{id}/"),
        "/v1/sandbox/{id}/",
        KEY_DEFAULT,
        None,
    );
    assert_eq!(g.status, StatusCode::OK);
    assert!(
        !g.body.to_string().contains("sk-live"),
        "secret in GET: {}",
        g.body
    );

    // Live policy update: validated atomically.
    let bad = json!({"mode": "custom", "allow_domains": ["ok.example.com", "*"]});
    let u = d.call(
        Method::PUT,
        &format!("/v1/sandbox/{id}/network_policy"),
        "/v1/sandbox/{id}/network_policy",
        KEY_DEFAULT,
        Some(&bad),
    );
    assert_eq!(u.status, StatusCode::BAD_REQUEST);
    let g = d.call(
        Method::GET,
        &format!("/v1/sandbox/{id}/"),
        "/v1/sandbox/{id}/",
        KEY_DEFAULT,
        None,
    );
    assert_eq!(
        g.body["network_policy"]["allow_domains"],
        json!(["*.pypi.org"]),
        "a rejected update changed the policy"
    );
    let u = d.call(
        Method::PUT,
        &format!("/v1/sandbox/{id}/network_policy"),
        "/v1/sandbox/{id}/network_policy",
        KEY_DEFAULT,
        Some(&json!({"mode": "deny-all"})),
    );
    assert_eq!(u.status, StatusCode::OK, "{}", u.body);
    assert_eq!(u.body["network_policy"]["mode"], "deny-all");

    // List, sort, filter, paginate.
    let l = d.call(
        Method::GET,
        "/v1/sandboxes?sort=created_at&order-by=asc&page=1&page-size=1",
        "/v1/sandboxes",
        KEY_DEFAULT,
        None,
    );
    assert_eq!(l.status, StatusCode::OK);
    assert_eq!(l.body["total_items"], 2);
    assert_eq!(l.body["items"].as_array().map(Vec::len), Some(1));
    let p = d.call(
        Method::POST,
        &format!("/v1/sandbox/{first}/pause"),
        "/v1/sandbox/{id}/pause",
        KEY_DEFAULT,
        None,
    );
    assert_eq!(p.status, StatusCode::CREATED);
    assert_eq!(p.body["state"], "paused");
    let l = d.call(
        Method::GET,
        "/v1/sandboxes?state=paused",
        "/v1/sandboxes",
        KEY_DEFAULT,
        None,
    );
    assert_eq!(l.body["total_items"], 1);
    assert_eq!(l.body["items"][0]["id"], first.as_str());

    let snaps = d.call(
        Method::GET,
        "/v1/snapshots?query=bas",
        "/v1/snapshots",
        KEY_DEFAULT,
        None,
    );
    assert_eq!(snaps.body["total_items"], 1);
    let s2 = d.call(
        Method::POST,
        &format!("/v1/sandbox/{id}/snapshot/create"),
        "/v1/sandbox/{id}/snapshot/create",
        KEY_DEFAULT,
        Some(&json!({"name": "base"})),
    );
    assert_eq!(
        s2.status,
        StatusCode::CONFLICT,
        "duplicate snapshot name: {}",
        s2.body
    );

    for sid in [&first, &id] {
        let r = d.delete_sandbox(sid);
        assert_eq!(r.status, StatusCode::NO_CONTENT);
    }
    let r = d.call(
        Method::DELETE,
        "/v1/snapshot/base",
        "/v1/snapshot/{id}",
        KEY_DEFAULT,
        None,
    );
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert!(!d.log().contains("sk-live"), "secret in the daemon log");
    let store = std::fs::read_dir(&d.state_dir).expect("state dir");
    for e in store.flatten() {
        use std::os::unix::fs::PermissionsExt;
        let mode = e.metadata().expect("meta").permissions().mode() & 0o077;
        assert_eq!(mode, 0, "{} is readable by others", e.path().display());
    }
}

#[test]
fn timeout_deletes_or_pauses() {
    let _g = serial();
    let mut d = Daemon::start("timeout", &default_config("10.210.80.0/20"));
    let a = d.call(
        Method::POST,
        "/v1/sandbox",
        "/v1/sandbox",
        KEY_DEFAULT,
        Some(&json!({"memory": 512, "timeout": 1})),
    );
    assert_eq!(a.status, StatusCode::CREATED);
    let gone = a.body["id"].as_str().expect("id").to_string();
    let a = d.call(
        Method::POST,
        "/v1/sandbox",
        "/v1/sandbox",
        KEY_DEFAULT,
        Some(&json!({"memory": 512, "timeout": 1, "auto_pause": true})),
    );
    let paused = a.body["id"].as_str().expect("id").to_string();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let g1 = d.call(
            Method::GET,
            &format!("/v1/sandbox/{gone}/"),
            "/v1/sandbox/{id}/",
            KEY_DEFAULT,
            None,
        );
        let g2 = d.call(
            Method::GET,
            &format!("/v1/sandbox/{paused}/"),
            "/v1/sandbox/{id}/",
            KEY_DEFAULT,
            None,
        );
        if g1.status == StatusCode::NOT_FOUND && g2.body["state"] == "paused" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "timeouts not honoured: {} / {}",
            g1.body,
            g2.body
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        !std::path::Path::new(&format!("/run/netns/tollgate-{gone}")).exists(),
        "expired sandbox left its namespace"
    );
}

#[test]
fn generated_key_is_printed_kept_0600_and_reused_after_restart() {
    let _g = serial();
    let prepared = Daemon::prepare("genkey", &default_config("10.210.96.0/20"));
    let state = prepared.state_dir.clone();
    let d = Daemon::restart_without_key(prepared);
    let kept = std::fs::read_to_string(state.join("api-key")).expect("key kept in the state dir");
    let key = kept.trim().to_string();
    assert!(key.len() >= 16, "weak generated key {key:?}");
    assert!(
        d.log().contains(&format!("TOLLGATE_API_KEY={key}")),
        "key not printed on first start"
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(state.join("api-key"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let a = d.call_header(
        Method::GET,
        "/v1/sandboxes",
        "authorization",
        &format!("Bearer {key}"),
    );
    assert_eq!(a.status, StatusCode::OK);
    let a = d.call_header(
        Method::GET,
        "/v1/sandboxes",
        "authorization",
        &format!("Bearer {KEY_DEFAULT}"),
    );
    assert_eq!(
        a.status,
        StatusCode::UNAUTHORIZED,
        "the env key must not apply when unset"
    );
    let stopped = d.stop_keep_state();
    let printed_before = std::fs::read_to_string(state.with_extension("log"))
        .unwrap_or_default()
        .matches("TOLLGATE_API_KEY=")
        .count();
    let d = Daemon::restart_without_key(stopped);
    let a = d.call_header(
        Method::GET,
        "/v1/sandboxes",
        "authorization",
        &format!("Bearer {key}"),
    );
    assert_eq!(
        a.status,
        StatusCode::OK,
        "the kept key no longer works after a restart"
    );
    assert_eq!(
        d.log().matches("TOLLGATE_API_KEY=").count(),
        printed_before,
        "a second key was generated"
    );
    drop(d);
    remove_state(&state);
}

// ---------------------------------------------------------------------------
// the sandbox CA

/// Where the daemon keeps sandbox `id`'s files that the sandbox sees.
fn host_files_dir(id: &str) -> std::path::PathBuf {
    Path::new("/run/tollgate/sandboxes").join(id)
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// A GET whose answer is not JSON: (status, content type, body).
fn get_text(d: &Daemon, path: &str, key: Option<&str>) -> (StatusCode, String, String) {
    let addr = d.url.trim_start_matches("http://").to_string();
    let auth = key.map_or_else(String::new, |k| format!("Authorization: Bearer {k}\r\n"));
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
    let raw = in_netns(&d.lab.host_ns, move || {
        let mut s = std::net::TcpStream::connect(&addr).expect("connect to the API");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(request.as_bytes()).expect("send");
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).expect("read answer");
        String::from_utf8(raw).expect("UTF-8 answer")
    });
    let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP answer");
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    let content_type = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    (
        StatusCode::from_u16(status).expect("status"),
        content_type,
        body.to_string(),
    )
}

/// `POST /v1/sandbox/{id}/process/execute` with `/bin/sh -c command`:
/// (exit code, stdout, stderr).
fn sh(d: &mut Daemon, id: &str, command: &str) -> (i64, String, String) {
    d.sh(id, command, 30)
}

/// The sandbox's CA certificate from the API (checked against the contract).
fn api_ca(d: &mut Daemon, id: &str) -> String {
    let path = format!("/v1/sandbox/{id}/ca.pem");
    let a = d.call(
        Method::GET,
        &path,
        "/v1/sandbox/{id}/ca.pem",
        KEY_DEFAULT,
        None,
    );
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let (status, content_type, pem) = get_text(d, &path, Some(KEY_DEFAULT));
    assert_eq!(status, StatusCode::OK);
    assert_eq!(content_type, "application/x-pem-file");
    assert!(
        pem.starts_with("-----BEGIN CERTIFICATE-----\n")
            && pem.trim_end().ends_with("-----END CERTIFICATE-----")
            && pem.matches("BEGIN").count() == 1,
        "not one PEM certificate: {pem:?}"
    );
    assert!(!pem.contains("PRIVATE"), "the API exposed a key: {pem}");
    pem
}

/// What the sandbox sees: the four variables pointing at one bundle that
/// holds the host's roots and `pem`; its gateway serves exactly `pem` over
/// v4 and v6 without credentials; the key is not readable.
fn assert_trusted_inside(d: &mut Daemon, id: &str, pem: &str) {
    let vars = "for v in SSL_CERT_FILE REQUESTS_CA_BUNDLE NODE_EXTRA_CA_CERTS CURL_CA_BUNDLE; \
                do printf '%s=%s\n' \"$v\" \"$(printenv \"$v\")\"; done";
    let (code, out, err) = sh(d, id, vars);
    assert_eq!(code, 0, "{err}");
    let bundle = "/run/tollgate/ca-bundle.crt";
    for v in [
        "SSL_CERT_FILE",
        "REQUESTS_CA_BUNDLE",
        "NODE_EXTRA_CA_CERTS",
        "CURL_CA_BUNDLE",
    ] {
        assert!(
            out.lines().any(|l| l == format!("{v}={bundle}")),
            "{v} not set to the bundle: {out}"
        );
    }
    let (code, inside, err) = sh(d, id, "cat \"$SSL_CERT_FILE\"");
    assert_eq!(code, 0, "{err}");
    assert!(inside.contains(pem), "the bundle lacks the sandbox CA");
    let system = std::fs::read_to_string("/etc/ssl/certs/ca-certificates.crt").unwrap_or_default();
    assert!(
        inside.len() >= system.len() + pem.len() && inside.starts_with(system.trim_end()),
        "the bundle does not start with the host's roots"
    );
    let (code, served, err) = sh(d, id, "curl -sS --max-time 10 http://10.0.2.2/ca.pem");
    assert_eq!((code, served.as_str()), (0, pem), "v4 endpoint: {err}");
    let (code, served, err) = sh(
        d,
        id,
        "curl -sS --max-time 10 -g 'http://[fd00:7467::2]/ca.pem'",
    );
    assert_eq!((code, served.as_str()), (0, pem), "v6 endpoint: {err}");
    let (code, _, _) = sh(
        d,
        id,
        "curl -sS --max-time 10 -o /dev/null -w '%{http_code}' http://10.0.2.2/ca.key | grep -qx 404",
    );
    assert_eq!(code, 0, "the endpoint serves something besides /ca.pem");
    let key = d.state_dir.join("ca").join(id).join("ca.key");
    let (code, out, _) = sh(d, id, &format!("cat '{}'", key.display()));
    assert_ne!(code, 0, "the CA key is readable inside the sandbox");
    assert!(!out.contains("PRIVATE"), "{out}");
}

#[test]
fn sandbox_ca_is_served_trusted_inside_kept_across_restarts_and_removed() {
    let _g = serial();
    // `[proxy] upstream_ca_file`: an extra upstream CA is accepted.
    let extra = TempDir::new("api-upstream-ca");
    let upstream_ca = extra.0.join("upstream-ca.pem");
    let upstream = SandboxCa::generate("upstream-test").expect("generate");
    std::fs::write(&upstream_ca, upstream.cert_pem()).expect("write upstream CA");
    let config = format!(
        "{}\n[proxy]\nupstream_ca_file = \"{}\"\n",
        default_config("10.210.112.0/20"),
        upstream_ca.display()
    );
    let mut d = Daemon::start("ca", &config);
    assert!(
        d.log()
            .contains("upstream trust for TLS interception loaded"),
        "{}",
        d.log()
    );
    let create = |d: &mut Daemon, body: Value| {
        let a = d.call(
            Method::POST,
            "/v1/sandbox",
            "/v1/sandbox",
            KEY_DEFAULT,
            Some(&body),
        );
        assert_eq!(a.status, StatusCode::CREATED, "{}", a.body);
        a.body["id"].as_str().expect("id").to_string()
    };
    let id = create(&mut d, json!({"memory": 512}));
    let denied = create(
        &mut d,
        json!({"memory": 512, "network_policy": {"mode": "deny-all"}}),
    );

    // The API: the certificate, never the key; 404 / 401 like every endpoint.
    let pem = api_ca(&mut d, &id);
    let pem_denied = api_ca(&mut d, &denied);
    assert_ne!(pem, pem_denied, "two sandboxes share a CA");
    for (path, key) in [
        (
            "/v1/sandbox/sbx-doesnotexist0000000/ca.pem".to_string(),
            KEY_DEFAULT,
        ),
        (format!("/v1/sandbox/{id}/ca.pem"), KEY_OTHER),
    ] {
        let a = d.call(Method::GET, &path, "/v1/sandbox/{id}/ca.pem", key, None);
        assert_eq!(a.status, StatusCode::NOT_FOUND, "{path}: {}", a.body);
        assert!(a.body["message"].is_string());
    }
    let a = d
        .call_raw(Method::GET, &format!("/v1/sandbox/{id}/ca.pem"), None, None)
        .expect("call");
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert!(a.body["message"].is_string());

    // The files: key 0600 in 0700 directories, and it belongs to the
    // certificate served.
    let dir = d.state_dir.join("ca").join(&id);
    assert_eq!(mode(&d.state_dir.join("ca")), 0o700);
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("ca.key")), 0o600);
    assert_eq!(
        std::fs::read_to_string(dir.join("ca.pem")).expect("ca.pem"),
        pem
    );
    let key = std::fs::read_to_string(dir.join("ca.key")).expect("ca.key");
    assert!(key.contains("PRIVATE KEY"));
    SandboxCa::from_pem(&id, &pem, &key).expect("the stored key signs the served certificate");
    assert!(!d.log().contains(key.trim()), "the key is in the log");

    // Inside: variables, bundle, the gateway endpoint (deny-all too), no key.
    assert_trusted_inside(&mut d, &id, &pem);
    assert_trusted_inside(&mut d, &denied, &pem_denied);
    let (code, _, _) = sh(
        &mut d,
        &denied,
        "curl -sS --max-time 3 http://198.51.100.10/ >/dev/null",
    );
    assert_ne!(code, 0, "deny-all let a connection out");

    // A restart keeps the CA: the guest's bundle stays valid.
    let stopped = d.stop_keep_state();
    let mut d = Daemon::restart(stopped);
    assert_eq!(api_ca(&mut d, &id), pem, "the CA changed across a restart");
    assert_trusted_inside(&mut d, &id, &pem);

    // A CA lost while the daemon was down is replaced, with a warning, and
    // the running sandbox's bundle follows.
    let stopped = d.stop_keep_state();
    std::fs::remove_dir_all(&dir).expect("remove the stored CA");
    let mut d = Daemon::restart(stopped);
    let replaced = api_ca(&mut d, &id);
    assert_ne!(replaced, pem);
    assert!(
        d.log().contains("cannot be reloaded"),
        "no warning: {}",
        d.log()
    );
    assert_eq!(mode(&dir.join("ca.key")), 0o600);
    assert_trusted_inside(&mut d, &id, &replaced);
    assert_eq!(api_ca(&mut d, &denied), pem_denied);

    // DELETE removes the key, the certificate and the sandbox's bundle.
    for sid in [&id, &denied] {
        let r = d.delete_sandbox(sid);
        assert_eq!(r.status, StatusCode::NO_CONTENT);
        assert!(
            !d.state_dir.join("ca").join(sid).exists(),
            "CA of {sid} left behind"
        );
        assert!(!host_files_dir(sid).exists(), "bundle of {sid} left behind");
        let a = d.call(
            Method::GET,
            &format!("/v1/sandbox/{sid}/ca.pem"),
            "/v1/sandbox/{id}/ca.pem",
            KEY_DEFAULT,
            None,
        );
        assert_eq!(a.status, StatusCode::NOT_FOUND);
    }
}

#[test]
fn unusable_upstream_ca_file_stops_the_daemon_with_a_clear_error() {
    require_root();
    let dir = TempDir::new("api-bad-upstream");
    let garbage = dir.0.join("not-a-ca.pem");
    std::fs::write(&garbage, "hello\n").expect("write");
    for file in [garbage, dir.0.join("missing.pem")] {
        let cfg = dir.0.join("config.toml");
        std::fs::write(
            &cfg,
            format!("[proxy]\nupstream_ca_file = \"{}\"\n", file.display()),
        )
        .expect("write config");
        let out = std::process::Command::new(tollgate_bin())
            .args(["serve", "--listen", "127.0.0.1:1", "--state-dir"])
            .arg(dir.0.join("state"))
            .arg("--config")
            .arg(&cfg)
            .env("TOLLGATE_API_KEY", KEY_DEFAULT)
            .output()
            .expect("run tollgate serve");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{}: started anyway", file.display());
        assert!(
            stderr.contains("upstream_ca_file") && stderr.contains(&*file.to_string_lossy()),
            "{}: unclear error: {stderr}",
            file.display()
        );
    }
}
