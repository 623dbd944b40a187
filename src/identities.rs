//! Named principals: tokens issued with `proxi token add`, each held by a named
//! operator or agent, kept as SHA-256 digests in a registry signed by the operator.
//!
//! The registry lives in the data dir (`principals.json`), which under `proxi mcp`
//! the agent's own user can write. So the whole file carries an HMAC-SHA-256 under a
//! key derived from the operator token ([`RegistryKey`]), which the agent never
//! holds: an added entry, a removed revocation or any other edit breaks the MAC, and
//! a registry that does not verify is refused as a whole (no named token works,
//! the built-in `operator` and `agent` tokens still do). A `generation` counter,
//! covered by the MAC, rises with every write; a running server refuses a file
//! older than one it has already seen, so an old signed copy cannot be put back to
//! undo a revocation while it runs. With an operator credential file the newest
//! generation is also kept, MAC'd, next to it (`<credential>.principals`, out of the
//! agent's reach like the audit anchor), so a rollback is refused across restarts
//! too. Without an operator token there is no key, and no named token is accepted.
//!
//! Storage is behind [`PrincipalStore`]; [`DataDirPrincipals`] is the data-dir file.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use hmac::{KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::principal::{Principal, Role};
use crate::tokens::{TokenError, generate_token};

/// File name of the registry inside the data dir.
pub const PRINCIPALS_FILE: &str = "principals.json";
/// Lock file that serializes writers of the registry.
pub const PRINCIPALS_LOCK_FILE: &str = "principals.lock";
/// Most principals a registry holds (revoked ones included).
pub const MAX_PRINCIPALS: usize = 1024;
/// Longest principal name, in bytes.
pub const MAX_NAME_LEN: usize = 32;
/// Largest registry file read, in bytes (far above [`MAX_PRINCIPALS`] entries).
pub const MAX_REGISTRY_BYTES: u64 = 1024 * 1024;
/// Suffix appended to the credential file's path to name the registry's high-water mark.
pub const CREDENTIAL_HIGH_WATER_SUFFIX: &str = ".principals";
/// Names that the built-in principals use and a registered one may not take.
pub const RESERVED_NAMES: [&str; 4] = ["operator", "agent", "system", "anonymous"];

type HmacSha256 = hmac::Hmac<Sha256>;

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The name does not fit `^[a-z][a-z0-9_-]{0,31}$`.
    #[error(
        "invalid principal name {0:?}: use a lowercase letter, then up to 31 lowercase letters, digits, '-' or '_'"
    )]
    InvalidName(String),
    /// The name belongs to a built-in principal.
    #[error("the name {0:?} is reserved for a built-in principal")]
    Reserved(String),
    /// A principal of that name exists (revoked ones included: names are never reused).
    #[error("a principal named {0:?} already exists")]
    Duplicate(String),
    /// No principal of that name.
    #[error("no principal named {0:?}")]
    Unknown(String),
    /// The principal was revoked before.
    #[error("the principal {0:?} is already revoked")]
    AlreadyRevoked(String),
    /// Only operators and agents can hold tokens.
    #[error("a registered principal is an operator or an agent, not {0}")]
    RoleNotAllowed(Role),
    /// The registry is full.
    #[error("the registry holds {MAX_PRINCIPALS} principals already")]
    Full,
    /// There is no operator token to derive the registry key from.
    #[error(
        "no operator secret: named tokens need the operator token (--operator-credential, PROXI_OPERATOR_TOKEN, or the tokens.json `proxi serve` generated)"
    )]
    NoOperatorSecret,
    /// The file's MAC does not verify under this key, or it is older than one already seen.
    #[error(
        "the principal registry {0} does not verify under the operator's key (edited, rolled back, or signed with another operator token); it is ignored"
    )]
    Tampered(PathBuf),
    /// The file is not JSON of the expected shape.
    #[error("the principal registry {0} is malformed; it is ignored")]
    Malformed(PathBuf),
    /// The file could not be read or written.
    #[error("cannot use the principal registry {path}: {error}")]
    File {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// A token could not be generated.
    #[error(transparent)]
    Token(#[from] TokenError),
}

/// Checks a principal name: `^[a-z][a-z0-9_-]{0,31}$` and not reserved.
pub fn check_name(name: &str) -> Result<(), IdentityError> {
    let mut bytes = name.bytes();
    let first_ok = bytes.next().is_some_and(|byte| byte.is_ascii_lowercase());
    let rest_ok = bytes.all(|byte| {
        byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-' || byte == b'_'
    });
    if !first_ok || !rest_ok || name.len() > MAX_NAME_LEN {
        return Err(IdentityError::InvalidName(
            crate::text::escape(name).into_owned(),
        ));
    }
    if RESERVED_NAMES.contains(&name) {
        return Err(IdentityError::Reserved(name.to_owned()));
    }
    Ok(())
}

/// The role a registered token grants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenRole {
    /// A named operator.
    Operator,
    /// A named agent.
    Agent,
}

impl TokenRole {
    /// The principal role this grants.
    pub fn role(self) -> Role {
        match self {
            TokenRole::Operator => Role::Operator,
            TokenRole::Agent => Role::Agent,
        }
    }
}

impl TryFrom<Role> for TokenRole {
    type Error = IdentityError;

    fn try_from(role: Role) -> Result<TokenRole, IdentityError> {
        match role {
            Role::Operator => Ok(TokenRole::Operator),
            Role::Agent => Ok(TokenRole::Agent),
            other => Err(IdentityError::RoleNotAllowed(other)),
        }
    }
}

/// One registered principal as the registry stores it: never the token, only its digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrincipalEntry {
    /// The holder's name (see [`check_name`]).
    pub name: String,
    /// The role the token grants.
    pub role: TokenRole,
    /// Lowercase hex SHA-256 of the token.
    pub token_sha256: String,
    /// When the token was issued (RFC 3339, seconds).
    pub created: String,
    /// When it was revoked, if it was.
    #[serde(default)]
    pub revoked: Option<String>,
}

/// What `list` shows: an entry without its token digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrincipalListing {
    /// The holder's name.
    pub name: String,
    /// The role the token grants.
    pub role: TokenRole,
    /// When the token was issued.
    pub created: String,
    /// When it was revoked, if it was.
    pub revoked: Option<String>,
}

impl From<&PrincipalEntry> for PrincipalListing {
    fn from(entry: &PrincipalEntry) -> PrincipalListing {
        PrincipalListing {
            name: entry.name.clone(),
            role: entry.role,
            created: entry.created.clone(),
            revoked: entry.revoked.clone(),
        }
    }
}

/// A token just issued: shown once, never stored.
pub struct IssuedToken {
    /// The new principal.
    pub entry: PrincipalListing,
    /// The bearer token.
    pub token: String,
}

impl fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedToken")
            .field("entry", &self.entry)
            .finish_non_exhaustive()
    }
}

/// The answer to "whose token is this?".
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// A registered, unrevoked token.
    Found(Principal),
    /// No registered token has this digest, or it was revoked.
    Unknown,
    /// The registry could not be trusted (tampered, malformed, unreadable, or no key),
    /// so no named token is accepted.
    Untrusted,
}

/// Where registered principals are kept. The data-dir file is [`DataDirPrincipals`].
///
/// Implementations verify what they read (a store the agent can reach must be
/// authenticated by something the agent does not hold) and fail closed.
pub trait PrincipalStore: Send + Sync + fmt::Debug {
    /// Registers `name` with a fresh token of `role` and returns the token (once).
    fn add(&self, name: &str, role: Role) -> Result<IssuedToken, IdentityError>;
    /// Every registered principal, revoked ones included, in the order they were added.
    fn list(&self) -> Result<Vec<PrincipalListing>, IdentityError>;
    /// Revokes `name`'s token; the entry stays, so the name is never reused.
    fn revoke(&self, name: &str) -> Result<PrincipalListing, IdentityError>;
    /// The principal holding the token whose SHA-256 is `token_digest`. Compares
    /// digests in constant time and sees revocations made since the last call.
    fn authenticate(&self, token_digest: &[u8; 32]) -> Lookup;
}

/// The HMAC key that signs the registry, derived from the operator token.
#[derive(Clone)]
pub struct RegistryKey {
    keyed: HmacSha256,
}

impl fmt::Debug for RegistryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RegistryKey { .. }")
    }
}

impl RegistryKey {
    /// The key for the operator token whose SHA-256 is `operator_digest`.
    /// Derived (HMAC with a fixed label) rather than the digest itself, so the
    /// key is used for nothing else.
    pub fn from_operator_digest(operator_digest: &[u8; 32]) -> RegistryKey {
        let mut derive = <HmacSha256 as KeyInit>::new_from_slice(operator_digest)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        derive.update(b"proxi-principal-registry-key-v1");
        let key: [u8; 32] = derive.finalize().into_bytes().into();
        RegistryKey {
            keyed: <HmacSha256 as KeyInit>::new_from_slice(&key)
                .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length")),
        }
    }

    /// The key for `operator_token`.
    pub fn from_operator_token(operator_token: &str) -> RegistryKey {
        RegistryKey::from_operator_digest(&Sha256::digest(operator_token.as_bytes()).into())
    }

    fn sign(&self, signed: &SignedPart) -> String {
        let mut mac = self.keyed.clone();
        mac.update(b"proxi-principals-v1\0");
        // Serializing a struct writes its fields in declaration order: one text per value.
        mac.update(&serde_json::to_vec(signed).unwrap_or_default());
        hex::encode(mac.finalize().into_bytes())
    }

    fn verifies(&self, signed: &SignedPart, mac: &str) -> bool {
        constant_time_eq(self.sign(signed).as_bytes(), mac.as_bytes())
    }

    fn sign_high_water(&self, generation: u64) -> String {
        let mut mac = self.keyed.clone();
        mac.update(b"proxi-principals-high-water-v1\0");
        mac.update(&generation.to_be_bytes());
        hex::encode(mac.finalize().into_bytes())
    }
}

/// The newest generation written, kept outside the data dir.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HighWater {
    generation: u64,
    mac: String,
}

/// The MAC'd part of the file.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignedPart {
    generation: u64,
    principals: Vec<PrincipalEntry>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryFile {
    generation: u64,
    principals: Vec<PrincipalEntry>,
    mac: String,
}

/// Identity of the file on disk: any write (in place or by rename) changes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    device: u64,
    inode: u64,
    len: u64,
    modified_ns: i64,
    changed_ns: i64,
}

impl FileStamp {
    fn of(metadata: &std::fs::Metadata) -> FileStamp {
        FileStamp {
            device: metadata.dev(),
            inode: metadata.ino(),
            len: metadata.len(),
            modified_ns: metadata.mtime() * 1_000_000_000 + metadata.mtime_nsec(),
            changed_ns: metadata.ctime() * 1_000_000_000 + metadata.ctime_nsec(),
        }
    }
}

/// What the server last read from the file.
#[derive(Debug)]
struct Cache {
    /// `None`: never read. `Some(None)`: there was no file.
    stamp: Option<Option<FileStamp>>,
    /// Digest and principal of every unrevoked token, or `None` when untrusted.
    active: Option<Vec<([u8; 32], Principal)>>,
    /// Highest generation verified so far: an older file is a rollback.
    highest_generation: u64,
}

/// The registry in `<data-dir>/principals.json`, signed with a [`RegistryKey`].
///
/// Every [`PrincipalStore::authenticate`] call stats the file and re-reads it when
/// its identity (device, inode, length, modification and change times) differs
/// from the last read, so `proxi token revoke` takes effect on the very next request.
#[derive(Debug)]
pub struct DataDirPrincipals {
    data_dir: PathBuf,
    path: PathBuf,
    key: Option<RegistryKey>,
    /// Where the newest generation is kept outside the data dir, if anywhere.
    high_water: Option<PathBuf>,
    cache: Mutex<Cache>,
}

impl DataDirPrincipals {
    /// Also keeps the newest generation next to the operator credential at
    /// `credential_path` (see [`CREDENTIAL_HIGH_WATER_SUFFIX`]) and refuses a
    /// registry older than it.
    pub fn with_credential(mut self, credential_path: &Path) -> DataDirPrincipals {
        let mut path = credential_path.as_os_str().to_owned();
        path.push(CREDENTIAL_HIGH_WATER_SUFFIX);
        self.high_water = Some(PathBuf::from(path));
        self
    }

    /// The verified generation of the high-water file (0 when there is none or it
    /// does not verify: a forged mark cannot lower it, only the operator can write it).
    fn high_water_generation(&self, key: &RegistryKey) -> u64 {
        let Some(path) = &self.high_water else {
            return 0;
        };
        std::fs::read(path)
            .ok()
            .and_then(|text| serde_json::from_slice::<HighWater>(&text).ok())
            .filter(|mark| {
                constant_time_eq(
                    key.sign_high_water(mark.generation).as_bytes(),
                    mark.mac.as_bytes(),
                )
            })
            .map_or(0, |mark| mark.generation)
    }

    fn write_high_water(&self, key: &RegistryKey, generation: u64) -> Result<(), IdentityError> {
        let Some(path) = &self.high_water else {
            return Ok(());
        };
        let mark = HighWater {
            generation,
            mac: key.sign_high_water(generation),
        };
        let text = serde_json::to_vec(&mark).unwrap_or_default();
        let mut temporary = path.as_os_str().to_owned();
        temporary.push(".tmp");
        let temporary = PathBuf::from(temporary);
        let _ = std::fs::remove_file(&temporary);
        crate::anchor::write_private(&temporary, &text, true)
            .and_then(|()| std::fs::rename(&temporary, path))
            .map_err(|error| IdentityError::File {
                path: path.clone(),
                error,
            })
    }

    /// The registry of `data_dir`, verified with `key` (`None`: no operator secret,
    /// so nothing verifies and no named token is accepted).
    pub fn new(data_dir: &Path, key: Option<RegistryKey>) -> DataDirPrincipals {
        DataDirPrincipals {
            data_dir: data_dir.to_owned(),
            path: data_dir.join(PRINCIPALS_FILE),
            key,
            high_water: None,
            cache: Mutex::new(Cache {
                stamp: None,
                active: None,
                highest_generation: 0,
            }),
        }
    }

    /// Where the registry file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn key(&self) -> Result<&RegistryKey, IdentityError> {
        self.key.as_ref().ok_or(IdentityError::NoOperatorSecret)
    }

    fn file_error(&self, error: std::io::Error) -> IdentityError {
        IdentityError::File {
            path: self.path.clone(),
            error,
        }
    }

    /// Reads and verifies the file; a missing file is an empty registry.
    fn read(&self) -> Result<SignedPart, IdentityError> {
        let key = self.key()?;
        let file = match std::fs::File::open(&self.path) {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Ok(SignedPart::default());
            }
            Err(error) => return Err(self.file_error(error)),
        };
        let mut text = Vec::new();
        std::io::Read::read_to_end(
            &mut std::io::Read::take(file, MAX_REGISTRY_BYTES + 1),
            &mut text,
        )
        .map_err(|error| self.file_error(error))?;
        if text.len() as u64 > MAX_REGISTRY_BYTES {
            return Err(IdentityError::Malformed(self.path.clone()));
        }
        let parsed: RegistryFile = serde_json::from_slice(&text)
            .map_err(|_| IdentityError::Malformed(self.path.clone()))?;
        let signed = SignedPart {
            generation: parsed.generation,
            principals: parsed.principals,
        };
        if !key.verifies(&signed, &parsed.mac) {
            return Err(IdentityError::Tampered(self.path.clone()));
        }
        if signed.principals.len() > MAX_PRINCIPALS {
            return Err(IdentityError::Malformed(self.path.clone()));
        }
        if signed.generation < self.high_water_generation(key) {
            return Err(IdentityError::Tampered(self.path.clone()));
        }
        Ok(signed)
    }

    /// Signs and writes `signed` atomically (temporary file, fsync, rename), mode 0600.
    fn write(&self, signed: &SignedPart) -> Result<(), IdentityError> {
        let key = self.key()?;
        let file = RegistryFile {
            generation: signed.generation,
            principals: signed.principals.clone(),
            mac: key.sign(signed),
        };
        let text = serde_json::to_vec_pretty(&file).unwrap_or_default();
        let temporary = self.data_dir.join(format!("{PRINCIPALS_FILE}.tmp"));
        let _ = std::fs::remove_file(&temporary);
        let mut out = std::fs::File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temporary)
            .map_err(|error| self.file_error(error))?;
        out.write_all(&text)
            .and_then(|()| out.sync_all())
            .map_err(|error| self.file_error(error))?;
        std::fs::rename(&temporary, &self.path).map_err(|error| self.file_error(error))?;
        if let Ok(dir) = std::fs::File::open(&self.data_dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    }

    /// Runs `change` on the verified registry under the writers' lock, then writes
    /// the result as the next generation.
    fn modify<T>(
        &self,
        change: impl FnOnce(&mut Vec<PrincipalEntry>) -> Result<T, IdentityError>,
    ) -> Result<T, IdentityError> {
        self.key()?;
        crate::audit::create_private_dir(&self.data_dir).map_err(|error| self.file_error(error))?;
        let lock = std::fs::File::options()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(self.data_dir.join(PRINCIPALS_LOCK_FILE))
            .map_err(|error| self.file_error(error))?;
        lock.lock().map_err(|error| self.file_error(error))?;
        let mut signed = self.read()?;
        let result = change(&mut signed.principals)?;
        signed.generation += 1;
        self.write(&signed)?;
        self.write_high_water(self.key()?, signed.generation)?;
        Ok(result)
    }

    /// Re-reads the file if it changed since the last look; updates the cache.
    fn refresh(&self, cache: &mut Cache) {
        let stamp = match std::fs::metadata(&self.path) {
            Ok(metadata) => Some(FileStamp::of(&metadata)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
            Err(error) => {
                tracing::warn!(path = %self.path.display(), "cannot stat the principal registry: {error}");
                cache.stamp = None;
                cache.active = None;
                return;
            }
        };
        if cache.stamp == Some(stamp) {
            return;
        }
        cache.stamp = Some(stamp);
        cache.active = match self.read() {
            Ok(signed) if signed.generation < cache.highest_generation => {
                tracing::warn!(
                    path = %self.path.display(),
                    generation = signed.generation,
                    seen = cache.highest_generation,
                    "the principal registry was rolled back to an older signed copy; no named token is accepted until it is rewritten by `proxi token`"
                );
                None
            }
            Ok(signed) => {
                cache.highest_generation = signed.generation;
                Some(active_tokens(&signed.principals))
            }
            Err(IdentityError::NoOperatorSecret) => None,
            Err(error) => {
                tracing::warn!("{error}");
                None
            }
        };
    }
}

/// Digest and principal of every unrevoked entry (entries whose digest is not
/// 64 hex digits match nothing).
fn active_tokens(entries: &[PrincipalEntry]) -> Vec<([u8; 32], Principal)> {
    entries
        .iter()
        .filter(|entry| entry.revoked.is_none() && check_name(&entry.name).is_ok())
        .filter_map(|entry| {
            let mut digest = [0u8; 32];
            hex::decode_to_slice(&entry.token_sha256, &mut digest).ok()?;
            Some((digest, Principal::named(&entry.name, entry.role.role())))
        })
        .collect()
}

impl PrincipalStore for DataDirPrincipals {
    fn add(&self, name: &str, role: Role) -> Result<IssuedToken, IdentityError> {
        check_name(name)?;
        let role = TokenRole::try_from(role)?;
        self.modify(|entries| {
            if entries.iter().any(|entry| entry.name == name) {
                return Err(IdentityError::Duplicate(name.to_owned()));
            }
            if entries.len() >= MAX_PRINCIPALS {
                return Err(IdentityError::Full);
            }
            let token = generate_token()?;
            let entry = PrincipalEntry {
                name: name.to_owned(),
                role,
                token_sha256: hex::encode(Sha256::digest(token.as_bytes())),
                created: now(),
                revoked: None,
            };
            let listing = PrincipalListing::from(&entry);
            entries.push(entry);
            Ok(IssuedToken {
                entry: listing,
                token,
            })
        })
    }

    fn list(&self) -> Result<Vec<PrincipalListing>, IdentityError> {
        Ok(self
            .read()?
            .principals
            .iter()
            .map(PrincipalListing::from)
            .collect())
    }

    fn revoke(&self, name: &str) -> Result<PrincipalListing, IdentityError> {
        self.modify(|entries| {
            let entry = entries
                .iter_mut()
                .find(|entry| entry.name == name)
                .ok_or_else(|| IdentityError::Unknown(crate::text::escape(name).into_owned()))?;
            if entry.revoked.is_some() {
                return Err(IdentityError::AlreadyRevoked(name.to_owned()));
            }
            entry.revoked = Some(now());
            Ok(PrincipalListing::from(&*entry))
        })
    }

    fn authenticate(&self, token_digest: &[u8; 32]) -> Lookup {
        if self.key.is_none() {
            return Lookup::Untrusted;
        }
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        self.refresh(&mut cache);
        let Some(active) = &cache.active else {
            return Lookup::Untrusted;
        };
        // Compare against every entry so timing does not reveal which one matched.
        let mut found = None;
        for (digest, principal) in active {
            if constant_time_eq(digest, token_digest) && found.is_none() {
                found = Some(principal.clone());
            }
        }
        found.map_or(Lookup::Unknown, Lookup::Found)
    }
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn constant_time_eq(left: &[u8], right: &[u8]) -> bool {
    left.len() == right.len()
        && left
            .iter()
            .zip(right)
            .fold(0u8, |difference, (a, b)| difference | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(token: &str) -> [u8; 32] {
        Sha256::digest(token.as_bytes()).into()
    }

    fn store(dir: &Path) -> DataDirPrincipals {
        DataDirPrincipals::new(
            dir,
            Some(RegistryKey::from_operator_token("operator-secret-123456")),
        )
    }

    #[test]
    fn names_follow_the_grammar_and_avoid_reserved_ones() {
        for good in ["alice", "deploy-bot", "a", "x_1", &"a".repeat(32)] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Alice",
            "1bot",
            "-x",
            "a b",
            "ä",
            &"a".repeat(33),
            "a\n",
        ] {
            assert!(
                matches!(check_name(bad), Err(IdentityError::InvalidName(_))),
                "{bad:?}"
            );
        }
        for reserved in RESERVED_NAMES {
            assert!(matches!(
                check_name(reserved),
                Err(IdentityError::Reserved(_))
            ));
        }
    }

    #[test]
    fn added_tokens_authenticate_until_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let registry = store(dir.path());
        let alice = registry.add("alice", Role::Operator).unwrap();
        let bot = registry.add("deploy-bot", Role::Agent).unwrap();
        assert_eq!(
            registry.authenticate(&digest(&alice.token)),
            Lookup::Found(Principal::named("alice", Role::Operator))
        );
        assert_eq!(
            registry.authenticate(&digest(&bot.token)),
            Lookup::Found(Principal::named("deploy-bot", Role::Agent))
        );
        assert_eq!(registry.authenticate(&digest("nope")), Lookup::Unknown);
        let text = std::fs::read_to_string(registry.path()).unwrap();
        assert!(!text.contains(&alice.token), "the token is never stored");
        registry.revoke("alice").unwrap();
        assert_eq!(
            registry.authenticate(&digest(&alice.token)),
            Lookup::Unknown
        );
        assert!(matches!(
            registry.revoke("alice"),
            Err(IdentityError::AlreadyRevoked(_))
        ));
        assert!(matches!(
            registry.revoke("carol"),
            Err(IdentityError::Unknown(_))
        ));
        let listed = registry.list().unwrap();
        assert_eq!(listed.len(), 2);
        assert!(listed[0].revoked.is_some());
        assert_eq!(listed[1].role, TokenRole::Agent);
    }

    #[test]
    fn duplicates_bad_roles_and_a_full_registry_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let registry = store(dir.path());
        registry.add("alice", Role::Operator).unwrap();
        registry.revoke("alice").unwrap();
        assert!(matches!(
            registry.add("alice", Role::Agent),
            Err(IdentityError::Duplicate(_))
        ));
        assert!(matches!(
            registry.add("sys", Role::System),
            Err(IdentityError::RoleNotAllowed(Role::System))
        ));
        let mut signed = registry.read().unwrap();
        while signed.principals.len() < MAX_PRINCIPALS {
            let mut entry = signed.principals[0].clone();
            entry.name = format!("p{}", signed.principals.len());
            signed.principals.push(entry);
        }
        registry.write(&signed).unwrap();
        assert!(matches!(
            registry.add("one-more", Role::Agent),
            Err(IdentityError::Full)
        ));
    }

    #[test]
    fn the_high_water_mark_beside_the_credential_refuses_a_rollback_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let credential = outside.path().join("operator.json");
        let registry = store(dir.path()).with_credential(&credential);
        let alice = registry.add("alice", Role::Operator).unwrap();
        let signed_copy = std::fs::read(registry.path()).unwrap();
        registry.revoke("alice").unwrap();
        assert!(outside.path().join("operator.json.principals").exists());
        // A fresh server (no memory of generations) still refuses the old copy.
        std::fs::write(registry.path(), &signed_copy).unwrap();
        let restarted = store(dir.path()).with_credential(&credential);
        assert_eq!(
            restarted.authenticate(&digest(&alice.token)),
            Lookup::Untrusted
        );
        // Without the mark it could not tell.
        assert!(matches!(
            store(dir.path()).authenticate(&digest(&alice.token)),
            Lookup::Found(_)
        ));
    }

    #[test]
    fn another_key_or_an_edit_or_a_rollback_is_untrusted() {
        let dir = tempfile::tempdir().unwrap();
        let registry = store(dir.path());
        let alice = registry.add("alice", Role::Operator).unwrap();
        let signed_copy = std::fs::read(registry.path()).unwrap();
        assert!(matches!(
            registry.authenticate(&digest(&alice.token)),
            Lookup::Found(_)
        ));
        let other = DataDirPrincipals::new(
            dir.path(),
            Some(RegistryKey::from_operator_token("another-operator-token")),
        );
        assert_eq!(other.authenticate(&digest(&alice.token)), Lookup::Untrusted);
        assert!(matches!(other.list(), Err(IdentityError::Tampered(_))));
        let keyless = DataDirPrincipals::new(dir.path(), None);
        assert_eq!(
            keyless.authenticate(&digest(&alice.token)),
            Lookup::Untrusted
        );
        assert!(matches!(
            keyless.add("bob", Role::Agent),
            Err(IdentityError::NoOperatorSecret)
        ));

        registry.revoke("alice").unwrap();
        assert_eq!(
            registry.authenticate(&digest(&alice.token)),
            Lookup::Unknown
        );
        // Putting the older signed copy back does not undo the revocation.
        std::fs::write(registry.path(), &signed_copy).unwrap();
        assert_eq!(
            registry.authenticate(&digest(&alice.token)),
            Lookup::Untrusted
        );
        // An edit that drops the revocation breaks the MAC.
        std::fs::write(registry.path(), b"{}").unwrap();
        assert_eq!(
            registry.authenticate(&digest(&alice.token)),
            Lookup::Untrusted
        );
        assert!(matches!(
            registry.add("bob", Role::Agent),
            Err(IdentityError::Malformed(_))
        ));
    }
}
