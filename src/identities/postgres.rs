//! Named principals in the PostgreSQL store every instance shares (`--store`).
//!
//! One row per principal, revoked ones included (names are never reused). Each
//! row carries an HMAC-SHA-256 under the [`RegistryKey`] (derived from the
//! operator token) over all its fields, so whoever can write the database but
//! does not hold the operator token cannot add a principal or change one's role:
//! such a row is refused. Every authentication reads the row, so a revocation on
//! one instance is in force on every instance at its next request. A database
//! writer can still put back a row as it was before its revocation (no
//! generation is kept outside the database): the database must be reachable
//! only by the operators' side (docs/scale-out.md).

use std::future::Future;
use std::time::Duration;

use hmac::Mac;
use sha2::{Digest, Sha256};
use tokio_postgres::Row;

use super::{
    IdentityError, IssuedToken, Lookup, MAX_PRINCIPALS, PrincipalListing, PrincipalStore,
    RegistryKey, TokenRole, check_name, now,
};
use crate::principal::{Principal, Role};
use crate::tokens::generate_token;

/// The advisory lock that serializes additions across instances, so the cap holds.
const ADD_LOCK: i64 = 0x70_72_6f_78_69 + 32;
/// The advisory lock that serializes migrations of instances starting together.
const MIGRATION_LOCK: i64 = ADD_LOCK + 1;
/// Longest wait for one store operation; past it the token is refused.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections per instance: one lookup per request with a named token.
const POOL_SIZE: usize = 4;

const MIGRATIONS: &str = r#"
CREATE TABLE IF NOT EXISTS principals (
    name TEXT COLLATE "C" PRIMARY KEY,
    role TEXT COLLATE "C" NOT NULL,
    token_sha256 TEXT COLLATE "C" NOT NULL UNIQUE,
    created TEXT NOT NULL,
    revoked TEXT,
    mac TEXT NOT NULL,
    row_order BIGINT GENERATED ALWAYS AS IDENTITY
);
"#;

const COLUMNS: &str = "name, role, token_sha256, created, revoked, mac";

/// Named tokens in a PostgreSQL database shared by every instance.
pub struct PostgresPrincipals {
    /// Its connections, on a runtime of their own (blocking callers, any thread).
    client: crate::postgres_pool::BlockingPool,
    key: RegistryKey,
}

impl std::fmt::Debug for PostgresPrincipals {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("PostgresPrincipals")
            .finish_non_exhaustive()
    }
}

/// A store failure as callers see it: the SQLSTATE or what failed, never the statement.
fn server_error(error: tokio_postgres::Error) -> IdentityError {
    IdentityError::Store(match error.as_db_error() {
        Some(db) => db.code().code().to_owned(),
        None => "connection failed".to_owned(),
    })
}

/// What callers see when an operation could not be run: what failed, in words.
fn pool_failure(failure: crate::postgres_pool::PoolFailure) -> IdentityError {
    use crate::postgres_pool::PoolFailure;
    IdentityError::Store(match failure {
        PoolFailure::Runtime(error) => format!("no client runtime: {error}"),
        PoolFailure::Build(error) => error,
        PoolFailure::Closed => "store closed".to_owned(),
        PoolFailure::Timeout(timeout) => format!("no answer within {timeout:?}"),
        PoolFailure::ThreadFailed => "client thread failed".to_owned(),
    })
}

/// One stored row.
struct StoredPrincipal {
    name: String,
    role: String,
    token_sha256: String,
    created: String,
    revoked: Option<String>,
    mac: String,
}

impl StoredPrincipal {
    fn from_row(row: &Row) -> Result<StoredPrincipal, IdentityError> {
        Ok(StoredPrincipal {
            name: row.try_get(0).map_err(server_error)?,
            role: row.try_get(1).map_err(server_error)?,
            token_sha256: row.try_get(2).map_err(server_error)?,
            created: row.try_get(3).map_err(server_error)?,
            revoked: row.try_get(4).map_err(server_error)?,
            mac: row.try_get(5).map_err(server_error)?,
        })
    }

    /// The listing, if the row's MAC verifies under `key` and its role is one a token may hold.
    fn verified(&self, key: &RegistryKey) -> Result<PrincipalListing, IdentityError> {
        let tampered =
            || IdentityError::StoreTampered(crate::text::escape(&self.name).into_owned());
        let expected = row_mac(
            key,
            &self.name,
            &self.role,
            &self.token_sha256,
            &self.created,
            self.revoked.as_deref(),
        );
        let presented = hex::decode(&self.mac).map_err(|_| tampered())?;
        let mut check = key.keyed.clone();
        check.update(&expected.1);
        check.verify_slice(&presented).map_err(|_| tampered())?;
        let role = match self.role.as_str() {
            "operator" => TokenRole::Operator,
            "agent" => TokenRole::Agent,
            _ => return Err(tampered()),
        };
        Ok(PrincipalListing {
            name: self.name.clone(),
            role,
            created: self.created.clone(),
            revoked: self.revoked.clone(),
        })
    }
}

/// The row's MAC (hex) and the bytes it covers: every field, length-prefixed so
/// no two rows cover the same bytes.
fn row_mac(
    key: &RegistryKey,
    name: &str,
    role: &str,
    token_sha256: &str,
    created: &str,
    revoked: Option<&str>,
) -> (String, Vec<u8>) {
    let mut covered = b"proxi-principal-row-v1".to_vec();
    for field in [
        Some(name),
        Some(role),
        Some(token_sha256),
        Some(created),
        revoked,
    ] {
        match field {
            Some(text) => {
                covered.push(1);
                covered.extend_from_slice(&(text.len() as u64).to_be_bytes());
                covered.extend_from_slice(text.as_bytes());
            }
            None => covered.push(0),
        }
    }
    let mut mac = key.keyed.clone();
    mac.update(&covered);
    (hex::encode(mac.finalize().into_bytes()), covered)
}

fn role_text(role: TokenRole) -> &'static str {
    match role {
        TokenRole::Operator => "operator",
        TokenRole::Agent => "agent",
    }
}

impl PostgresPrincipals {
    /// Connects to the database at `url`, runs the migrations, and signs and
    /// verifies rows with `key`. Fails if the server cannot be reached now.
    pub fn connect(url: &str, key: RegistryKey) -> Result<PostgresPrincipals, IdentityError> {
        let config = crate::postgres_pool::config(url, "proxi-principals")
            .map_err(|_| IdentityError::Store("invalid store URL".to_owned()))?;
        let client = crate::postgres_pool::BlockingPool::new(
            config,
            "proxi-principals-pg",
            POOL_SIZE,
            OPERATION_TIMEOUT,
        )
        .map_err(pool_failure)?;
        let store = PostgresPrincipals { client, key };
        store.run(|mut client| async move {
            let transaction = client.transaction().await.map_err(server_error)?;
            transaction
                .execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                .await
                .map_err(server_error)?;
            transaction
                .batch_execute(MIGRATIONS)
                .await
                .map_err(server_error)?;
            transaction.commit().await.map_err(server_error)
        })?;
        Ok(store)
    }

    /// Runs `work` with a pooled connection on the store's runtime and waits for
    /// it, bounded by [`OPERATION_TIMEOUT`]. Callable from any thread.
    fn run<T, F, Work>(&self, work: Work) -> Result<T, IdentityError>
    where
        T: Send,
        F: Future<Output = Result<T, IdentityError>> + Send,
        Work: FnOnce(deadpool_postgres::Object) -> F + Send,
    {
        let pool = self.client.pool();
        let attempt = async move {
            let client = pool
                .get()
                .await
                .map_err(|error| IdentityError::Store(format!("no connection: {error}")))?;
            work(client).await
        };
        self.client
            .run(OPERATION_TIMEOUT, attempt)
            .unwrap_or_else(|failure| Err(pool_failure(failure)))
    }
}

impl PrincipalStore for PostgresPrincipals {
    fn add(&self, name: &str, role: Role) -> Result<IssuedToken, IdentityError> {
        check_name(name)?;
        let role = TokenRole::try_from(role)?;
        let token = generate_token()?;
        let token_sha256 = hex::encode(Sha256::digest(token.as_bytes()));
        let created = now();
        let (mac, _) = row_mac(
            &self.key,
            name,
            role_text(role),
            &token_sha256,
            &created,
            None,
        );
        let (token_sha256, created_at) = (&token_sha256, &created);
        self.run(|mut client| async move {
            let transaction = client.transaction().await.map_err(server_error)?;
            transaction
                .execute("SELECT pg_advisory_xact_lock($1)", &[&ADD_LOCK])
                .await
                .map_err(server_error)?;
            let count: i64 = transaction
                .query_one("SELECT COUNT(*) FROM principals", &[])
                .await
                .and_then(|row| row.try_get(0))
                .map_err(server_error)?;
            if usize::try_from(count).unwrap_or(usize::MAX) >= MAX_PRINCIPALS {
                return Err(IdentityError::Full);
            }
            let inserted = transaction
                .execute(
                    &format!(
                        "INSERT INTO principals ({COLUMNS}) VALUES ($1, $2, $3, $4, NULL, $5) \
                         ON CONFLICT (name) DO NOTHING"
                    ),
                    &[&name, &role_text(role), token_sha256, created_at, &mac],
                )
                .await
                .map_err(server_error)?;
            if inserted != 1 {
                return Err(IdentityError::Duplicate(name.to_owned()));
            }
            transaction.commit().await.map_err(server_error)
        })?;
        Ok(IssuedToken {
            entry: PrincipalListing {
                name: name.to_owned(),
                role,
                created,
                revoked: None,
            },
            token,
        })
    }

    fn list(&self) -> Result<Vec<PrincipalListing>, IdentityError> {
        let rows: Vec<StoredPrincipal> = self.run(|client| async move {
            let rows = client
                .query(
                    &format!("SELECT {COLUMNS} FROM principals ORDER BY row_order"),
                    &[],
                )
                .await
                .map_err(server_error)?;
            rows.iter().map(StoredPrincipal::from_row).collect()
        })?;
        rows.iter()
            .map(|row: &StoredPrincipal| row.verified(&self.key))
            .collect()
    }

    fn revoke(&self, name: &str) -> Result<PrincipalListing, IdentityError> {
        let key = &self.key;
        self.run(|mut client| async move {
            let transaction = client.transaction().await.map_err(server_error)?;
            let row = transaction
                .query_opt(
                    &format!("SELECT {COLUMNS} FROM principals WHERE name = $1 FOR UPDATE"),
                    &[&name],
                )
                .await
                .map_err(server_error)?
                .ok_or_else(|| IdentityError::Unknown(crate::text::escape(name).into_owned()))?;
            let stored = StoredPrincipal::from_row(&row)?;
            let mut listing = stored.verified(key)?;
            if listing.revoked.is_some() {
                return Err(IdentityError::AlreadyRevoked(name.to_owned()));
            }
            let revoked = now();
            let (mac, _) = row_mac(
                key,
                &stored.name,
                &stored.role,
                &stored.token_sha256,
                &stored.created,
                Some(&revoked),
            );
            transaction
                .execute(
                    "UPDATE principals SET revoked = $2, mac = $3 WHERE name = $1",
                    &[&name, &revoked, &mac],
                )
                .await
                .map_err(server_error)?;
            transaction.commit().await.map_err(server_error)?;
            listing.revoked = Some(revoked);
            Ok(listing)
        })
    }

    fn authenticate(&self, token_digest: &[u8; 32]) -> Lookup {
        let digest = hex::encode(token_digest);
        let found = self.run(|client| async move {
            let row = client
                .query_opt(
                    &format!("SELECT {COLUMNS} FROM principals WHERE token_sha256 = $1"),
                    &[&digest],
                )
                .await
                .map_err(server_error)?;
            row.as_ref().map(StoredPrincipal::from_row).transpose()
        });
        match found {
            // Unreachable store: fail closed, no named token works meanwhile.
            Err(_) => Lookup::Untrusted,
            Ok(None) => Lookup::Unknown,
            Ok(Some(stored)) => match stored.verified(&self.key) {
                Err(_) => Lookup::Untrusted,
                Ok(listing) if listing.revoked.is_some() => Lookup::Unknown,
                Ok(listing) => Lookup::Found(Principal::named(&listing.name, listing.role.role())),
            },
        }
    }
}
