//! The operator credential file: the operator token and the audit key, kept outside
//! the data dir.
//!
//! The data dir belongs to whoever runs the server; under `proxi mcp` that is the
//! agent's own user. So the operator's secrets must live elsewhere: in a file the
//! operator creates (`proxi credential init FILE`), readable only by the server's
//! user (mode 0600, never inside the data dir), named by `--operator-credential`
//! or `PROXI_OPERATOR_CREDENTIAL`. The audit anchor is written next to it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::anchor::{AnchorError, Anchoring, AuditKey, write_private};
use crate::tokens::{TokenError, check_strength, generate_token};

/// Environment variable naming the credential file (the flag wins).
pub const OPERATOR_CREDENTIAL_ENV: &str = "PROXI_OPERATOR_CREDENTIAL";

/// Why a credential file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// The file could not be read or written.
    #[error("cannot use the operator credential {path}: {error}")]
    File {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// The file is not JSON of the expected shape.
    #[error(
        "the operator credential {0} is malformed (expected {{\"operator_token\": ..., \"audit_key\": <64 hex digits>}})"
    )]
    Malformed(PathBuf),
    /// Group or others may read the file.
    #[error(
        "the operator credential {path} is readable by others (mode {mode:o}); run chmod 600 on it"
    )]
    Exposed {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file lies in the data dir, which the server's (and under stdio the agent's) user owns.
    #[error(
        "the operator credential {0} is inside the data dir; keep it where the agent cannot read it"
    )]
    InsideDataDir(PathBuf),
    /// The token in the file is weak.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The key could not be generated.
    #[error(transparent)]
    Key(#[from] AnchorError),
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialFile {
    operator_token: String,
    audit_key: String,
}

/// A loaded operator credential.
#[derive(Clone)]
pub struct OperatorCredential {
    path: PathBuf,
    operator_token: String,
    audit_key: AuditKey,
}

impl std::fmt::Debug for OperatorCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorCredential")
            .field("path", &self.path)
            .field("audit_key", &self.audit_key)
            .finish_non_exhaustive()
    }
}

impl OperatorCredential {
    /// Creates a new credential file with a fresh token and key (mode 0600); refuses
    /// to overwrite an existing file.
    pub fn create(path: &Path) -> Result<OperatorCredential, CredentialError> {
        let credential = OperatorCredential {
            path: path.to_owned(),
            operator_token: generate_token()?,
            audit_key: AuditKey::generate()?,
        };
        let text = serde_json::to_vec_pretty(&CredentialFile {
            operator_token: credential.operator_token.clone(),
            audit_key: credential.audit_key.to_hex(),
        })
        .unwrap_or_default();
        write_private(path, &text, true).map_err(|error| CredentialError::File {
            path: path.to_owned(),
            error,
        })?;
        Ok(credential)
    }

    /// Reads `path`; refuses a file others can read or one inside `data_dir`.
    pub fn load(
        path: &Path,
        data_dir: Option<&Path>,
    ) -> Result<OperatorCredential, CredentialError> {
        let file_error = |error| CredentialError::File {
            path: path.to_owned(),
            error,
        };
        let mode = std::fs::metadata(path)
            .map_err(file_error)?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            return Err(CredentialError::Exposed {
                path: path.to_owned(),
                mode,
            });
        }
        if let Some(data_dir) = data_dir
            && let (Ok(file), Ok(dir)) = (path.canonicalize(), data_dir.canonicalize())
            && file.starts_with(dir)
        {
            return Err(CredentialError::InsideDataDir(path.to_owned()));
        }
        let text = std::fs::read_to_string(path).map_err(file_error)?;
        let parsed: CredentialFile =
            serde_json::from_str(&text).map_err(|_| CredentialError::Malformed(path.to_owned()))?;
        check_strength(&parsed.operator_token, "the credential's operator_token")?;
        let audit_key = AuditKey::from_hex(&parsed.audit_key)
            .ok_or_else(|| CredentialError::Malformed(path.to_owned()))?;
        Ok(OperatorCredential {
            path: path.to_owned(),
            operator_token: parsed.operator_token,
            audit_key,
        })
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The operator's bearer token.
    pub fn operator_token(&self) -> &str {
        &self.operator_token
    }

    /// The audit key, with the anchor file next to this credential.
    pub fn anchoring(&self) -> Anchoring {
        Anchoring::external(self.audit_key.clone(), &self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_created_credential_loads_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("operator.json");
        let created = OperatorCredential::create(&path).unwrap();
        assert!(
            OperatorCredential::create(&path).is_err(),
            "never overwrites"
        );
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let loaded = OperatorCredential::load(&path, None).unwrap();
        assert_eq!(loaded.operator_token(), created.operator_token());
        assert_eq!(
            loaded.anchoring().key().id(),
            created.anchoring().key().id()
        );
        assert!(loaded.anchoring().is_external());
        assert_eq!(
            loaded.anchoring().anchor_path(),
            dir.path().join("operator.json.anchor")
        );
    }

    #[test]
    fn exposed_or_misplaced_credentials_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("operator.json");
        OperatorCredential::create(&path).unwrap();
        assert!(matches!(
            OperatorCredential::load(&path, Some(dir.path())),
            Err(CredentialError::InsideDataDir(_))
        ));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            OperatorCredential::load(&path, None),
            Err(CredentialError::Exposed { mode: 0o644, .. })
        ));
    }
}
