//! The tamper-evident audit trail: a hash chain written by one thread into an
//! [`AuditStore`] (SQLite in the data dir, or PostgreSQL shared by several instances).
//!
//! Callers [`AuditLog::submit`] an entry, which only queues it (cheap, no I/O, safe
//! to call while holding the mode lock so that queue order is decision order), and
//! then await [`Pending::durable`] before answering their client. The writer thread
//! drains whatever has queued up into one transaction (group commit), so a burst of
//! N requests costs one fsync rather than N.
//!
//! Every record is bounded (see [`MAX_RECORD_BYTES`]), agent traffic stops while
//! free disk space is below a reserve kept for operators, and a failed write makes
//! the log refuse agent traffic only until a later write succeeds.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError, mpsc};
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{oneshot, watch};

use crate::anchor::{AnchorError, AnchorFile, Anchoring, AuditKey, MacCheck};

mod chain;
mod postgres;
mod record;
mod sqlite;
mod store;

pub use chain::*;
pub use postgres::*;
pub use record::*;
pub use sqlite::*;
pub use store::*;

/// Most records committed in one transaction.
const MAX_BATCH: usize = 1024;
/// Free space kept for operators on the data dir's filesystem unless configured.
pub const DEFAULT_SPACE_RESERVE_BYTES: u64 = 64 * 1024 * 1024;
/// How often a log that failed a write, or is short of space, checks again.
const PROBE_INTERVAL: Duration = Duration::from_millis(250);
/// Permissions of the data dir: only Proxi's user may list or enter it.
pub const DATA_DIR_MODE: u32 = 0o700;
/// Permissions of every file Proxi keeps in the data dir.
pub const DATA_FILE_MODE: u32 = 0o600;

/// Audit trail failures.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// SQLite refused an operation.
    #[error("audit database error: {0}")]
    Database(#[from] rusqlite::Error),
    /// The PostgreSQL store failed an operation.
    #[error("audit store error: {0}")]
    Postgres(#[from] PostgresError),
    /// The data dir could not be prepared.
    #[error("cannot prepare audit storage at {path}: {error}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// A shared store recorded this allowed decision as refused (at seq `0`):
    /// another instance changed the shared mode after it was taken.
    #[error(
        "the shared mode changed after this call was decided; it was recorded as refused (seq {0})"
    )]
    ModeChanged(u64),
    /// The writer thread stopped or a write failed; nothing more is accepted until a write succeeds.
    #[error("the audit trail is unavailable")]
    Unavailable,
    /// Free space on the data dir's filesystem is below the operators' reserve.
    #[error("free disk space for the audit trail is below the reserve kept for operators")]
    LowSpace,
    /// The newest record does not match its hash or MAC, so appending would extend a forged chain.
    #[error(
        "the newest audit record (seq {0}) fails its hash or MAC check; run `proxi audit verify` and move the damaged database aside"
    )]
    TamperedTail(u64),
    /// A record could not be encoded.
    #[error("cannot encode an audit record: {0}")]
    Encoding(String),
    /// No audit database exists at the path.
    #[error("no audit database at {0}")]
    Missing(PathBuf),
    /// The audit key or the anchor file could not be used.
    #[error(transparent)]
    Anchor(#[from] AnchorError),
    /// The newest record carries no MAC, so it cannot be told from a forgery.
    #[error(
        "the newest audit record (seq {0}) carries no MAC: the trail predates audit keys or its MACs were removed; run `proxi audit verify` and move the database aside"
    )]
    Unauthenticated(u64),
    /// The newest record was authenticated with another key than the one configured.
    #[error(
        "the audit trail was written with another audit key (record {seq} names key {found}, the configured key is {expected}); use the operator credential this data dir was created with"
    )]
    KeyMismatch {
        /// The record checked.
        seq: u64,
        /// The key id the record names.
        found: String,
        /// The configured key's id.
        expected: String,
    },
    /// The anchor names records the database no longer has.
    #[error(
        "the audit trail ends at record {last} but the anchor {anchor} says record {anchored} was written: the end of the trail was deleted; run `proxi audit verify` and move the damaged database aside"
    )]
    Truncated {
        /// The newest record present.
        last: u64,
        /// The newest record the anchor vouches for.
        anchored: u64,
        /// The anchor file.
        anchor: PathBuf,
    },
    /// The record the anchor vouches for has another hash: the chain was rewritten.
    #[error(
        "audit record {0} differs from the one the anchor vouches for: the trail was rewritten; run `proxi audit verify` and move the damaged database aside"
    )]
    Rewritten(u64),
    /// The trail has records but its anchor file is gone or was not made with this key.
    #[error(
        "the audit anchor {anchor} is {problem} although the trail has {records} record(s); a deleted tail could not be detected, so Proxi will not extend this trail"
    )]
    AnchorUntrusted {
        /// The anchor file.
        anchor: PathBuf,
        /// `missing` or `not authenticated by the configured key`.
        problem: &'static str,
        /// Records in the trail.
        records: u64,
    },
}

/// How hard each commit pushes data to disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Durability {
    /// Acknowledge only after the WAL is fsynced: survives power loss as well as
    /// process crashes. Fsyncs are grouped and overlap the next batch's writes.
    #[default]
    Full,
    /// Acknowledge after commit without fsync: survives `kill -9` (the data is in
    /// the OS page cache) but may lose the newest records on power loss.
    Process,
}

/// Who an entry is for, which decides what happens to it when disk space runs low
/// or a write has failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    /// Agent traffic and refused authentications: refused first, as soon as free
    /// space drops below the reserve or while the log recovers from a failed write.
    Agent,
    /// Operator actions and Proxi's own mode events: may use the reserve, and are
    /// still attempted while the log recovers (each attempt doubles as a probe).
    Essential,
}

struct Job {
    entry: AuditEntry,
    priority: Priority,
    /// The failure count when the job was queued: a job queued before a failure
    /// may depend on state that was never recorded, so it is refused.
    generation: u64,
    /// For an allowed decision on a shared store: the epoch it was taken under.
    decided_epoch: Option<u64>,
    done: oneshot::Sender<Result<u64, AuditError>>,
}

/// A queued entry; await [`Pending::durable`] before acknowledging the request.
#[derive(Debug)]
pub struct Pending(PendingState);

#[derive(Debug)]
enum PendingState {
    Queued(oneshot::Receiver<Result<u64, AuditError>>),
    Refused,
}

impl Pending {
    /// Waits until the entry is committed; returns its sequence number.
    pub async fn durable(self) -> Result<u64, AuditError> {
        match self.0 {
            PendingState::Queued(receiver) => {
                receiver.await.unwrap_or(Err(AuditError::Unavailable))
            }
            PendingState::Refused => Err(AuditError::Unavailable),
        }
    }
}

/// Writes succeed.
const HEALTHY: u8 = 0;
/// A write failed: agent entries are refused until a probe or an essential write succeeds.
const RECOVERING: u8 = 1;
/// The writer or syncer is gone, or an fsync failed (after which the kernel may
/// have dropped dirty pages, so no later success proves anything): only a
/// restart, which re-reads and checks the chain, recovers.
const FAILED: u8 = 2;

/// State the handle, the writer and the syncer share.
#[derive(Debug)]
struct Shared {
    health: AtomicU8,
    /// Bumped by every failed write (see [`Job::generation`]).
    generation: AtomicU64,
    /// Free space was below the reserve at the last check.
    low_space: AtomicBool,
    /// Bytes of free space kept for essential entries.
    reserve: AtomicU64,
    /// Records, commit times and queue depth for `/metrics`.
    metrics: crate::metrics::AuditMetrics,
    /// The seq of the newest acknowledged record (see [`AuditLog::committed`]).
    committed: watch::Sender<u64>,
}

impl Shared {
    /// Publishes that every record up to `seq` is durable.
    fn publish_committed(&self, seq: u64) {
        self.committed.send_if_modified(|newest| {
            let newer = seq > *newest;
            if newer {
                *newest = seq;
            }
            newer
        });
    }
}

impl Shared {
    fn health(&self) -> u8 {
        self.health.load(Ordering::SeqCst)
    }

    fn fail_permanently(&self) {
        self.health.store(FAILED, Ordering::SeqCst);
    }

    /// Whether an entry of `priority` may be queued now.
    fn accepts(&self, priority: Priority) -> bool {
        match self.health() {
            HEALTHY => true,
            RECOVERING => priority == Priority::Essential,
            _ => false,
        }
    }
}

/// Handle to the audit trail; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct AuditLog {
    sender: mpsc::Sender<Job>,
    shared: Arc<Shared>,
    store: Arc<dyn AuditStore>,
}

/// What [`AuditLog::open`] found in an existing trail.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Number of records already in the chain.
    pub records: u64,
    /// The newest mode change or expiry, to restore the mode after a restart.
    pub last_mode_event: Option<AuditRecord>,
    /// Why `last_mode_event` cannot be trusted: the first problem in the chain from
    /// it to the newest record (hash, link or MAC), if there is one.
    pub mode_event_problem: Option<String>,
    /// True when the audit key and anchor live outside the data dir.
    pub anchored_externally: bool,
}

/// Creates `dir` (and missing parents) readable by Proxi's user only.
///
/// An existing directory keeps its permissions (it may be shared on purpose),
/// but a warning names it if other users can read it.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DATA_DIR_MODE)
        .create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(
            dir = %dir.display(),
            mode = format!("{:o}", mode & 0o777),
            "the data dir is accessible to other users; chmod 700 it"
        );
    }
    Ok(())
}

/// Makes `path` (if it exists) readable and writable by Proxi's user only.
fn make_private(path: &Path) -> std::io::Result<()> {
    match std::fs::set_permissions(path, std::fs::Permissions::from_mode(DATA_FILE_MODE)) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Free and total bytes of the filesystem holding `path`, as unprivileged users see them.
fn disk_space(path: &Path) -> std::io::Result<(u64, u64)> {
    let stats = rustix::fs::statvfs(path)?;
    let block = stats.f_frsize.max(1);
    Ok((
        stats.f_bavail.saturating_mul(block),
        stats.f_blocks.saturating_mul(block),
    ))
}

impl AuditLog {
    /// Opens (creating if needed) the trail in `data_dir` and starts its writer thread.
    ///
    /// The data dir is created 0700 and the database and its WAL and shared-memory
    /// files are 0600. The free-space reserve starts at [`DEFAULT_SPACE_RESERVE_BYTES`],
    /// capped at a tenth of the filesystem; see [`AuditLog::set_space_reserve`].
    /// The audit key and anchor live in the data dir too; see [`AuditLog::open_anchored`].
    pub fn open(
        data_dir: &Path,
        durability: Durability,
    ) -> Result<(AuditLog, Recovered), AuditError> {
        create_private_dir(data_dir).map_err(|error| AuditError::Io {
            path: data_dir.to_owned(),
            error,
        })?;
        let anchoring = Anchoring::in_data_dir(data_dir)?;
        AuditLog::open_anchored(data_dir, durability, anchoring)
    }

    /// Opens the trail in `data_dir`, authenticated by `anchoring`'s key and anchor.
    ///
    /// Refuses a trail whose newest record fails its hash or MAC, that was written
    /// with another key, or that ends before its anchor (a deleted tail).
    pub fn open_anchored(
        data_dir: &Path,
        durability: Durability,
        anchoring: Anchoring,
    ) -> Result<(AuditLog, Recovered), AuditError> {
        create_private_dir(data_dir).map_err(|error| AuditError::Io {
            path: data_dir.to_owned(),
            error,
        })?;
        let store = SqliteStore::open(data_dir, durability)?;
        AuditLog::open_store(Arc::new(store), anchoring)
    }

    /// Opens the trail kept by `store`, authenticated by `anchoring`'s key and
    /// anchor, and starts its writer thread (and, when the store needs one, its syncer).
    ///
    /// Refuses a trail whose newest record fails its hash or MAC, that was written
    /// with another key, or that ends before its anchor (a deleted tail).
    pub fn open_store(
        store: Arc<dyn AuditStore>,
        anchoring: Anchoring,
    ) -> Result<(AuditLog, Recovered), AuditError> {
        let thread_error = |error| AuditError::Io {
            path: PathBuf::from(store.describe()),
            error,
        };
        let key = anchoring.key();
        let head = match store.head()? {
            Some(row) if !row.hash_is_valid() => {
                return Err(AuditError::TamperedTail(row.seq));
            }
            Some(row) => match key.check_record(&row.hash, row.mac.as_deref()) {
                MacCheck::Valid => ChainHead {
                    seq: row.seq,
                    hash: row.hash,
                },
                MacCheck::OtherKey(found) => {
                    return Err(AuditError::KeyMismatch {
                        seq: row.seq,
                        found,
                        expected: key.id().to_owned(),
                    });
                }
                MacCheck::Missing => return Err(AuditError::Unauthenticated(row.seq)),
                MacCheck::Invalid => return Err(AuditError::TamperedTail(row.seq)),
            },
            None => ChainHead::genesis(),
        };
        check_anchor(store.as_ref(), &anchoring, head.seq)?;
        // Proves the anchor is writable before anything is acknowledged.
        anchoring.write_anchor(head.seq, &head.hash)?;
        let last_mode_event = store.last_mode_event()?;
        let mode_event_problem = match &last_mode_event {
            Some(record) => check_chain_from(store.as_ref(), record.seq, key)?
                .map(|broken| format!("record {}: {}", broken.seq, broken.problem)),
            None => None,
        };
        let anchored_externally = anchoring.is_external();
        let anchor = Arc::new(AnchorWriter {
            file: anchoring.open_for_updates()?,
            head: Mutex::new((head.seq, head.hash.clone())),
            failing: AtomicBool::new(false),
        });

        let (sender, receiver) = mpsc::channel();
        let total = match store.free_space() {
            Some(Ok((_, total))) => total,
            _ => 0,
        };
        let (committed, _) = watch::channel(head.seq);
        let shared = Arc::new(Shared {
            health: AtomicU8::new(HEALTHY),
            generation: AtomicU64::new(0),
            low_space: AtomicBool::new(false),
            reserve: AtomicU64::new(DEFAULT_SPACE_RESERVE_BYTES.min(total / 10)),
            metrics: crate::metrics::AuditMetrics::default(),
            committed,
        });
        let syncer = match store.durable_sync()? {
            None => None,
            Some(sync) => {
                let (sync_sender, sync_receiver) = mpsc::channel();
                let syncer = Syncer {
                    sync,
                    shared: Arc::clone(&shared),
                    anchor: Arc::clone(&anchor),
                };
                std::thread::Builder::new()
                    .name("proxi-audit-sync".into())
                    .spawn(move || syncer.run(sync_receiver))
                    .map_err(thread_error)?;
                Some(sync_sender)
            }
        };
        let mut writer = Writer {
            store: Arc::clone(&store),
            shared: Arc::clone(&shared),
            anchor,
            syncer,
        };
        writer.check_space();
        std::thread::Builder::new()
            .name("proxi-audit-writer".into())
            .spawn(move || writer.run(receiver))
            .map_err(thread_error)?;
        Ok((
            AuditLog {
                sender,
                shared,
                store,
            },
            Recovered {
                records: head.seq,
                last_mode_event,
                mode_event_problem,
                anchored_externally,
            },
        ))
    }

    /// Sets the free space (bytes) kept for essential entries on the data dir's
    /// filesystem: below it, [`AuditLog::admit`] refuses agent traffic.
    pub fn set_space_reserve(&self, bytes: u64) {
        // Only the writer sets `low_space`, at its next commit or probe: it must see
        // the flag change, because a log short of space wakes up to check again.
        self.shared.reserve.store(bytes, Ordering::SeqCst);
    }

    /// The free space kept for essential entries, in bytes.
    pub fn space_reserve(&self) -> u64 {
        self.shared.reserve.load(Ordering::SeqCst)
    }

    /// Whether work of `priority` may start: call it before acting, because an
    /// action whose record is then refused would have happened unrecorded.
    ///
    /// Agent work is refused while the log recovers from a failed write
    /// ([`AuditError::Unavailable`]) or while free space is below the reserve
    /// ([`AuditError::LowSpace`]); essential work only once the log has failed for good.
    pub fn admit(&self, priority: Priority) -> Result<(), AuditError> {
        if !self.shared.accepts(priority) {
            return Err(AuditError::Unavailable);
        }
        if priority == Priority::Agent && self.shared.low_space.load(Ordering::SeqCst) {
            return Err(AuditError::LowSpace);
        }
        Ok(())
    }

    /// Queues an agent-priority entry. Never blocks and never does I/O.
    pub fn submit(&self, entry: AuditEntry) -> Pending {
        self.submit_with(entry, Priority::Agent)
    }

    /// Queues an entry of `priority`. Never blocks and never does I/O.
    ///
    /// Free space is not checked here: work that [`AuditLog::admit`] let start
    /// gets its record, which the reserve has room for.
    pub fn submit_with(&self, entry: AuditEntry, priority: Priority) -> Pending {
        self.submit_decided(entry, priority, None)
    }

    /// Queues an allowed decision taken under the shared-mode epoch
    /// `decided_epoch` (see [`AuditStore::append_decided`]): on a shared store whose
    /// mode moved on, it is recorded as refused and [`Pending::durable`] answers
    /// [`AuditError::ModeChanged`]. Never blocks and never does I/O.
    pub fn submit_decided(
        &self,
        entry: AuditEntry,
        priority: Priority,
        decided_epoch: Option<u64>,
    ) -> Pending {
        // Read before the health check: a failure in between bumps the generation,
        // so the writer refuses this job rather than commit it after the failure.
        let generation = self.shared.generation.load(Ordering::SeqCst);
        if !self.shared.accepts(priority) {
            return Pending(PendingState::Refused);
        }
        let (done, receiver) = oneshot::channel();
        let job = Job {
            entry,
            priority,
            generation,
            decided_epoch,
            done,
        };
        match self.sender.send(job) {
            Ok(()) => {
                self.shared.metrics.queue_depth.inc();
                Pending(PendingState::Queued(receiver))
            }
            Err(_) => Pending(PendingState::Refused),
        }
    }

    /// Queues an agent-priority entry and waits for it to be durable.
    pub async fn append(&self, entry: AuditEntry) -> Result<u64, AuditError> {
        self.submit(entry).durable().await
    }

    /// Queues an entry of `priority` and waits for it to be durable.
    pub async fn append_with(
        &self,
        entry: AuditEntry,
        priority: Priority,
    ) -> Result<u64, AuditError> {
        self.submit_with(entry, priority).durable().await
    }

    /// False from a failed write until a later write succeeds (and for good once
    /// the writer is gone or an fsync failed).
    pub fn is_healthy(&self) -> bool {
        self.shared.health() == HEALTHY
    }

    /// Whether free space was below the reserve at the writer's last check.
    pub fn is_low_on_space(&self) -> bool {
        self.shared.low_space.load(Ordering::SeqCst)
    }

    /// Where the trail is kept, for banners and logs.
    pub fn describe(&self) -> String {
        self.store.describe()
    }

    /// The store the trail is kept in, for reads (queries, verification).
    pub fn store(&self) -> &Arc<dyn AuditStore> {
        &self.store
    }

    /// The series this log updates (records, commit seconds, queue depth).
    pub fn metrics(&self) -> &crate::metrics::AuditMetrics {
        &self.shared.metrics
    }

    /// The newest `limit` records, oldest first.
    pub fn recent(&self, limit: u32) -> Result<Vec<AuditRecord>, AuditError> {
        self.store.recent(limit)
    }

    /// Answers a filtered query (see [`AuditQuery`]); blocking I/O.
    pub fn query(&self, query: &AuditQuery) -> Result<AuditPage, AuditError> {
        self.store.query(query)
    }

    /// Follows the seq of the newest durable record: it changes once the record
    /// is durable and before its caller is answered, so a reader that sees seq N
    /// can read every record up to N, and a caller told seq N finds it at N or past.
    pub fn committed(&self) -> watch::Receiver<u64> {
        self.shared.committed.subscribe()
    }
}

/// Commit acknowledgements waiting for an fsync: each caller, its sequence number,
/// and whether its decision was recorded as refused for a stale epoch.
type Acks = Vec<(oneshot::Sender<Result<u64, AuditError>>, u64, bool)>;

/// What a caller is told about its committed record.
fn acknowledgement(seq: u64, stale: bool) -> Result<u64, AuditError> {
    if stale {
        Err(AuditError::ModeChanged(seq))
    } else {
        Ok(seq)
    }
}

struct Writer {
    store: Arc<dyn AuditStore>,
    shared: Arc<Shared>,
    /// Records the committed head in the anchor (here, or after the syncer's fsync).
    anchor: Arc<AnchorWriter>,
    /// Present when the store's commits are not durable by themselves
    /// (`Durability::Full` on SQLite): committed batches wait there for their sync.
    syncer: Option<mpsc::Sender<Acks>>,
}

/// Makes durable every batch the writer committed since the last sync.
struct Syncer {
    sync: Box<dyn DurableSync>,
    shared: Arc<Shared>,
    anchor: Arc<AnchorWriter>,
}

impl Syncer {
    fn run(mut self, receiver: mpsc::Receiver<Acks>) {
        while let Ok(mut acks) = receiver.recv() {
            while let Ok(more) = receiver.try_recv() {
                acks.extend(more);
            }
            // Read before the fsync: every commit that set this head is covered by it.
            let head = self.anchor.head();
            let synced = if self.shared.health() == FAILED {
                Err(std::io::Error::other("an earlier fsync failed"))
            } else {
                self.sync.sync()
            };
            match synced {
                Ok(()) => {
                    self.anchor.persist(head);
                    // Published before the acks: a caller told its seq finds the
                    // watch at or past it (a stream it opens next starts after it).
                    if let Some(newest) = acks.iter().map(|(_, seq, _)| *seq).max() {
                        self.shared.publish_committed(newest);
                    }
                    for (done, seq, stale) in acks {
                        let _ = done.send(acknowledgement(seq, stale));
                    }
                }
                Err(error) => {
                    tracing::error!(%error, "audit fsync failed; refusing everything until restart");
                    self.shared.fail_permanently();
                    for (done, _, _) in acks {
                        let _ = done.send(Err(AuditError::Unavailable));
                    }
                }
            }
        }
    }
}

impl Writer {
    fn run(mut self, receiver: mpsc::Receiver<Job>) {
        let mut batch = Vec::with_capacity(64);
        loop {
            // A healthy log with room to spare sleeps until work arrives; otherwise
            // it wakes up regularly to find out whether things got better.
            let watching =
                self.shared.health() == RECOVERING || self.shared.low_space.load(Ordering::SeqCst);
            let job = if watching {
                match receiver.recv_timeout(PROBE_INTERVAL) {
                    Ok(job) => job,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        self.probe();
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            } else {
                match receiver.recv() {
                    Ok(job) => job,
                    Err(_) => return,
                }
            };
            batch.push(job);
            while batch.len() < MAX_BATCH {
                match receiver.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            self.shared.metrics.queue_depth.dec_by(batch.len() as i64);
            self.process(&mut batch);
        }
    }

    /// Commits what may be committed of `batch` and answers every caller in it.
    fn process(&mut self, batch: &mut Vec<Job>) {
        let health = self.shared.health();
        let generation = self.shared.generation.load(Ordering::SeqCst);
        let writable = |job: &Job| {
            job.generation == generation
                && match health {
                    HEALTHY => true,
                    RECOVERING => job.priority == Priority::Essential,
                    _ => false,
                }
        };
        if !batch.iter().all(writable) {
            let (keep, refuse): (Vec<Job>, Vec<Job>) = batch.drain(..).partition(writable);
            for job in refuse {
                let _ = job.done.send(Err(AuditError::Unavailable));
            }
            *batch = keep;
        }
        if batch.is_empty() {
            return;
        }
        let started = std::time::Instant::now();
        let committed = self.commit(batch);
        self.shared
            .metrics
            .commit_seconds
            .observe(started.elapsed().as_secs_f64());
        match committed {
            Ok((seqs, stale)) => {
                self.shared.metrics.records.inc_by(batch.len() as u64);
                if health == RECOVERING {
                    self.recovered();
                }
                self.check_space();
                let acks: Acks = batch
                    .drain(..)
                    .zip(seqs)
                    .enumerate()
                    .map(|(index, (job, seq))| (job.done, seq, stale.contains(&index)))
                    .collect();
                match &self.syncer {
                    Some(syncer) => {
                        if let Err(mpsc::SendError(acks)) = syncer.send(acks) {
                            self.shared.fail_permanently();
                            for (done, _, _) in acks {
                                let _ = done.send(Err(AuditError::Unavailable));
                            }
                        }
                    }
                    None => {
                        // Published before the acks: a reader woken by an ack (a stream
                        // opened right after a call) must not see an older head.
                        if let Some(newest) = acks.iter().map(|(_, seq, _)| *seq).max() {
                            self.shared.publish_committed(newest);
                        }
                        for (done, seq, stale) in acks {
                            // A caller that gave up waiting is not an error for the log.
                            let _ = done.send(acknowledgement(seq, stale));
                        }
                    }
                }
            }
            Err(error) => {
                tracing::error!(%error, "audit write failed; refusing agent traffic until writes succeed again");
                self.write_failed();
                for job in batch.drain(..) {
                    let _ = job.done.send(Err(AuditError::Unavailable));
                }
            }
        }
    }

    /// After a failed commit: nothing of the batch was acknowledged. Entries queued
    /// before now may rest on state that was never recorded (a mode change in the
    /// failed batch), so bumping the generation refuses them all.
    fn write_failed(&mut self) {
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
        let _ = self.shared.health.compare_exchange(
            HEALTHY,
            RECOVERING,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
        self.check_space();
        if let Err(error) = self.store.reset() {
            // Commits reload the head again before writing; until that works, none happens.
            tracing::error!(%error, "cannot re-read the audit chain head");
        }
    }

    fn recovered(&self) {
        if self
            .shared
            .health
            .compare_exchange(RECOVERING, HEALTHY, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            tracing::warn!("audit writes succeed again; accepting agent traffic");
        }
    }

    /// Re-checks free space, and while recovering tries a small write: when it
    /// succeeds the log accepts agent traffic again.
    fn probe(&mut self) {
        self.check_space();
        if self.shared.health() != RECOVERING {
            return;
        }
        match self.store.probe() {
            Ok(_) => self.recovered(),
            Err(error) => tracing::debug!(%error, "audit write probe failed"),
        }
    }

    /// Records whether free space is below the reserve; logs each change.
    fn check_space(&mut self) {
        let reserve = self.shared.reserve.load(Ordering::SeqCst);
        let low = match self.store.free_space() {
            // A store off the local filesystem keeps its own reserve.
            None => false,
            Some(Ok((free, _))) => free < reserve,
            Some(Err(error)) => {
                tracing::warn!(%error, "cannot read free disk space; treating it as low");
                true
            }
        };
        if self.shared.low_space.swap(low, Ordering::SeqCst) != low {
            if low {
                tracing::warn!(
                    reserve_bytes = reserve,
                    "free disk space is below the audit reserve; refusing agent traffic"
                );
            } else {
                tracing::warn!("free disk space is above the audit reserve again");
            }
        }
    }

    /// Writes the batch in one transaction; returns each job's seq, and the indexes
    /// of the decisions a shared store recorded as refused for a stale epoch.
    fn commit(&mut self, batch: &[Job]) -> Result<(Vec<u64>, Vec<usize>), AuditError> {
        let entries: Vec<&AuditEntry> = batch.iter().map(|job| &job.entry).collect();
        let appended = if batch.iter().any(|job| job.decided_epoch.is_some()) {
            let epochs: Vec<Option<u64>> = batch.iter().map(|job| job.decided_epoch).collect();
            self.store
                .append_decided(&entries, &epochs, self.anchor.key())?
        } else {
            self.store.append(&entries, self.anchor.key())?
        };
        if appended.seqs.len() != batch.len() {
            return Err(AuditError::Encoding(
                "the store answered a batch with the wrong number of records".to_owned(),
            ));
        }
        let head = appended.head;
        self.anchor
            .committed(head.seq, &head.hash, self.syncer.is_none());
        Ok((appended.seqs, appended.stale))
    }
}

/// The committed chain head, and writing it to the anchor file.
struct AnchorWriter {
    file: AnchorFile,
    head: Mutex<(u64, String)>,
    failing: AtomicBool,
}

impl AnchorWriter {
    fn key(&self) -> &AuditKey {
        self.file.key()
    }

    fn head(&self) -> (u64, String) {
        self.head
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Notes a commit; with `persist_now` (no fsync to wait for) also writes the anchor.
    fn committed(&self, seq: u64, hash: &str, persist_now: bool) {
        *self.head.lock().unwrap_or_else(PoisonError::into_inner) = (seq, hash.to_owned());
        if persist_now {
            self.persist((seq, hash.to_owned()));
        }
    }

    /// Writes the anchor. A failure leaves the old, lower anchor in place (it is never
    /// ahead of the trail, so nothing false is claimed) and is logged once until it heals.
    fn persist(&self, (seq, hash): (u64, String)) {
        match self.file.update(seq, &hash) {
            Ok(()) => {
                if self.failing.swap(false, Ordering::AcqRel) {
                    tracing::info!("the audit anchor is written again");
                }
            }
            Err(error) => {
                if !self.failing.swap(true, Ordering::AcqRel) {
                    tracing::error!(%error, "cannot update the audit anchor; a deleted tail after record {seq} would go unnoticed until it is written again");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use rusqlite::{Connection, params};
    use serde_json::json;
    use sha2::{Digest, Sha256};

    fn entry(n: i64) -> AuditEntry {
        AuditEntry {
            time: Utc::now(),
            principal: crate::principal::Principal::agent(),
            kind: EntryKind::ToolCall,
            tool: Some("scale_fleet".into()),
            arguments: Some(json!({"count": n})),
            mode: Arc::from("EMERGENCY"),
            decision: AuditDecision::Allowed,
            reason_code: None,
            outcome: "executed",
            detail: json!({"fleet_size": n}),
            expires_at: None,
            context: None,
            policy_hash: None,
        }
    }

    async fn log_with(dir: &Path, count: i64) -> AuditLog {
        let (log, _) = AuditLog::open(dir, Durability::Process).unwrap();
        for n in 1..=count {
            log.append(entry(n)).await.unwrap();
        }
        log
    }

    fn tamper(dir: &Path, sql: &str) {
        Connection::open(dir.join(AUDIT_DB_FILE))
            .unwrap()
            .execute_batch(sql)
            .unwrap();
    }

    fn first_bad(dir: &Path) -> Option<u64> {
        verify(&dir.join(AUDIT_DB_FILE))
            .unwrap()
            .first_bad
            .map(|broken| broken.seq)
    }

    fn seqs(page: &AuditPage) -> Vec<u64> {
        page.records.iter().map(|record| record.seq).collect()
    }

    /// Ten records: odd ones by `agent` calling `restart_service` (denied), even
    /// ones by `operator` calling `scale_fleet` (allowed).
    async fn mixed_log(dir: &Path) -> AuditLog {
        let (log, _) = AuditLog::open(dir, Durability::Process).unwrap();
        for n in 1..=10 {
            let mut record = entry(n);
            if n % 2 == 1 {
                record.tool = Some("restart_service".into());
                record.decision = AuditDecision::Denied;
                record.reason_code = Some(crate::reason::Reason::BlockedInMode);
            } else {
                record.principal = crate::principal::Principal::operator();
            }
            log.append(record).await.unwrap();
        }
        log
    }

    #[tokio::test]
    async fn a_query_filters_and_pages_with_a_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let log = mixed_log(dir.path()).await;
        let agent = AuditQuery {
            principal: Some("agent".into()),
            after_seq: Some(0),
            limit: 2,
            ..AuditQuery::default()
        };
        let page = log.query(&agent).unwrap();
        assert_eq!(seqs(&page), [1, 3]);
        assert_eq!(page.next_after_seq, Some(3));
        let page = log
            .query(&AuditQuery {
                after_seq: Some(7),
                ..agent.clone()
            })
            .unwrap();
        assert_eq!(seqs(&page), [9]);
        assert_eq!(page.next_after_seq, None, "no more match");
        // Without a cursor: the newest matching records, oldest first.
        let newest = log
            .query(&AuditQuery {
                after_seq: None,
                ..agent
            })
            .unwrap();
        assert_eq!(seqs(&newest), [7, 9]);
        assert_eq!(newest.next_after_seq, None);
    }

    #[tokio::test]
    async fn every_filter_of_a_query_applies() {
        let dir = tempfile::tempdir().unwrap();
        let log = mixed_log(dir.path()).await;
        let all = |query: AuditQuery| {
            seqs(
                &log.query(&AuditQuery {
                    limit: 100,
                    ..query
                })
                .unwrap(),
            )
        };
        let odd = vec![1, 3, 5, 7, 9];
        let even = vec![2, 4, 6, 8, 10];
        assert_eq!(all(AuditQuery::default()).len(), 10);
        assert_eq!(
            all(AuditQuery {
                tool: Some("restart_*".into()),
                ..AuditQuery::default()
            }),
            odd
        );
        assert_eq!(
            all(AuditQuery {
                tool: Some("*_fleet".into()),
                ..AuditQuery::default()
            }),
            even
        );
        assert_eq!(
            all(AuditQuery {
                tool: Some("restart".into()),
                ..AuditQuery::default()
            }),
            Vec::<u64>::new(),
            "without a star the name is exact"
        );
        assert_eq!(
            all(AuditQuery {
                tool: Some("restart?service".into()),
                ..AuditQuery::default()
            }),
            Vec::<u64>::new(),
            "only a star is a wildcard"
        );
        assert_eq!(
            all(AuditQuery {
                decision: Some("allowed".into()),
                ..AuditQuery::default()
            }),
            even
        );
        assert_eq!(
            all(AuditQuery {
                reason_code: Some(crate::reason::Reason::BlockedInMode.as_str().into()),
                kind: Some("tool_call".into()),
                ..AuditQuery::default()
            }),
            odd
        );
        assert!(
            all(AuditQuery {
                kind: Some("mode_change".into()),
                ..AuditQuery::default()
            })
            .is_empty()
        );
        let future = Utc::now() + chrono::Duration::hours(1);
        assert!(
            all(AuditQuery {
                since: Some(future),
                ..AuditQuery::default()
            })
            .is_empty()
        );
        assert_eq!(
            all(AuditQuery {
                until: Some(future),
                ..AuditQuery::default()
            })
            .len(),
            10
        );
        // The store's answer is the one the reference filter gives.
        let query = AuditQuery {
            principal: Some("agent".into()),
            tool: Some("*service".into()),
            limit: 100,
            ..AuditQuery::default()
        };
        let expected: Vec<u64> = log
            .recent(100)
            .unwrap()
            .iter()
            .filter(|record| query.matches(record))
            .map(|record| record.seq)
            .collect();
        assert_eq!(seqs(&log.query(&query).unwrap()), expected);
    }

    #[tokio::test]
    async fn committed_follows_the_newest_durable_record() {
        let dir = tempfile::tempdir().unwrap();
        drop(log_with(dir.path(), 2).await);
        for durability in [Durability::Process, Durability::Full] {
            let (log, _) = AuditLog::open(dir.path(), durability).unwrap();
            let mut committed = log.committed();
            let start = *committed.borrow_and_update();
            let seq = log.append(entry(9)).await.unwrap();
            assert_eq!(seq, start + 1);
            committed.changed().await.unwrap();
            assert_eq!(*committed.borrow(), seq);
        }
    }

    #[tokio::test]
    async fn an_intact_chain_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_with(dir.path(), 5).await;
        let report = log.store().verify(None).unwrap();
        assert_eq!(report.records, 5);
        assert_eq!(report.first_bad, None);
        let records = log.recent(2).unwrap();
        assert_eq!(records.iter().map(|r| r.seq).collect::<Vec<_>>(), [4, 5]);
        assert_eq!(records[1].prev_hash, records[0].hash);
        assert_eq!(records[1].arguments, Some(json!({"count": 5})));
    }

    #[tokio::test]
    async fn concurrent_appends_get_distinct_sequence_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = AuditLog::open(dir.path(), Durability::Process).unwrap();
        let pendings: Vec<Pending> = (0..500).map(|n| log.submit(entry(n))).collect();
        let mut seqs = Vec::new();
        for pending in pendings {
            seqs.push(pending.durable().await.unwrap());
        }
        assert_eq!(seqs, (1..=500).collect::<Vec<u64>>());
        assert_eq!(first_bad(dir.path()), None);
    }

    #[tokio::test]
    async fn full_durability_acknowledges_every_record_after_its_fsync() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = AuditLog::open(dir.path(), Durability::Full).unwrap();
        let pendings: Vec<Pending> = (0..300).map(|n| log.submit(entry(n))).collect();
        let mut seqs = Vec::new();
        for pending in pendings {
            seqs.push(pending.durable().await.unwrap());
        }
        assert_eq!(seqs, (1..=300).collect::<Vec<u64>>());
        assert!(dir.path().join("audit.db-wal").exists());
        assert_eq!(first_bad(dir.path()), None);
    }

    #[tokio::test]
    async fn an_edited_record_is_named() {
        let dir = tempfile::tempdir().unwrap();
        drop(log_with(dir.path(), 5).await);
        tamper(
            dir.path(),
            "UPDATE audit_log SET outcome = 'denied' WHERE seq = 3",
        );
        assert_eq!(first_bad(dir.path()), Some(3));
    }

    #[tokio::test]
    async fn a_deleted_record_is_named() {
        let dir = tempfile::tempdir().unwrap();
        drop(log_with(dir.path(), 5).await);
        tamper(dir.path(), "DELETE FROM audit_log WHERE seq = 2");
        assert_eq!(first_bad(dir.path()), Some(3));
    }

    #[tokio::test]
    async fn a_deleted_tail_is_noticed() {
        let dir = tempfile::tempdir().unwrap();
        drop(log_with(dir.path(), 5).await);
        tamper(dir.path(), "DELETE FROM audit_log WHERE seq >= 4");
        assert_eq!(first_bad(dir.path()), Some(4));
    }

    #[tokio::test]
    async fn reordered_records_are_named() {
        let dir = tempfile::tempdir().unwrap();
        drop(log_with(dir.path(), 5).await);
        tamper(
            dir.path(),
            "UPDATE audit_log SET seq = 100 WHERE seq = 2;
             UPDATE audit_log SET seq = 2 WHERE seq = 4;
             UPDATE audit_log SET seq = 4 WHERE seq = 100;",
        );
        assert_eq!(first_bad(dir.path()), Some(2));
    }

    #[tokio::test]
    async fn a_reopened_log_continues_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        drop(log_with(dir.path(), 3).await);
        let (log, recovered) = AuditLog::open(dir.path(), Durability::Process).unwrap();
        assert_eq!(recovered.records, 3);
        assert_eq!(log.append(entry(4)).await.unwrap(), 4);
        assert_eq!(first_bad(dir.path()), None);
    }

    #[tokio::test]
    async fn a_forged_tail_stops_the_log_from_opening() {
        let dir = tempfile::tempdir().unwrap();
        drop(log_with(dir.path(), 3).await);
        tamper(
            dir.path(),
            "UPDATE audit_log SET principal = 'nobody' WHERE seq = 3",
        );
        assert!(matches!(
            AuditLog::open(dir.path(), Durability::Process),
            Err(AuditError::TamperedTail(3))
        ));
    }

    #[test]
    fn a_digest_keeps_a_prefix_and_the_hash_of_the_whole_text() {
        let value = json!({"blob": "é".repeat(2000)});
        let text = serde_json::to_string(&value).unwrap();
        let digest = json_digest(&value);
        assert_eq!(digest["truncated"], true);
        assert_eq!(digest["bytes"], text.len());
        assert_eq!(
            digest["sha256"],
            hex::encode(Sha256::digest(text.as_bytes()))
        );
        let prefix = digest["prefix"].as_str().unwrap();
        assert!(prefix.len() <= STORED_PREFIX_BYTES && text.starts_with(prefix));
        let small = json_digest(&json!({"a": 1}));
        assert_eq!(small["truncated"], false);
        assert_eq!(small["prefix"], "{\"a\":1}");
    }

    #[tokio::test]
    async fn every_variable_field_of_a_record_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = AuditLog::open(dir.path(), Durability::Process).unwrap();
        let mut huge = entry(1);
        huge.principal =
            crate::principal::Principal::named(&"p".repeat(10_000), crate::principal::Role::Agent);
        huge.tool = Some("t".repeat(10_000));
        huge.arguments = Some(json!({"a": "x".repeat(100_000)}));
        huge.detail = json!("d".repeat(100_000));
        huge.context = Some(json!({"c": "y".repeat(100_000)}));
        log.append(huge).await.unwrap();
        let record = log.recent(1).unwrap().remove(0);
        // Its JSON as `GET /audit` sends it: every field, the bounded ones included.
        let stored = serde_json::to_string(&crate::api::AuditRecord::from(&record)).unwrap();
        assert!(stored.len() < MAX_RECORD_BYTES, "{} bytes", stored.len());
        assert_eq!(record.principal.len(), MAX_STORED_NAME_BYTES);
        for field in [
            &record.arguments.unwrap(),
            &record.detail,
            &record.context.unwrap(),
        ] {
            assert_eq!(field["truncated"], true, "{field}");
            assert_eq!(field["sha256"].as_str().unwrap().len(), 64);
        }
        assert_eq!(first_bad(dir.path()), None);
    }

    #[tokio::test]
    async fn the_context_is_stored_and_covered_by_the_hash() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = AuditLog::open(dir.path(), Durability::Process).unwrap();
        let mut with_context = entry(1);
        with_context.context = Some(json!({"ticket": "INC-42"}));
        log.append(with_context).await.unwrap();
        log.append(entry(2)).await.unwrap();
        let records = log.recent(2).unwrap();
        assert_eq!(records[0].context, Some(json!({"ticket": "INC-42"})));
        assert_eq!(records[1].context, None);
        drop(log);
        tamper(
            dir.path(),
            r#"UPDATE audit_log SET context = '{"ticket":"INC-43"}' WHERE seq = 1"#,
        );
        assert_eq!(first_bad(dir.path()), Some(1));
    }

    #[tokio::test]
    async fn a_trail_from_before_context_verifies_and_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        drop(log_with(dir.path(), 3).await);
        // The schema of earlier versions: no context column.
        tamper(dir.path(), "ALTER TABLE audit_log DROP COLUMN context");
        assert_eq!(verify(&dir.path().join(AUDIT_DB_FILE)).unwrap().records, 3);
        assert_eq!(first_bad(dir.path()), None);
        let (log, recovered) = AuditLog::open(dir.path(), Durability::Process).unwrap();
        assert_eq!(recovered.records, 3);
        let mut with_context = entry(4);
        with_context.context = Some(json!({"why": "after migration"}));
        assert_eq!(log.append(with_context).await.unwrap(), 4);
        assert_eq!(first_bad(dir.path()), None);
    }

    #[tokio::test]
    async fn the_policy_hash_is_stored_and_covered_by_the_hash() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = AuditLog::open(dir.path(), Durability::Process).unwrap();
        let mut with_version = entry(1);
        with_version.policy_hash = Some(Arc::from("ab".repeat(40).as_str()));
        log.append(with_version).await.unwrap();
        log.append(entry(2)).await.unwrap();
        let records = log.recent(2).unwrap();
        // Cut to the length of a SHA-256 in hex.
        assert_eq!(records[0].policy_hash, Some("ab".repeat(32)));
        assert_eq!(records[1].policy_hash, None);
        drop(log);
        assert_eq!(first_bad(dir.path()), None);
        tamper(
            dir.path(),
            "UPDATE audit_log SET policy_hash = 'cd' WHERE seq = 1",
        );
        assert_eq!(first_bad(dir.path()), Some(1));
    }

    #[tokio::test]
    async fn a_trail_from_before_policy_hash_verifies_and_is_migrated() {
        let dir = tempfile::tempdir().unwrap();
        drop(log_with(dir.path(), 3).await);
        tamper(dir.path(), "ALTER TABLE audit_log DROP COLUMN policy_hash");
        assert_eq!(verify(&dir.path().join(AUDIT_DB_FILE)).unwrap().records, 3);
        let (log, recovered) = AuditLog::open(dir.path(), Durability::Process).unwrap();
        assert_eq!(recovered.records, 3);
        let mut with_version = entry(4);
        with_version.policy_hash = Some(Arc::from("0f".repeat(32).as_str()));
        assert_eq!(log.append(with_version).await.unwrap(), 4);
        assert_eq!(first_bad(dir.path()), None);
    }

    #[tokio::test]
    async fn below_the_reserve_only_essential_work_is_admitted() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = AuditLog::open(dir.path(), Durability::Process).unwrap();
        assert!(log.admit(Priority::Agent).is_ok());
        log.set_space_reserve(u64::MAX);
        // The writer notices at its next commit.
        log.append(entry(1)).await.unwrap();
        assert!(matches!(
            log.admit(Priority::Agent),
            Err(AuditError::LowSpace)
        ));
        assert!(log.admit(Priority::Essential).is_ok());
        assert_eq!(
            log.append_with(entry(2), Priority::Essential)
                .await
                .unwrap(),
            2
        );
        // Space comes back: the writer's periodic check lifts the refusal by itself.
        log.set_space_reserve(0);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while log.admit(Priority::Agent).is_err() {
            assert!(std::time::Instant::now() < deadline, "still refused");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!log.is_low_on_space());
    }

    /// Makes every insert into the chain fail, as a full disk would, until removed.
    const BREAK_WRITES: &str = "CREATE TRIGGER break_writes BEFORE INSERT ON audit_log
        BEGIN SELECT RAISE(ABORT, 'injected write failure'); END;";

    #[tokio::test]
    async fn a_failed_write_refuses_agents_until_a_write_succeeds_again() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = AuditLog::open(dir.path(), Durability::Full).unwrap();
        log.append(entry(1)).await.unwrap();
        tamper(dir.path(), BREAK_WRITES);
        assert!(log.append(entry(2)).await.is_err());
        assert!(!log.is_healthy());
        assert!(matches!(
            log.admit(Priority::Agent),
            Err(AuditError::Unavailable)
        ));
        assert!(log.admit(Priority::Essential).is_ok());
        assert!(log.append(entry(3)).await.is_err(), "agents are refused");
        let essential = log.append_with(entry(4), Priority::Essential);
        assert!(essential.await.is_err(), "the write still fails");

        tamper(dir.path(), "DROP TRIGGER break_writes");
        // An essential write is also a probe: its success ends the recovery.
        let seq = log
            .append_with(entry(5), Priority::Essential)
            .await
            .unwrap();
        assert_eq!(seq, 2, "failed batches leave no hole in the chain");
        assert!(log.is_healthy());
        assert_eq!(log.append(entry(6)).await.unwrap(), 3);
        assert_eq!(first_bad(dir.path()), None);
    }

    #[tokio::test]
    async fn the_probe_makes_the_log_healthy_again_without_traffic() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = AuditLog::open(dir.path(), Durability::Process).unwrap();
        tamper(dir.path(), BREAK_WRITES);
        assert!(log.append(entry(1)).await.is_err());
        tamper(dir.path(), "DROP TRIGGER break_writes");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !log.is_healthy() {
            assert!(
                std::time::Instant::now() < deadline,
                "the probe never succeeded"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(log.append(entry(2)).await.unwrap(), 1);
        assert_eq!(first_bad(dir.path()), None);
    }

    #[tokio::test]
    async fn entries_queued_before_a_failure_are_refused_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = AuditLog::open(dir.path(), Durability::Process).unwrap();
        log.append(entry(1)).await.unwrap();
        // Hold the write lock so that everything is queued before the first batch
        // fails; only the record of entry(0) is refused by the database, so later
        // batches could be written if nothing stopped them.
        let blocker = Connection::open(dir.path().join(AUDIT_DB_FILE)).unwrap();
        blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
        let mut pendings: Vec<Pending> = (0..MAX_BATCH as i64 + 500)
            .map(|n| log.submit_with(entry(n), Priority::Essential))
            .collect();
        blocker
            .execute_batch(
                r#"CREATE TRIGGER break_one BEFORE INSERT ON audit_log
                   WHEN NEW.arguments = '{"count":0}'
                   BEGIN SELECT RAISE(ABORT, 'injected write failure'); END;"#,
            )
            .unwrap();
        blocker.execute_batch("COMMIT").unwrap();
        let first = pendings.remove(0);
        assert!(first.durable().await.is_err(), "the first batch fails");
        let mut written = Vec::new();
        for pending in pendings {
            if let Ok(seq) = pending.durable().await {
                written.push(seq);
            }
        }
        // They were decided before the failure, perhaps under state that the failed
        // batch recorded: none of them may be written after it.
        assert!(written.is_empty(), "{} written", written.len());
        assert!(!log.is_healthy());
        let seq = log
            .append_with(entry(5), Priority::Essential)
            .await
            .unwrap();
        assert_eq!(seq, 2);
        assert_eq!(first_bad(dir.path()), None);
    }

    #[tokio::test]
    async fn the_last_mode_event_is_recovered() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_with(dir.path(), 1).await;
        let mut change = entry(0);
        change.kind = EntryKind::ModeChange;
        change.tool = None;
        change.arguments = None;
        change.outcome = "changed";
        log.append(change).await.unwrap();
        log.append(entry(2)).await.unwrap();
        drop(log);
        let (_, recovered) = AuditLog::open(dir.path(), Durability::Process).unwrap();
        assert_eq!(recovered.last_mode_event.map(|record| record.seq), Some(2));
    }

    fn anchoring(dir: &Path) -> Anchoring {
        Anchoring::in_data_dir(dir).unwrap()
    }

    fn anchored_problem(dir: &Path, anchoring: &Anchoring) -> Option<BrokenRecord> {
        verify_anchored(&dir.join(AUDIT_DB_FILE), anchoring)
            .unwrap()
            .first_bad
    }

    /// Recomputes every hash as someone without the key would after an edit.
    fn rehash(dir: &Path) {
        let connection = Connection::open(dir.join(AUDIT_DB_FILE)).unwrap();
        let columns = select_columns(&connection).unwrap();
        let rows: Vec<StoredRecord> = connection
            .prepare(&format!("SELECT {columns} FROM audit_log ORDER BY seq"))
            .unwrap()
            .query_map([], StoredRecord::from_sql)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let mut previous = GENESIS_HASH.to_owned();
        for row in rows {
            let hash = String::from_utf8(row.fields().hash(&previous).to_vec()).unwrap();
            connection
                .execute(
                    "UPDATE audit_log SET prev_hash = ?1, hash = ?2 WHERE seq = ?3",
                    params![previous, hash, row.seq as i64],
                )
                .unwrap();
            previous = hash;
        }
    }

    #[tokio::test]
    async fn an_anchored_chain_verifies_and_names_its_anchor() {
        let dir = tempfile::tempdir().unwrap();
        drop(log_with(dir.path(), 4).await);
        let report =
            verify_anchored(&dir.path().join(AUDIT_DB_FILE), &anchoring(dir.path())).unwrap();
        assert_eq!(report.first_bad, None);
        assert_eq!(report.anchored_seq, Some(4));
        assert_eq!(report.anchored_externally, Some(false));
    }

    #[tokio::test]
    async fn a_truncated_tail_is_caught_by_the_anchor_even_with_sqlite_sequence_fixed() {
        let dir = tempfile::tempdir().unwrap();
        drop(log_with(dir.path(), 5).await);
        tamper(
            dir.path(),
            "DELETE FROM audit_log WHERE seq >= 4; UPDATE sqlite_sequence SET seq = 3 WHERE name = 'audit_log';",
        );
        assert_eq!(
            first_bad(dir.path()),
            None,
            "the hash chain alone cannot tell"
        );
        let broken = anchored_problem(dir.path(), &anchoring(dir.path())).unwrap();
        assert_eq!(broken.seq, 4);
        assert!(broken.problem.contains("truncated"), "{}", broken.problem);
        assert!(matches!(
            AuditLog::open(dir.path(), Durability::Process),
            Err(AuditError::Truncated {
                last: 3,
                anchored: 5,
                ..
            })
        ));
    }

    #[tokio::test]
    async fn a_rehashed_edit_is_named_by_its_mac() {
        let dir = tempfile::tempdir().unwrap();
        drop(log_with(dir.path(), 5).await);
        tamper(
            dir.path(),
            "UPDATE audit_log SET principal = 'operator' WHERE seq = 2",
        );
        rehash(dir.path());
        assert_eq!(
            first_bad(dir.path()),
            None,
            "the hash chain alone cannot tell"
        );
        let broken = anchored_problem(dir.path(), &anchoring(dir.path())).unwrap();
        assert_eq!(broken.seq, 2);
        assert!(broken.problem.contains("re-hashed"), "{}", broken.problem);
        assert!(matches!(
            AuditLog::open(dir.path(), Durability::Process),
            Err(AuditError::TamperedTail(5))
        ));
    }

    #[tokio::test]
    async fn another_key_is_reported_as_a_key_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        drop(log_with(dir.path(), 2).await);
        let other = tempfile::tempdir().unwrap();
        let wrong = Anchoring::external(AuditKey::from_bytes([9; 32]), &other.path().join("cred"));
        let broken = anchored_problem(dir.path(), &wrong).unwrap();
        assert_eq!(broken.seq, 1);
        assert!(
            broken.problem.contains("key mismatch"),
            "{}",
            broken.problem
        );
        assert!(matches!(
            AuditLog::open_anchored(dir.path(), Durability::Process, wrong),
            Err(AuditError::KeyMismatch { seq: 2, .. })
        ));
    }

    #[tokio::test]
    async fn an_edited_mode_change_before_the_tail_is_reported_at_startup() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_with(dir.path(), 1).await;
        let mut change = entry(0);
        change.kind = EntryKind::ModeChange;
        change.expires_at = Some(Utc::now());
        log.append(change).await.unwrap();
        log.append(entry(3)).await.unwrap();
        drop(log);
        let (_, recovered) = AuditLog::open(dir.path(), Durability::Process).unwrap();
        assert_eq!(recovered.mode_event_problem, None);
        tamper(
            dir.path(),
            "UPDATE audit_log SET expires_at = '2099-01-01T00:00:00.000000Z' WHERE seq = 2",
        );
        let (_, recovered) = AuditLog::open(dir.path(), Durability::Process).unwrap();
        assert_eq!(recovered.last_mode_event.map(|record| record.seq), Some(2));
        let problem = recovered.mode_event_problem.unwrap();
        assert!(problem.starts_with("record 2:"), "{problem}");
    }
}
