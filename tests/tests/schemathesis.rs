//! Privileged: the API fuzzed from its own OpenAPI document by schemathesis
//! (PyPI, installed into `target/schemathesis-venv` by `./scripts/test`)
//! against a live daemon: every operation, examples, coverage, fuzzing and
//! stateful phases, a bounded number of examples. Fails on any 5xx, any
//! response that does not match its documented schema, status code or
//! content type.

use std::path::PathBuf;
use std::process::Command;

use tollgate_tests::daemon::{Daemon, API_PORT, KEY_DEFAULT};

fn schemathesis() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/schemathesis-venv/bin/schemathesis");
    assert!(
        bin.exists(),
        "schemathesis is not installed at {}: run ./scripts/test (it installs it), or \
         python3 -m venv target/schemathesis-venv && target/schemathesis-venv/bin/pip install schemathesis",
        bin.display()
    );
    bin
}

fn config() -> String {
    r#"
[[organizations]]
name = "default"
api_keys = []
max_sandboxes = 8

[host]
vcpu = 64
memory_mib = 65536

[network]
pool = "10.216.0.0/20"
"#
    .to_owned()
}

#[test]
fn the_api_passes_schemathesis_from_its_openapi_document() {
    let bin = schemathesis();
    let d = Daemon::start("schemathesis", &config());
    let examples = std::env::var("TOLLGATE_SCHEMATHESIS_EXAMPLES").unwrap_or_else(|_| "25".into());
    let report = d.state_dir.with_extension("schemathesis.txt");
    let out = Command::new("ip")
        .args(["netns", "exec", &d.lab.host_ns])
        .arg(&bin)
        .args([
            "run",
            &format!("http://127.0.0.1:{API_PORT}/v1/openapi.json"),
            "--header",
            &format!("Authorization: Bearer {KEY_DEFAULT}"),
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance",
            "--phases",
            "examples,coverage,fuzzing,stateful",
            "--max-examples",
            &examples,
            "--workers",
            "1",
            "--seed",
            "1",
            "--no-color",
            "--suppress-health-check",
            "all",
            "--report",
            "vcr",
            "--report-dir",
        ])
        .arg(d.state_dir.with_extension("schemathesis-cassettes"))
        .env("SCHEMATHESIS_HOOKS", "")
        .output()
        .expect("run schemathesis");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::write(&report, &text);
    eprintln!("{text}");
    assert!(
        out.status.success(),
        "schemathesis found failures (report {}):\n{text}",
        report.display()
    );
    // It really ran the operations.
    assert!(text.contains("passed"), "{text}");
}
