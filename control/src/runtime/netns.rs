//! The network-namespace process runtime (STUB: being implemented).

/// Arguments of the hidden `tollgate sandbox-enter` subcommand.
#[derive(Debug, clap::Args)]
pub struct EnterArgs {
    /// Command to run.
    #[arg(last = true)]
    pub argv: Vec<String>,
}

/// Entry point of `tollgate sandbox-enter`; runs before any async runtime starts.
pub fn enter_main(_args: EnterArgs) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
