//! Bearer tokens for the two built-in principals, the registry of named ones, and
//! the constant-time check of presented tokens.
//!
//! Tokens come from `PROXI_OPERATOR_TOKEN` / `PROXI_AGENT_TOKEN`. A token that is
//! not configured is generated once and kept in `<data-dir>/tokens.json` (mode
//! 0600), so restarts keep it and local CLIs can read it. Tokens are never logged.
//! Named tokens (`proxi token add`) live in a [`PrincipalStore`] signed with a key
//! derived from the operator token (see [`crate::identities`]).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::identities::{Lookup, PrincipalStore, RegistryKey};
use crate::principal::Principal;

/// File name of generated tokens inside the data dir.
pub const TOKENS_FILE: &str = "tokens.json";
/// Environment variable holding the operator token.
pub const OPERATOR_TOKEN_ENV: &str = "PROXI_OPERATOR_TOKEN";
/// Environment variable holding the agent token.
pub const AGENT_TOKEN_ENV: &str = "PROXI_AGENT_TOKEN";
/// Shortest token accepted from configuration.
pub const MIN_TOKEN_LEN: usize = 16;
/// Longest token accepted from configuration or a request.
pub const MAX_TOKEN_LEN: usize = 512;

/// Token configuration problems.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// A configured token is too short or too long.
    #[error("{0} must be between {MIN_TOKEN_LEN} and {MAX_TOKEN_LEN} characters of visible ASCII")]
    Weak(&'static str),
    /// Both principals would share one token, so roles could not be told apart.
    #[error("the operator and agent tokens must differ")]
    Shared,
    /// The tokens file could not be read or written.
    #[error("cannot use the tokens file {path}: {error}")]
    File {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// The tokens file is not valid JSON of the expected shape.
    #[error("the tokens file {0} is malformed; delete it to have new tokens generated")]
    Malformed(PathBuf),
    /// The system random source failed.
    #[error("cannot generate a token: {0}")]
    Random(String),
}

/// Contents of `tokens.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensFile {
    /// The generated operator token, if the operator token is not configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operator_token: Option<String>,
    /// The generated agent token, if the agent token is not configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_token: Option<String>,
}

impl TokensFile {
    /// Reads `<data_dir>/tokens.json`; a missing file is empty.
    pub fn read(data_dir: &Path) -> Result<TokensFile, TokenError> {
        let path = data_dir.join(TOKENS_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|_| TokenError::Malformed(path)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(TokensFile::default()),
            Err(error) => Err(TokenError::File { path, error }),
        }
    }

    fn write(&self, data_dir: &Path) -> Result<PathBuf, TokenError> {
        let path = data_dir.join(TOKENS_FILE);
        let temporary = data_dir.join(format!("{TOKENS_FILE}.tmp"));
        let file_error = |error| TokenError::File {
            path: path.clone(),
            error,
        };
        crate::audit::create_private_dir(data_dir).map_err(file_error)?;
        let _ = std::fs::remove_file(&temporary);
        let mut file = std::fs::File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temporary)
            .map_err(file_error)?;
        let text = serde_json::to_string_pretty(self).unwrap_or_default();
        file.write_all(text.as_bytes()).map_err(file_error)?;
        file.sync_all().map_err(file_error)?;
        std::fs::rename(&temporary, &path).map_err(file_error)?;
        Ok(path)
    }
}

/// The tokens the server accepts: the two built-in ones, kept as digests for
/// constant-time comparison, and the registry of named ones, if attached.
#[derive(Clone)]
pub struct Tokens {
    /// `None` when this server has no operator (`proxi mcp` without an operator credential).
    operator: Option<[u8; 32]>,
    agent: [u8; 32],
    principals: Option<std::sync::Arc<dyn PrincipalStore>>,
}

/// The verdict on a presented token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Authentication {
    /// The token's holder.
    Accepted(Principal),
    /// No token matches (or it was revoked).
    Invalid,
    /// Not a built-in token, and the registry of named tokens does not verify, so
    /// none of its tokens is accepted (see [`crate::identities`]).
    RegistryUntrusted,
}

impl Authentication {
    /// The reason code a refusal is audited with (`None` when accepted).
    pub fn refusal_reason(&self) -> Option<&'static str> {
        match self {
            Authentication::Accepted(_) => None,
            Authentication::Invalid => Some("invalid_token"),
            Authentication::RegistryUntrusted => Some("registry_untrusted"),
        }
    }
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tokens { .. }")
    }
}

/// Where the tokens came from, so the server can say so without printing them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenSources {
    /// Set when at least one token lives in the tokens file.
    pub file: Option<PathBuf>,
}

impl Tokens {
    /// Uses configured tokens, or generated ones kept in `<data_dir>/tokens.json`.
    pub fn resolve(
        data_dir: &Path,
        operator: Option<String>,
        agent: Option<String>,
    ) -> Result<(Tokens, TokenSources), TokenError> {
        let configured = |value: Option<String>, name| match value {
            Some(token) if !token.is_empty() => check_strength(&token, name).map(|()| Some(token)),
            _ => Ok(None),
        };
        let operator = configured(operator, OPERATOR_TOKEN_ENV)?;
        let agent = configured(agent, AGENT_TOKEN_ENV)?;
        let mut file = TokensFile::read(data_dir)?;
        let mut changed = false;
        let mut pick = |configured: Option<String>, stored: &mut Option<String>| {
            if let Some(token) = configured {
                return Ok(token);
            }
            match stored {
                Some(token) if check_strength(token, "a stored token").is_ok() => Ok(token.clone()),
                _ => {
                    let token = generate_token()?;
                    *stored = Some(token.clone());
                    changed = true;
                    Ok(token)
                }
            }
        };
        let operator = pick(operator, &mut file.operator_token)?;
        let agent = pick(agent, &mut file.agent_token)?;
        if operator == agent {
            return Err(TokenError::Shared);
        }
        let path = data_dir.join(TOKENS_FILE);
        if changed {
            file.write(data_dir)?;
        } else if path.exists() {
            // Tighten permissions a user may have loosened.
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
        }
        let uses_file = file.operator_token.is_some() || file.agent_token.is_some();
        Ok((
            Tokens {
                operator: Some(digest(&operator)),
                agent: digest(&agent),
                principals: None,
            },
            TokenSources {
                file: uses_file.then_some(path),
            },
        ))
    }

    /// Builds a token set directly (tests, the in-process demo).
    pub fn new(operator: &str, agent: &str) -> Tokens {
        Tokens {
            operator: Some(digest(operator)),
            agent: digest(agent),
            principals: None,
        }
    }

    /// The key that signs the registry of named tokens: derived from the operator
    /// token, so `None` when this server has no operator.
    pub fn registry_key(&self) -> Option<RegistryKey> {
        self.operator
            .as_ref()
            .map(RegistryKey::from_operator_digest)
    }

    /// Also accepts the named tokens of `principals`.
    pub fn with_principals(mut self, principals: std::sync::Arc<dyn PrincipalStore>) -> Tokens {
        self.principals = Some(principals);
        self
    }

    /// The agent token only (configured, or generated into `<data_dir>/tokens.json`):
    /// no operator token is accepted, generated, stored or read from the data dir.
    /// For `proxi mcp`, whose data dir the agent's own user can read.
    pub fn resolve_without_operator(
        data_dir: &Path,
        agent: Option<String>,
    ) -> Result<(Tokens, TokenSources), TokenError> {
        let agent = match agent {
            Some(token) if !token.is_empty() => {
                check_strength(&token, AGENT_TOKEN_ENV)?;
                Some(token)
            }
            _ => None,
        };
        let mut file = TokensFile::read(data_dir)?;
        let path = data_dir.join(TOKENS_FILE);
        let agent = match (agent, &file.agent_token) {
            (Some(token), _) => token,
            (None, Some(token)) if check_strength(token, "a stored token").is_ok() => token.clone(),
            (None, _) => {
                let token = generate_token()?;
                file.agent_token = Some(token.clone());
                file.write(data_dir)?;
                token
            }
        };
        let uses_file = file.agent_token.as_deref() == Some(agent.as_str());
        Ok((
            Tokens {
                operator: None,
                agent: digest(&agent),
                principals: None,
            },
            TokenSources {
                file: uses_file.then_some(path),
            },
        ))
    }

    /// Whether any token grants the operator role here.
    pub fn has_operator(&self) -> bool {
        self.operator.is_some()
    }

    /// The principal a presented token belongs to, if any.
    pub fn authenticate(&self, presented: &str) -> Option<Principal> {
        match self.check(presented) {
            Authentication::Accepted(principal) => Some(principal),
            _ => None,
        }
    }

    /// The verdict on a presented token: a built-in one, else a named one of the
    /// registry (which re-reads its store if it changed, so a revocation counts at once).
    pub fn check(&self, presented: &str) -> Authentication {
        if presented.is_empty() || presented.len() > MAX_TOKEN_LEN {
            return Authentication::Invalid;
        }
        self.check_digest(&digest(presented))
    }

    /// [`Tokens::check`] for a token known by its SHA-256 only (a console session
    /// keeps the digest of the token it was opened with, to notice a revocation).
    pub fn check_digest(&self, presented: &[u8; 32]) -> Authentication {
        let presented = *presented;
        // Compare against both so timing does not reveal which one matched.
        let is_operator = self
            .operator
            .is_some_and(|operator| constant_time_eq(&presented, &operator));
        let is_agent = constant_time_eq(&presented, &self.agent);
        match (is_operator, is_agent) {
            (true, _) => Authentication::Accepted(Principal::operator()),
            (false, true) => Authentication::Accepted(Principal::agent()),
            (false, false) => match self
                .principals
                .as_ref()
                .map(|principals| principals.authenticate(&presented))
            {
                Some(Lookup::Found(principal)) => Authentication::Accepted(principal),
                Some(Lookup::Untrusted) => Authentication::RegistryUntrusted,
                Some(Lookup::Unknown) | None => Authentication::Invalid,
            },
        }
    }
}

/// Checks a configured token: visible ASCII, between the length limits.
pub(crate) fn check_strength(token: &str, name: &'static str) -> Result<(), TokenError> {
    let visible = token.bytes().all(|byte| byte.is_ascii_graphic());
    if visible && (MIN_TOKEN_LEN..=MAX_TOKEN_LEN).contains(&token.len()) {
        Ok(())
    } else {
        Err(TokenError::Weak(name))
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

fn constant_time_eq(left: &[u8; 32], right: &[u8; 32]) -> bool {
    left.iter()
        .zip(right)
        .fold(0u8, |difference, (a, b)| difference | (a ^ b))
        == 0
}

/// A fresh random token: 32 random bytes, hex encoded.
pub fn generate_token() -> Result<String, TokenError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|error| TokenError::Random(error.to_string()))?;
    Ok(format!("proxi_{}", hex::encode(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::principal::Role;

    #[test]
    fn generated_tokens_are_persisted_privately_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let (tokens, sources) = Tokens::resolve(dir.path(), None, None).unwrap();
        let path = sources.file.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let stored = TokensFile::read(dir.path()).unwrap();
        let operator = stored.operator_token.clone().unwrap();
        assert_eq!(
            tokens.authenticate(&operator).map(|p| p.role()),
            Some(Role::Operator)
        );
        let (again, _) = Tokens::resolve(dir.path(), None, None).unwrap();
        assert_eq!(TokensFile::read(dir.path()).unwrap(), stored);
        assert!(again.authenticate(&operator).is_some());
    }

    #[test]
    fn configured_tokens_win_and_are_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let (tokens, sources) = Tokens::resolve(
            dir.path(),
            Some("operator-secret-123456".into()),
            Some("agent-secret-1234567".into()),
        )
        .unwrap();
        assert_eq!(sources.file, None);
        assert!(!dir.path().join(TOKENS_FILE).exists());
        assert_eq!(
            tokens
                .authenticate("agent-secret-1234567")
                .map(|p| p.role()),
            Some(Role::Agent)
        );
        assert_eq!(tokens.authenticate("agent-secret-1234568"), None);
        assert_eq!(tokens.authenticate(""), None);
    }

    #[test]
    fn without_an_operator_no_operator_token_is_stored_or_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let stale = TokensFile {
            operator_token: Some("stale-operator-token-123".into()),
            agent_token: None,
        };
        stale.write(dir.path()).unwrap();
        let (tokens, _) = Tokens::resolve_without_operator(dir.path(), None).unwrap();
        assert!(!tokens.has_operator());
        assert_eq!(tokens.authenticate("stale-operator-token-123"), None);
        let stored = TokensFile::read(dir.path()).unwrap();
        let agent = stored.agent_token.unwrap();
        assert_eq!(
            tokens.authenticate(&agent).map(|p| p.role()),
            Some(Role::Agent)
        );
        let fresh = tempfile::tempdir().unwrap();
        Tokens::resolve_without_operator(fresh.path(), None).unwrap();
        assert_eq!(TokensFile::read(fresh.path()).unwrap().operator_token, None);
    }

    #[test]
    fn weak_or_shared_tokens_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Tokens::resolve(dir.path(), Some("short".into()), None),
            Err(TokenError::Weak(OPERATOR_TOKEN_ENV))
        ));
        let same = Some("the-same-token-for-both".to_owned());
        assert!(matches!(
            Tokens::resolve(dir.path(), same.clone(), same),
            Err(TokenError::Shared)
        ));
    }
}
