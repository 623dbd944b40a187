//! Anchoring the audit chain outside the data dir.
//!
//! The SHA-256 chain alone can be recomputed by anyone who can write `audit.db`, and
//! any prefix of a valid chain is itself a valid chain. So every record also carries
//! an HMAC-SHA-256 of its hash under the [`AuditKey`] (which, since the hash covers
//! the previous hash, authenticates the whole prefix), and after each commit the
//! writer stores a MAC'd high-water mark, the [`Anchor`]: the newest sequence number
//! and its hash. Whoever cannot read the key cannot forge a record or a later anchor;
//! whoever cannot write the anchor file cannot hide a deleted tail.
//!
//! Where the key and the anchor live decides what this protects against:
//! - with an operator credential file ([`crate::credential`]), the key is in that
//!   file and the anchor next to it (`<credential>.anchor`), both outside the data dir;
//! - otherwise both live in the data dir (`audit.key`, `audit.anchor`), which only
//!   catches edits by someone who cannot read the data dir's files.

use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use hmac::{KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// The data dir's own key file, used when no operator credential is configured.
pub const DATA_DIR_KEY_FILE: &str = "audit.key";
/// The data dir's own anchor file, used when no operator credential is configured.
pub const DATA_DIR_ANCHOR_FILE: &str = "audit.anchor";
/// Suffix appended to the credential file's path to name its anchor file.
pub const CREDENTIAL_ANCHOR_SUFFIX: &str = ".anchor";
/// Every anchor is padded with spaces to this many bytes, so that it can be
/// rewritten in place (one `pwrite`, no stale tail) rather than by rename.
const ANCHOR_LEN: usize = 320;

type HmacSha256 = hmac::Hmac<Sha256>;

/// Problems with the audit key or the anchor file.
#[derive(Debug, thiserror::Error)]
pub enum AnchorError {
    /// A key file or anchor file could not be read or written.
    #[error("cannot use {path}: {error}")]
    File {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// A key is not 64 hex digits.
    #[error("the audit key in {0} must be 64 hex digits")]
    BadKey(PathBuf),
    /// The anchor file is not valid JSON of the expected shape.
    #[error("the audit anchor {0} is malformed")]
    Malformed(PathBuf),
    /// The system random source failed.
    #[error("cannot generate an audit key: {0}")]
    Random(String),
}

/// The HMAC-SHA-256 key that authenticates records and anchors.
#[derive(Clone)]
pub struct AuditKey {
    bytes: [u8; 32],
    /// HMAC state with the key already absorbed: cloning it saves two compressions per MAC.
    keyed: HmacSha256,
    id: String,
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AuditKey {{ id: {} }}", self.id)
    }
}

impl AuditKey {
    /// A key from its 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> AuditKey {
        // HMAC accepts keys of any length, so this cannot fail.
        let keyed = <HmacSha256 as KeyInit>::new_from_slice(&bytes)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        let id = hex::encode(&mac(&keyed, &[b"proxi-audit-key-id-v1"])[..8]);
        AuditKey { bytes, keyed, id }
    }

    /// Parses 64 hex digits; `None` for anything else.
    pub fn from_hex(text: &str) -> Option<AuditKey> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut bytes).ok()?;
        Some(AuditKey::from_bytes(bytes))
    }

    /// A fresh random key.
    pub fn generate() -> Result<AuditKey, AnchorError> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|error| AnchorError::Random(error.to_string()))?;
        Ok(AuditKey::from_bytes(bytes))
    }

    /// The key as 64 hex digits, for writing a credential file.
    pub fn to_hex(&self) -> String {
        hex::encode(self.bytes)
    }

    /// A public identifier of the key (16 hex digits, derived by HMAC, reveals nothing
    /// of the key), so a reader can tell a wrong key from a forged record.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The value stored in a record's `mac` column: `<key id>:<HMAC of the record hash>`.
    pub fn record_mac(&self, record_hash: &str) -> String {
        let tag = mac(&self.keyed, &[b"proxi-record-v1\0", record_hash.as_bytes()]);
        format!("{}:{}", self.id, hex::encode(tag))
    }

    /// Checks a record's stored `mac` column against its hash.
    pub fn check_record(&self, record_hash: &str, stored: Option<&str>) -> MacCheck {
        let Some(stored) = stored else {
            return MacCheck::Missing;
        };
        match stored.split_once(':') {
            Some((id, _)) if id != self.id => MacCheck::OtherKey(id.chars().take(16).collect()),
            Some(_) if constant_time_eq(stored, &self.record_mac(record_hash)) => MacCheck::Valid,
            _ => MacCheck::Invalid,
        }
    }

    fn anchor_mac(&self, seq: u64, hash: &str) -> String {
        hex::encode(mac(
            &self.keyed,
            &[b"proxi-anchor-v1\0", &seq.to_be_bytes(), hash.as_bytes()],
        ))
    }
}

/// The verdict on one record's MAC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MacCheck {
    /// Written by a holder of this key.
    Valid,
    /// The record carries no MAC.
    Missing,
    /// The MAC names another key (its id is given).
    OtherKey(String),
    /// The MAC names this key but does not match: the record or its hash was forged.
    Invalid,
}

fn mac(keyed: &HmacSha256, parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = keyed.clone();
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// Compares two MACs in time that depends on their length only.
pub(crate) fn constant_time_eq(left: &str, right: &str) -> bool {
    left.len() == right.len()
        && left
            .bytes()
            .zip(right.bytes())
            .fold(0u8, |difference, (a, b)| difference | (a ^ b))
            == 0
}

/// The MAC'd high-water mark: the newest record the writer committed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Anchor {
    /// Sequence number of the newest committed record (0: none yet).
    pub seq: u64,
    /// That record's hash (the genesis hash for 0).
    pub hash: String,
    /// Id of the key that made `mac`.
    pub key_id: String,
    /// HMAC over `seq` and `hash`.
    pub mac: String,
}

impl Anchor {
    /// Whether `key` made this anchor.
    pub fn is_authentic(&self, key: &AuditKey) -> bool {
        self.key_id == key.id()
            && constant_time_eq(&self.mac, &key.anchor_mac(self.seq, &self.hash))
    }
}

/// Where the audit key and the anchor live, and whether that is outside the data dir.
#[derive(Clone, Debug)]
pub struct Anchoring {
    key: AuditKey,
    anchor_path: PathBuf,
    external: bool,
}

impl Anchoring {
    /// Key and anchor held with the operator credential: `anchor_path` is the
    /// credential's path with [`CREDENTIAL_ANCHOR_SUFFIX`] appended.
    pub fn external(key: AuditKey, credential_path: &Path) -> Anchoring {
        let mut anchor = credential_path.as_os_str().to_owned();
        anchor.push(CREDENTIAL_ANCHOR_SUFFIX);
        Anchoring {
            key,
            anchor_path: PathBuf::from(anchor),
            external: true,
        }
    }

    /// Key and anchor inside the data dir; the key is generated (0600) on first use.
    pub fn in_data_dir(data_dir: &Path) -> Result<Anchoring, AnchorError> {
        let path = data_dir.join(DATA_DIR_KEY_FILE);
        let file_error = |error| AnchorError::File {
            path: path.clone(),
            error,
        };
        let key = match std::fs::read_to_string(&path) {
            Ok(text) => {
                AuditKey::from_hex(&text).ok_or_else(|| AnchorError::BadKey(path.clone()))?
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                crate::audit::create_private_dir(data_dir).map_err(file_error)?;
                let key = AuditKey::generate()?;
                write_private(&path, key.to_hex().as_bytes(), true).map_err(file_error)?;
                key
            }
            Err(error) => return Err(file_error(error)),
        };
        Ok(Anchoring {
            key,
            anchor_path: data_dir.join(DATA_DIR_ANCHOR_FILE),
            external: false,
        })
    }

    /// Like [`Anchoring::in_data_dir`], but never creates a key: for readers such as
    /// `audit verify`, which must not change the data dir.
    pub fn existing_in_data_dir(data_dir: &Path) -> Result<Anchoring, AnchorError> {
        let path = data_dir.join(DATA_DIR_KEY_FILE);
        let text = std::fs::read_to_string(&path).map_err(|error| AnchorError::File {
            path: path.clone(),
            error,
        })?;
        let key = AuditKey::from_hex(&text).ok_or(AnchorError::BadKey(path))?;
        Ok(Anchoring {
            key,
            anchor_path: data_dir.join(DATA_DIR_ANCHOR_FILE),
            external: false,
        })
    }

    /// The audit key that MACs every record and the anchor.
    pub fn key(&self) -> &AuditKey {
        &self.key
    }

    /// Where the anchor file lives.
    pub fn anchor_path(&self) -> &Path {
        &self.anchor_path
    }

    /// True when key and anchor live outside the data dir (with the operator credential).
    pub fn is_external(&self) -> bool {
        self.external
    }

    /// Reads the anchor; `None` if none was written yet.
    pub fn read_anchor(&self) -> Result<Option<Anchor>, AnchorError> {
        match std::fs::read_to_string(&self.anchor_path) {
            Ok(text) => serde_json::from_str(&text)
                .map(Some)
                .map_err(|_| AnchorError::Malformed(self.anchor_path.clone())),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(AnchorError::File {
                path: self.anchor_path.clone(),
                error,
            }),
        }
    }

    /// Replaces the anchor with one for (`seq`, `hash`), atomically (write, then rename).
    ///
    /// Not fsynced: this runs after every commit, and a second fsync per batch would
    /// halve group commit. After a power loss the anchor may therefore lag behind the
    /// trail (never run ahead of what was committed before it was written).
    pub fn write_anchor(&self, seq: u64, hash: &str) -> Result<(), AnchorError> {
        let mut temporary = self.anchor_path.as_os_str().to_owned();
        temporary.push(".tmp");
        let temporary = PathBuf::from(temporary);
        let file_error = |error| AnchorError::File {
            path: self.anchor_path.clone(),
            error,
        };
        let text = self.anchor_bytes(seq, hash);
        let _ = std::fs::remove_file(&temporary);
        write_private(&temporary, &text, false).map_err(file_error)?;
        std::fs::rename(&temporary, &self.anchor_path).map_err(file_error)
    }

    /// Opens the anchor (written by [`Anchoring::write_anchor`] first) for cheap
    /// in-place updates after each commit.
    pub fn open_for_updates(&self) -> Result<AnchorFile, AnchorError> {
        let file = std::fs::File::options()
            .write(true)
            .open(&self.anchor_path)
            .map_err(|error| AnchorError::File {
                path: self.anchor_path.clone(),
                error,
            })?;
        Ok(AnchorFile {
            anchoring: self.clone(),
            file,
        })
    }

    fn anchor_bytes(&self, seq: u64, hash: &str) -> Vec<u8> {
        let anchor = Anchor {
            seq,
            hash: hash.to_owned(),
            key_id: self.key.id().to_owned(),
            mac: self.key.anchor_mac(seq, hash),
        };
        let mut text = serde_json::to_vec(&anchor).unwrap_or_default();
        // Trailing whitespace is valid JSON.
        text.resize(text.len().max(ANCHOR_LEN), b' ');
        text
    }
}

/// The anchor file, open for updates in place.
///
/// A rename per commit costs far more than the commit's other file work; one
/// `pwrite` of a fixed-size block at offset 0 replaces the whole content instead.
/// Not fsynced (see [`Anchoring::write_anchor`]).
#[derive(Debug)]
pub struct AnchorFile {
    anchoring: Anchoring,
    file: std::fs::File,
}

impl AnchorFile {
    /// Records (`seq`, `hash`) as the newest committed record.
    pub fn update(&self, seq: u64, hash: &str) -> Result<(), AnchorError> {
        self.file
            .write_all_at(&self.anchoring.anchor_bytes(seq, hash), 0)
            .map_err(|error| AnchorError::File {
                path: self.anchoring.anchor_path.clone(),
                error,
            })
    }

    /// The key that MACs the anchor and the records.
    pub fn key(&self) -> &AuditKey {
        self.anchoring.key()
    }
}

/// Creates `path` (which must not exist) with mode 0600 and `contents`; `sync` fsyncs it.
pub(crate) fn write_private(path: &Path, contents: &[u8], sync: bool) -> std::io::Result<()> {
    let mut file = std::fs::File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents)?;
    if sync { file.sync_all() } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_macs_tell_a_forgery_from_another_key() {
        let key = AuditKey::from_bytes([7; 32]);
        let other = AuditKey::from_bytes([8; 32]);
        let stored = key.record_mac("abc");
        assert_eq!(key.check_record("abc", Some(&stored)), MacCheck::Valid);
        assert_eq!(key.check_record("abd", Some(&stored)), MacCheck::Invalid);
        assert_eq!(key.check_record("abc", None), MacCheck::Missing);
        assert_eq!(
            other.check_record("abc", Some(&stored)),
            MacCheck::OtherKey(key.id().to_owned())
        );
        assert_eq!(
            AuditKey::from_hex(&key.to_hex()).map(|k| k.id().to_owned()),
            Some(key.id().to_owned())
        );
    }

    #[test]
    fn anchors_round_trip_and_reject_other_keys() {
        let dir = tempfile::tempdir().unwrap();
        let anchoring = Anchoring::in_data_dir(dir.path()).unwrap();
        assert_eq!(anchoring.read_anchor().unwrap(), None);
        anchoring.write_anchor(5, "head").unwrap();
        let updates = anchoring.open_for_updates().unwrap();
        updates.update(123_456, "a-longer-hash").unwrap();
        updates.update(6, "newer").unwrap();
        let anchor = anchoring.read_anchor().unwrap().unwrap();
        assert_eq!((anchor.seq, anchor.hash.as_str()), (6, "newer"));
        assert!(anchor.is_authentic(anchoring.key()));
        assert!(!anchor.is_authentic(&AuditKey::from_bytes([1; 32])));
        let mut forged = anchor.clone();
        forged.seq = 5;
        assert!(!forged.is_authentic(anchoring.key()));
        let again = Anchoring::in_data_dir(dir.path()).unwrap();
        assert_eq!(again.key().id(), anchoring.key().id());
    }
}
