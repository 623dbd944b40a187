//! `proxi credential`: the operator credential file.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;

use proxi::credential::OperatorCredential;

#[derive(Subcommand)]
pub(crate) enum CredentialCommand {
    /// Create a new credential file (mode 0600) with a fresh operator token and audit key.
    Init {
        /// Where to write it: outside the data dir, where the agent cannot read it.
        file: PathBuf,
    },
}

/// Runs `proxi credential`.
pub(crate) fn run(command: CredentialCommand) -> Result<ExitCode> {
    match command {
        CredentialCommand::Init { file } => {
            let credential = OperatorCredential::create(&file)?;
            println!(
                "wrote {} (mode 0600): the operator token and the audit key",
                credential.path().display()
            );
            println!(
                "pass it to `proxi serve`, `proxi mcp`, `proxi mode` and `proxi audit verify` with --operator-credential; the audit anchor will be kept next to it"
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
