//! `vmsnap img …`: qemu-img-compatible image commands (being written).

use std::process::ExitCode;

use crate::Globals;

/// Arguments of `vmsnap img`.
#[derive(Debug, clap::Args)]
pub struct ImgArgs {
    /// Placeholder until the qcow2 engine lands.
    pub rest: Vec<String>,
}

/// Runs an image command.
pub fn run(_args: ImgArgs, _globals: &Globals) -> anyhow::Result<ExitCode> {
    anyhow::bail!("img commands are being written")
}
