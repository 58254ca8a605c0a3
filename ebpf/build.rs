//! Compiles `bpf/egress.bpf.c` into `$OUT_DIR/egress.bpf.o` with clang when
//! clang and the libbpf headers are installed; otherwise copies the committed
//! `bpf/egress.bpf.o`. `TOLLGATE_EBPF_PREBUILT=1` forces the committed object.
//! `ebpf/check-object` runs the same compiler line and compares.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Flags shared with `check-object` (keep both in sync).
const CFLAGS: &[&str] = &[
    "-target",
    "bpf",
    "-O2",
    "-g",
    "-Wall",
    "-Werror",
    "-I/usr/include/x86_64-linux-gnu",
    "-fdebug-compilation-dir=.",
];

fn main() -> Result<()> {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let bpf_dir = manifest.join("bpf");
    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("egress.bpf.o");
    for f in ["egress.bpf.c", "tollgate.h", "egress.bpf.o"] {
        println!("cargo:rerun-if-changed={}", bpf_dir.join(f).display());
    }
    println!("cargo:rerun-if-env-changed=TOLLGATE_EBPF_PREBUILT");
    println!("cargo:rerun-if-env-changed=TOLLGATE_CLANG");

    let prebuilt = std::env::var("TOLLGATE_EBPF_PREBUILT").is_ok_and(|v| v == "1");
    let clang = find_clang();
    let headers = Path::new("/usr/include/bpf/bpf_helpers.h").exists();
    match (prebuilt, clang, headers) {
        (false, Some(clang), true) => compile(&clang, &bpf_dir, &out),
        (_, clang, _) => {
            if !prebuilt {
                println!(
                    "cargo:warning=using the committed ebpf/bpf/egress.bpf.o ({} missing); \
                     install clang-19 and libbpf-dev to rebuild it",
                    if clang.is_none() {
                        "clang"
                    } else {
                        "libbpf headers"
                    }
                );
            }
            std::fs::copy(bpf_dir.join("egress.bpf.o"), &out)
                .context("copying the committed egress.bpf.o")?;
            Ok(())
        }
    }
}

/// `$TOLLGATE_CLANG`, else `clang-19`, else `clang`, if it runs.
fn find_clang() -> Option<String> {
    let candidates = std::env::var("TOLLGATE_CLANG")
        .ok()
        .into_iter()
        .chain(["clang-19".to_owned(), "clang".to_owned()]);
    for c in candidates {
        if Command::new(&c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return Some(c);
        }
    }
    None
}

fn compile(clang: &str, bpf_dir: &Path, out: &Path) -> Result<()> {
    // Run inside bpf/ with a relative source path and a mapped prefix, so no
    // path of this machine ends up in the object's debug info.
    let status = Command::new(clang)
        .current_dir(bpf_dir)
        .args(CFLAGS)
        .arg(format!("-ffile-prefix-map={}=.", bpf_dir.display()))
        .args(["-c", "egress.bpf.c", "-o"])
        .arg(out)
        .status()
        .with_context(|| format!("running {clang}"))?;
    if !status.success() {
        bail!("{clang} failed to compile ebpf/bpf/egress.bpf.c ({status})");
    }
    Ok(())
}
