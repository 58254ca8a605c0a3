//! `tollgate`: the daemon (`serve`), the CLI (`exec`), and the hidden
//! `sandbox-enter` helper the netns runtime re-executes itself as.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "tollgate", version, about = "Egress data plane and sandbox API for microVM sandboxes")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Internal: set up a sandbox's namespaces and exec its process.
    #[command(hide = true)]
    SandboxEnter(tollgate::runtime::netns::EnterArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        // Must run before any thread is started: setns(2) into a mount namespace
        // requires a single-threaded caller.
        Cmd::SandboxEnter(args) => tollgate::runtime::netns::enter_main(args),
    }
}
