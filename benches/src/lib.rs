//! Shared bench harness: namespaces for privileged benches, timing helpers
//! and the result table every bench prints (figure, baseline, ratio, target).

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub mod rig;

/// One measured figure next to its baseline from the same run.
#[derive(Clone, Debug)]
pub struct Figure {
    /// What was measured, with its parameters.
    pub name: String,
    /// The measurement through tollgate.
    pub value: f64,
    /// The direct baseline (None for absolute figures such as attach time).
    pub baseline: Option<f64>,
    /// Unit of `value` and `baseline`.
    pub unit: &'static str,
    /// Target: the least acceptable ratio (higher is better) or, for
    /// figures without a baseline, the most acceptable value.
    pub target: Target,
}

/// What a figure must meet.
#[derive(Clone, Copy, Debug)]
pub enum Target {
    /// value / baseline must be at least this.
    MinRatio(f64),
    /// value must be at most this.
    MaxValue(f64),
    /// value / baseline must be at most this (costs: lower is better).
    MaxRatio(f64),
    /// No target: the figure is reported for information (it never misses).
    Report,
}

impl Figure {
    /// value / baseline.
    pub fn ratio(&self) -> Option<f64> {
        self.baseline.filter(|b| *b > 0.0).map(|b| self.value / b)
    }

    /// Does the figure meet its target?
    pub fn pass(&self) -> bool {
        match self.target {
            Target::MinRatio(t) => self.ratio().is_some_and(|r| r >= t),
            Target::MaxValue(t) => self.value <= t,
            Target::MaxRatio(t) => self.ratio().is_some_and(|r| r <= t),
            Target::Report => true,
        }
    }

    /// `PASS`, `MISS`, or `info` for a figure without a target.
    pub fn mark(&self) -> &'static str {
        match (self.target, self.pass()) {
            (Target::Report, _) => "info",
            (_, true) => "PASS",
            (_, false) => "MISS",
        }
    }

    /// The target as printed: `>= 0.9x`, `<= 5`, `<= 1.5x`, or `-`.
    pub fn target_text(&self) -> String {
        match self.target {
            Target::MinRatio(t) => format!(">= {t}x"),
            Target::MaxValue(t) => format!("<= {t}"),
            Target::MaxRatio(t) => format!("<= {t}x"),
            Target::Report => "-".to_string(),
        }
    }
}

/// A `kB` field of `/proc/<pid>/status` (`VmRSS:`, `VmHWM:`), or of
/// `/proc/meminfo` (`MemAvailable:`) when `pid` is None; NaN if unreadable.
pub fn proc_kib(pid: Option<u32>, field: &str) -> f64 {
    let path = pid.map_or("/proc/meminfo".to_string(), |p| format!("/proc/{p}/status"));
    std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(f64::NAN)
}

/// Prints the figures as a table.
pub fn print_summary(title: &str, figures: &[Figure]) {
    let label = |f: &Figure| format!("{} [{}]", f.name, f.unit);
    let w = figures
        .iter()
        .map(|f| label(f).chars().count())
        .max()
        .unwrap_or(0)
        .max(58);
    println!("\n== {title} ==");
    println!(
        "{:<w$} {:>14} {:>14} {:>8} {:>10}  result",
        "figure", "tollgate", "direct", "ratio", "target"
    );
    for f in figures {
        let base = f.baseline.map_or("-".to_string(), |b| format!("{b:.2}"));
        let ratio = f.ratio().map_or("-".to_string(), |r| format!("{r:.3}x"));
        println!(
            "{:<w$} {:>14} {:>14} {:>8} {:>10}  {}",
            label(f),
            format!("{:.2}", f.value),
            base,
            ratio,
            f.target_text(),
            f.mark()
        );
    }
}

/// Where reports go: `$CARGO_TARGET_DIR/tollgate-bench`, else the
/// workspace's `target/tollgate-bench`.
pub fn report_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("tollgate-bench")
}

/// Writes the figures of bench `bench` as `<bench>.json` and `<bench>.md`
/// under [`report_dir`], with free-form `notes` (parameters, copy mode…),
/// and prints where they went. A write failure is reported, not fatal.
pub fn write_report(bench: &str, title: &str, figures: &[Figure], notes: &[String]) {
    let dir = report_dir();
    let json = serde_json::json!({
        "bench": bench,
        "title": title,
        "unix_time": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        "notes": notes,
        "figures": figures.iter().map(|f| serde_json::json!({
            "name": f.name,
            "unit": f.unit,
            "value": f.value,
            "baseline": f.baseline,
            "ratio": f.ratio(),
            "target": f.target_text(),
            "result": f.mark(),
        })).collect::<Vec<_>>(),
    });
    let mut md = format!("# {title}\n\n");
    for n in notes {
        md.push_str(&format!("- {n}\n"));
    }
    if !notes.is_empty() {
        md.push('\n');
    }
    md.push_str("| figure | unit | tollgate | direct | ratio | target | result |\n");
    md.push_str("|---|---|---:|---:|---:|---|---|\n");
    for f in figures {
        md.push_str(&format!(
            "| {} | {} | {:.2} | {} | {} | {} | {} |\n",
            f.name,
            f.unit,
            f.value,
            f.baseline.map_or("-".to_string(), |b| format!("{b:.2}")),
            f.ratio().map_or("-".to_string(), |r| format!("{r:.3}x")),
            f.target_text().replace('<', "&lt;").replace('>', "&gt;"),
            f.mark()
        ));
    }
    let written = std::fs::create_dir_all(&dir).and_then(|()| {
        let text = serde_json::to_string_pretty(&json).map_err(std::io::Error::other)?;
        std::fs::write(dir.join(format!("{bench}.json")), text + "\n")?;
        std::fs::write(dir.join(format!("{bench}.md")), md)
    });
    match written {
        Ok(()) => println!(
            "report: {}/{bench}.json and {bench}.md",
            dir.canonicalize().unwrap_or_else(|_| dir.clone()).display()
        ),
        Err(e) => eprintln!("report: could not write under {}: {e}", dir.display()),
    }
    write_summary(&dir);
}

/// Reports older than this are not from the current `cargo bench` run and
/// are left out of the summary.
const SUMMARY_WINDOW_SECS: u64 = 30 * 60;

/// Rebuilds `summary.json` / `summary.md` from every bench report written
/// in the last [`SUMMARY_WINDOW_SECS`] and prints the figures that have a
/// target, with their marks: the last bench of a `cargo bench` run prints
/// the summary of the whole run.
pub fn write_summary(dir: &Path) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut reports: Vec<serde_json::Value> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "json")
                && p.file_stem().is_some_and(|s| s != "summary")
        })
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .filter_map(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .filter(|r| now.saturating_sub(r["unix_time"].as_u64().unwrap_or(0)) <= SUMMARY_WINDOW_SECS)
        .collect();
    reports.sort_by_key(|r| r["bench"].as_str().unwrap_or("").to_string());
    let mut md = String::from(
        "# tollgate benchmark summary\n\nEvery figure with a target, from the bench reports of this run (ratios against direct in the same run).\n\n| bench | figure | unit | tollgate | direct | ratio | target | result |\n|---|---|---|---:|---:|---:|---|---|\n",
    );
    let (mut pass, mut miss) = (0, 0);
    let mut lines = Vec::new();
    for r in &reports {
        let bench = r["bench"].as_str().unwrap_or("?");
        for f in r["figures"].as_array().into_iter().flatten() {
            let result = f["result"].as_str().unwrap_or("");
            if result == "info" {
                continue;
            }
            if result == "PASS" {
                pass += 1;
            } else {
                miss += 1;
            }
            let num =
                |v: &serde_json::Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.2}"));
            let ratio = f["ratio"]
                .as_f64()
                .map_or("-".to_string(), |x| format!("{x:.3}x"));
            let target = f["target"].as_str().unwrap_or("-");
            md.push_str(&format!(
                "| {bench} | {} | {} | {} | {} | {ratio} | {} | {result} |\n",
                f["name"].as_str().unwrap_or("?"),
                f["unit"].as_str().unwrap_or(""),
                num(&f["value"]),
                num(&f["baseline"]),
                target.replace('<', "&lt;").replace('>', "&gt;"),
            ));
            lines.push(format!(
                "{result:>4}  {bench:<9} {:<70} {:>12} vs {:>12}  {ratio:>8}  target {target}",
                f["name"].as_str().unwrap_or("?"),
                num(&f["value"]),
                num(&f["baseline"]),
            ));
        }
    }
    let benches: Vec<&str> = reports.iter().filter_map(|r| r["bench"].as_str()).collect();
    let summary = serde_json::json!({
        "unix_time": now,
        "benches": benches,
        "pass": pass,
        "miss": miss,
        "reports": reports,
    });
    md.push_str(&format!(
        "\n{pass} pass, {miss} miss ({}).\n",
        benches.join(", ")
    ));
    let text = serde_json::to_string_pretty(&summary).unwrap_or_default();
    if std::fs::write(dir.join("summary.json"), text + "\n").is_err()
        || std::fs::write(dir.join("summary.md"), &md).is_err()
    {
        eprintln!("summary: could not write under {}", dir.display());
        return;
    }
    println!(
        "\n== summary of this run so far ({}) ==",
        benches.join(", ")
    );
    for l in &lines {
        println!("{l}");
    }
    println!(
        "{pass} pass, {miss} miss; {}/summary.md and summary.json",
        dir.display()
    );
}

/// `TOLLGATE_BENCH_QUICK=1`: a shorter run.
pub fn quick() -> bool {
    std::env::var("TOLLGATE_BENCH_QUICK").is_ok_and(|v| v == "1")
}

/// The criterion settings of the micro benches: shorter warm-up and
/// measurement with `TOLLGATE_BENCH_QUICK=1`, `samples` samples.
pub fn criterion_config(samples: usize) -> criterion::Criterion {
    let (warm, measure) = if quick() {
        (Duration::from_millis(300), Duration::from_millis(700))
    } else {
        (Duration::from_secs(1), Duration::from_secs(3))
    };
    criterion::Criterion::default()
        .warm_up_time(warm)
        .measurement_time(measure)
        .sample_size(samples)
}

/// `TOLLGATE_BENCH_ROUNDS`, else `quick_default` / `full_default`.
pub fn rounds(quick_default: usize, full_default: usize) -> usize {
    std::env::var("TOLLGATE_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .filter(|r| *r > 0)
        .unwrap_or(if quick() { quick_default } else { full_default })
}

/// Fails (never skips) unless root; names the command to run.
pub fn require_root() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("these benches create network namespaces and load eBPF: run them as root with\n  sudo -E env \"PATH=$PATH\" cargo bench -p tollgate-benches");
        std::process::exit(1);
    }
}

/// The sandbox's address in [`Pair`].
pub const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// The router's address on the sandbox link in [`Pair`].
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// An address of the host namespace of [`Pair`], reached through the router.
pub const SINK: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// An address nothing owns: TCP to it is only answered when steered.
pub const STEERED_DST: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);

/// Removes the bench's pins on every path (a panic included).
pub struct Pins(pub PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// sandbox ns ⇄ veth ⇄ router ns ⇄ veth ⇄ host ns. The sink (198.51.100.1)
/// lives on the host, reached by forwarding through the router as in
/// production; steered connections land on a transparent listener in the
/// router.
pub struct Pair {
    /// The sandbox namespace (`eth0`, 10.0.2.15/24).
    pub s: String,
    /// The router namespace (`tgs0` towards the sandbox, `up0` towards the
    /// host; fwmark 0x1 → local delivery, for steered connections).
    pub r: String,
    /// The host namespace (198.51.100.1 on `lo`).
    pub h: String,
}

impl Pair {
    /// Creates the three namespaces `tgb-{s,r,h}-<pid>` (replacing leftovers
    /// of the same names).
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        let pid = std::process::id();
        let p = Self {
            s: format!("tgb-s-{pid}"),
            r: format!("tgb-r-{pid}"),
            h: format!("tgb-h-{pid}"),
        };
        for ns in [&p.s, &p.r, &p.h] {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .output();
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        let (s, r, h) = (p.s.as_str(), p.r.as_str(), p.h.as_str());
        ip(&[
            "-n", s, "link", "add", "eth0", "type", "veth", "peer", "name", "tgs0", "netns", r,
        ]);
        ip(&[
            "-n", r, "link", "add", "up0", "type", "veth", "peer", "name", "wan0", "netns", h,
        ]);
        ip(&["-n", s, "addr", "add", "10.0.2.15/24", "dev", "eth0"]);
        ip(&["-n", r, "addr", "add", "10.0.2.2/24", "dev", "tgs0"]);
        ip(&["-n", r, "addr", "add", "192.0.2.1/24", "dev", "up0"]);
        ip(&["-n", h, "addr", "add", "192.0.2.2/24", "dev", "wan0"]);
        ip(&["-n", h, "addr", "add", "198.51.100.1/32", "dev", "lo"]);
        for (ns, dev) in [(s, "eth0"), (r, "tgs0"), (r, "up0"), (h, "wan0")] {
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        ip(&["-n", s, "route", "add", "default", "via", "10.0.2.2"]);
        ip(&[
            "-n",
            r,
            "route",
            "add",
            "198.51.100.0/24",
            "via",
            "192.0.2.2",
        ]);
        ip(&["-n", h, "route", "add", "10.0.2.0/24", "via", "192.0.2.1"]);
        ip(&["netns", "exec", r, "sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        ip(&["-n", r, "rule", "add", "fwmark", "0x1/0x1", "lookup", "100"]);
        ip(&[
            "-n",
            r,
            "route",
            "add",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            "100",
        ]);
        p
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for ns in [&self.s, &self.r, &self.h] {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .output();
        }
    }
}

/// Runs `ip` with `args`; panics with its error output on failure.
pub fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `ip -batch -` with `script`.
pub fn ip_batch(script: &str) {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["-force", "-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("run ip -batch");
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).expect("write batch");
    }
    let st = child.wait().expect("wait ip -batch");
    assert!(st.success(), "ip -batch failed");
}

/// Runs `f` on a thread inside network namespace `ns` (sockets it creates
/// stay there).
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("setns {path}: {e}"));
        f()
    })
    .join()
    .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

/// The median of `xs` (which must not be empty).
pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// `p`-th percentile (0..=100) of `xs`.
pub fn percentile(mut xs: Vec<f64>, p: f64) -> f64 {
    xs.sort_by(f64::total_cmp);
    let i = ((p / 100.0) * (xs.len() - 1) as f64).round() as usize;
    xs[i.min(xs.len() - 1)]
}

/// Milliseconds of a duration.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A call to a bench daemon's API as the default organization, without the
/// OpenAPI check of the tests (benches time it): status and JSON body.
pub fn api_call(
    d: &tollgate_tests::daemon::Daemon,
    method: http::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> (http::StatusCode, serde_json::Value) {
    let a = d
        .call_raw(
            method.clone(),
            path,
            Some(tollgate_tests::daemon::KEY_DEFAULT),
            body.as_ref(),
        )
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    (a.status, a.body)
}
