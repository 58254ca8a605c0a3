//! The official `leap0` Python SDK (PyPI) is a real client of tollgate: it
//! creates, executes in, snapshots, restores with a custom policy, gets,
//! lists, pauses and deletes against a real daemon, on both runtimes.

use std::path::PathBuf;
use std::process::Command;

use tollgate_tests::daemon::{default_config, Daemon, KEY_DEFAULT};

/// Python with `leap0` installed: `TOLLGATE_TEST_PYTHON`, else the venv the
/// test script makes under `target/`, else `python3`.
fn python() -> PathBuf {
    if let Ok(p) = std::env::var("TOLLGATE_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/sdk-venv/bin/python");
    if venv.exists() {
        return venv;
    }
    PathBuf::from("python3")
}

fn python_is_at_least_3_12(py: &PathBuf) -> bool {
    Command::new(py)
        .args([
            "-c",
            "import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)",
        ])
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn official_python_sdk_round_trip() {
    round_trip("sdk", &default_config("10.212.0.0/20"));
}

/// The same flow on QEMU microVMs: create (a restore of the template's
/// memory snapshot), snapshot, restore with a policy, execute, delete.
#[test]
fn official_python_sdk_round_trip_on_vms() {
    let config = format!(
        "{}\n{}",
        default_config("10.212.16.0/20"),
        tollgate_tests::daemon::vm_runtime_section()
    );
    round_trip("sdk-vm", &config);
}

fn round_trip(name: &str, config: &str) {
    let py = python();
    let probe = Command::new(&py).args(["-c", "import leap0"]).output();
    let ok = probe.as_ref().is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "the leap0 SDK is not importable with {}: run ./scripts/test (it creates target/sdk-venv), or \
         python3 -m venv target/sdk-venv && target/sdk-venv/bin/pip install leap0",
        py.display()
    );
    let d = Daemon::start(name, config);
    let sdk_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("sdk");
    // The daemon's API lives in its lab's host namespace.
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{}", d.lab.host_ns))
        .arg("--")
        .arg(&py)
        .arg(sdk_dir.join("roundtrip.py"));
    if !python_is_at_least_3_12(&py) {
        // leap0 needs Python 3.12's TypedDict; the shim supplies it on 3.11.
        cmd.env("PYTHONPATH", sdk_dir.join("py311"));
    }
    let out = cmd
        .env("LEAP0_BASE_URL", &d.url)
        .env("LEAP0_API_KEY", KEY_DEFAULT)
        .env("LEAP0_SDK_OTEL_ENABLED", "false")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "SDK round trip failed:\n{stdout}\n{stderr}\ndaemon log:\n{}",
        d.log()
    );
    assert!(stdout.contains("leap0 SDK round trip: OK"), "{stdout}");
    assert!(
        !d.log().contains("sk-sdk-secret"),
        "secret in the daemon log"
    );
}
