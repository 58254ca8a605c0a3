//! Shared bench harness: namespaces for privileged benches, timing helpers
//! and the result table every bench prints (figure, baseline, ratio, target).

use std::fs::File;
use std::os::fd::AsFd;
use std::process::Command;
use std::time::Duration;

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
        }
    }
}

/// Prints the figures as a table.
pub fn print_summary(title: &str, figures: &[Figure]) {
    println!("\n== {title} ==");
    println!(
        "{:<58} {:>14} {:>14} {:>8} {:>10}  result",
        "figure", "tollgate", "direct", "ratio", "target"
    );
    for f in figures {
        let base = f.baseline.map_or("-".to_string(), |b| format!("{b:.2}"));
        let ratio = f.ratio().map_or("-".to_string(), |r| format!("{r:.3}x"));
        let target = match f.target {
            Target::MinRatio(t) => format!(">= {t}x"),
            Target::MaxValue(t) => format!("<= {t}"),
        };
        println!(
            "{:<58} {:>14} {:>14} {:>8} {:>10}  {}",
            format!("{} [{}]", f.name, f.unit),
            format!("{:.2}", f.value),
            base,
            ratio,
            target,
            if f.pass() { "PASS" } else { "MISS" }
        );
    }
}

/// Fails (never skips) unless root; names the command to run.
pub fn require_root() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("these benches create network namespaces and load eBPF: run them as root with\n  sudo -E env \"PATH=$PATH\" cargo bench -p tollgate-benches");
        std::process::exit(1);
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
