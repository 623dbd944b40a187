//! `proxi token`: named principals (add, list, revoke) in the data dir's registry.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::{Args, Subcommand, ValueEnum};

use proxi::credential::OperatorCredential;
use proxi::identities::{DataDirPrincipals, IdentityError, PrincipalStore, RegistryKey};
use proxi::principal::Role;
use proxi::text::escape;
use proxi::tokens::{OPERATOR_TOKEN_ENV, TokensFile};

use super::non_empty_env;

#[derive(Subcommand)]
pub(crate) enum TokenCommand {
    /// Issue a token for a new named principal; prints the token once (only its SHA-256 is kept).
    Add {
        /// The principal's name: a lowercase letter, then up to 31 of a-z, 0-9, '-', '_'.
        name: String,
        /// What the token may do.
        #[arg(long, value_enum)]
        role: RoleArg,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Show the named principals: names, roles, when created and revoked (never tokens).
    List {
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        registry: RegistryArgs,
    },
    /// Stop a principal's token at once, in a running server too; the name is not reused.
    Revoke {
        /// The principal's name.
        name: String,
        #[command(flatten)]
        registry: RegistryArgs,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum RoleArg {
    Operator,
    Agent,
}

/// Where the registry is and the operator secret that signs it (as for `proxi serve`).
#[derive(Args)]
pub(crate) struct RegistryArgs {
    /// The server's data dir, which holds principals.json.
    #[arg(long, default_value = "./proxi-data")]
    data_dir: PathBuf,
    /// Operator credential file the server uses; its operator token signs the registry
    /// (else PROXI_OPERATOR_TOKEN, else the operator token in the data dir's tokens.json).
    #[arg(long, env = "PROXI_OPERATOR_CREDENTIAL", value_name = "FILE")]
    operator_credential: Option<PathBuf>,
}

impl RegistryArgs {
    /// The registry, keyed with the operator token the server uses.
    fn open(&self) -> Result<DataDirPrincipals> {
        let credential = self
            .operator_credential
            .as_deref()
            .map(|path| OperatorCredential::load(path, Some(&self.data_dir)))
            .transpose()?;
        let operator = match (&credential, non_empty_env(OPERATOR_TOKEN_ENV)) {
            (Some(credential), Some(token)) if token != credential.operator_token() => bail!(
                "{OPERATOR_TOKEN_ENV} differs from the operator token in {}; set only one of them",
                credential.path().display()
            ),
            (Some(credential), _) => Some(credential.operator_token().to_owned()),
            (None, Some(token)) => Some(token),
            (None, None) => TokensFile::read(&self.data_dir)?.operator_token,
        };
        let Some(operator) = operator else {
            return Err(IdentityError::NoOperatorSecret.into());
        };
        let principals = DataDirPrincipals::new(
            &self.data_dir,
            Some(RegistryKey::from_operator_token(&operator)),
        );
        Ok(match &credential {
            Some(credential) => principals.with_credential(credential.path()),
            None => principals,
        })
    }
}

/// Runs `proxi token`.
pub(crate) fn run(command: TokenCommand) -> Result<ExitCode> {
    let mut stdout = std::io::stdout().lock();
    match command {
        TokenCommand::Add {
            name,
            role,
            registry,
        } => {
            let role = match role {
                RoleArg::Operator => Role::Operator,
                RoleArg::Agent => Role::Agent,
            };
            let issued = registry.open()?.add(&name, role)?;
            eprintln!(
                "added {} ({}); its token follows and is shown only this once:",
                issued.entry.name,
                issued.entry.role.role()
            );
            writeln!(stdout, "{}", issued.token)?;
        }
        TokenCommand::List { json, registry } => {
            let listed = registry.open()?.list()?;
            if json {
                writeln!(stdout, "{}", serde_json::to_string_pretty(&listed)?)?;
            } else {
                writeln!(
                    stdout,
                    "{:<32}  {:<8}  {:<20}  REVOKED",
                    "NAME", "ROLE", "CREATED"
                )?;
                for entry in listed {
                    writeln!(
                        stdout,
                        "{:<32}  {:<8}  {:<20}  {}",
                        escape(&entry.name),
                        entry.role.role(),
                        escape(&entry.created),
                        entry.revoked.as_deref().map_or("-".into(), escape)
                    )?;
                }
            }
        }
        TokenCommand::Revoke { name, registry } => {
            let revoked = registry.open()?.revoke(&name)?;
            writeln!(
                stdout,
                "revoked {}: its token is refused from now on",
                revoked.name
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
