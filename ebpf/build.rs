//! Compiles each `bpf/<name>.bpf.c` into `$OUT_DIR/<name>.bpf.o` with clang
//! when clang and the libbpf headers are installed; otherwise copies the
//! committed `bpf/<name>.bpf.o`. `TOLLGATE_EBPF_PREBUILT=1` forces the
//! committed objects. `ebpf/check-object` runs the same compiler line and
//! compares.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// One object per attach point (keep in sync with `check-object`).
const PROGRAMS: &[&str] = &["egress", "lookup", "splice"];

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
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    for f in ["tollgate.h", "shared_maps.h"] {
        println!("cargo:rerun-if-changed={}", bpf_dir.join(f).display());
    }
    for p in PROGRAMS {
        for ext in ["bpf.c", "bpf.o"] {
            let path = bpf_dir.join(format!("{p}.{ext}"));
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    println!("cargo:rerun-if-env-changed=TOLLGATE_EBPF_PREBUILT");
    println!("cargo:rerun-if-env-changed=TOLLGATE_CLANG");

    let prebuilt = std::env::var("TOLLGATE_EBPF_PREBUILT").is_ok_and(|v| v == "1");
    let headers = Path::new("/usr/include/bpf/bpf_helpers.h").exists();
    let clang = match (prebuilt, find_clang(), headers) {
        (false, Some(clang), true) => Some(clang),
        (true, _, _) => None,
        (false, clang, _) => {
            let missing = if clang.is_none() {
                "clang"
            } else {
                "libbpf headers"
            };
            println!(
                "cargo:warning=using the committed ebpf/bpf/*.bpf.o ({missing} missing); \
                 install clang-19 and libbpf-dev to rebuild them"
            );
            None
        }
    };
    for p in PROGRAMS {
        let object = format!("{p}.bpf.o");
        let out = out_dir.join(&object);
        match &clang {
            Some(clang) => compile(clang, &bpf_dir, &format!("{p}.bpf.c"), &out)?,
            None => {
                std::fs::copy(bpf_dir.join(&object), &out)
                    .with_context(|| format!("copying the committed {object}"))?;
            }
        }
    }
    Ok(())
}

/// `$TOLLGATE_CLANG`, else `clang-19`, else `clang`, if it runs.
fn find_clang() -> Option<String> {
    let mut candidates = std::env::var("TOLLGATE_CLANG")
        .ok()
        .into_iter()
        .chain(["clang-19".to_owned(), "clang".to_owned()]);
    candidates.find(|c| {
        Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

fn compile(clang: &str, bpf_dir: &Path, source: &str, out: &Path) -> Result<()> {
    // Run inside bpf/ with a relative source path and a mapped prefix, so no
    // path of this machine ends up in the object's debug info.
    let status = Command::new(clang)
        .current_dir(bpf_dir)
        .args(CFLAGS)
        .arg(format!("-ffile-prefix-map={}=.", bpf_dir.display()))
        .args(["-c", source, "-o"])
        .arg(out)
        .status()
        .with_context(|| format!("running {clang}"))?;
    if !status.success() {
        bail!("{clang} failed to compile ebpf/bpf/{source} ({status})");
    }
    Ok(())
}
