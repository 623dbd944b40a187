//! The seam between the audit log and where its records live: the [`AuditStore`]
//! trait, the query every store answers, and the checks that work on any store
//! (chain verification, the anchor check at startup).

use chrono::{DateTime, Utc};

use super::*;
use crate::anchor::{Anchoring, AuditKey};

/// Most records one query returns.
pub const MAX_QUERY_LIMIT: u32 = 1000;

/// A filtered read of the trail. Every filter is optional; all given must match.
///
/// With `after_seq = N` the answer is the records with seq > N, oldest first, up
/// to `limit`; without it, the newest `limit` matching records, oldest first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditQuery {
    /// Exact principal (`agent`, `operator`, `mcp:<client>`, ...).
    pub principal: Option<String>,
    /// Exact kind (`tool_call`, `mode_change`, ...).
    pub kind: Option<String>,
    /// Tool name, exact or a glob in which `*` matches any run of characters.
    pub tool: Option<String>,
    /// Exact decision (`allowed`, `denied`, `rejected`).
    pub decision: Option<String>,
    /// Exact reason code.
    pub reason_code: Option<String>,
    /// Records at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Records strictly before this time.
    pub until: Option<DateTime<Utc>>,
    /// The cursor: only records with a greater seq, oldest first.
    pub after_seq: Option<u64>,
    /// Most records returned; clamped to 1..=[`MAX_QUERY_LIMIT`].
    pub limit: u32,
}

/// A query filter that no record can match, because it names a value outside
/// the trail's vocabulary: answered as an error rather than as an empty page, so
/// a typo is not mistaken for "nothing happened".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// `kind` is none of [`EntryKind::ALL`] nor [`RETIRED_KINDS`].
    #[error("unknown kind {0:?}; the kinds are {kinds}", kinds = EntryKind::ALL.map(EntryKind::as_str).join(", "))]
    UnknownKind(String),
    /// `decision` is none of [`AuditDecision::ALL`].
    #[error("unknown decision {0:?}; the decisions are {decisions}", decisions = AuditDecision::ALL.map(AuditDecision::as_str).join(", "))]
    UnknownDecision(String),
}

/// Kinds that earlier versions wrote and this one no longer does: older trails
/// hold them, so they stay queryable (`shadow_decision`: a shadow policy's
/// disagreement, now in the call's own record).
pub const RETIRED_KINDS: [&str; 1] = ["shadow_decision"];

impl AuditQuery {
    /// Refuses a `kind` or `decision` filter that no record can have. Reason codes
    /// are not checked: older records may carry codes this version no longer uses.
    pub fn check(&self) -> Result<(), QueryError> {
        if let Some(kind) = &self.kind
            && !EntryKind::ALL.iter().any(|known| known.as_str() == kind)
            && !RETIRED_KINDS.contains(&kind.as_str())
        {
            return Err(QueryError::UnknownKind(kind.clone()));
        }
        if let Some(decision) = &self.decision
            && !AuditDecision::ALL
                .iter()
                .any(|known| known.as_str() == decision)
        {
            return Err(QueryError::UnknownDecision(decision.clone()));
        }
        Ok(())
    }

    /// The newest `limit` records, unfiltered.
    pub fn newest(limit: u32) -> AuditQuery {
        AuditQuery {
            limit,
            ..AuditQuery::default()
        }
    }

    /// The limit a store applies.
    pub fn effective_limit(&self) -> u32 {
        self.limit.clamp(1, MAX_QUERY_LIMIT)
    }

    /// How a store fetches this query: the `ORDER BY seq` direction and the row
    /// count. With a cursor, oldest first and one row more than the limit (it tells
    /// whether another page follows); without, the newest `limit`.
    pub fn fetch_plan(&self) -> (&'static str, u32) {
        let limit = self.effective_limit();
        match self.after_seq {
            Some(_) => ("ASC", limit + 1),
            None => ("DESC", limit),
        }
    }

    /// The tool filter as a pattern: `Some((text, true))` for a glob.
    pub fn tool_pattern(&self) -> Option<(&str, bool)> {
        self.tool.as_deref().map(|tool| (tool, tool.contains('*')))
    }

    /// Whether `record` passes every filter except the cursor and the limit;
    /// stores that cannot filter natively, and tests, use it.
    pub fn matches(&self, record: &AuditRecord) -> bool {
        let exact = |filter: &Option<String>, value: Option<&str>| {
            filter.as_deref().is_none_or(|wanted| Some(wanted) == value)
        };
        let time = DateTime::parse_from_rfc3339(&record.time).map(|time| time.to_utc());
        exact(&self.principal, Some(&record.principal))
            && exact(&self.kind, Some(&record.kind))
            && exact(&self.decision, Some(&record.decision))
            && exact(&self.reason_code, record.reason_code.as_deref())
            && self.tool_pattern().is_none_or(|(pattern, glob)| {
                record.tool.as_deref().is_some_and(|tool| {
                    if glob {
                        glob_matches(pattern, tool)
                    } else {
                        pattern == tool
                    }
                })
            })
            && self
                .since
                .is_none_or(|since| time.as_ref().is_ok_and(|time| *time >= since))
            && self
                .until
                .is_none_or(|until| time.as_ref().is_ok_and(|time| *time < until))
    }
}

/// Whether `text` matches `pattern`, in which `*` matches any run of characters.
fn glob_matches(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    for (index, part) in parts.iter().enumerate() {
        if index + 1 == parts.len() {
            return rest.ends_with(part);
        }
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.is_empty()
}

/// One page of a query's answer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AuditPage {
    /// The records, oldest first.
    pub records: Vec<AuditRecord>,
    /// The cursor for the next page: the seq of the last record returned, present
    /// only when more records match after it.
    pub next_after_seq: Option<u64>,
}

impl AuditPage {
    /// The page for `query` from the rows a store fetched by
    /// [`AuditQuery::fetch_plan`]: oldest first, cut to the limit, with the cursor
    /// when the extra row shows that more match.
    pub fn from_fetched(query: &AuditQuery, mut records: Vec<AuditRecord>) -> AuditPage {
        let limit = query.effective_limit() as usize;
        let next_after_seq = match query.after_seq {
            Some(_) if records.len() > limit => {
                records.truncate(limit);
                records.last().map(|record| record.seq)
            }
            Some(_) => None,
            None => {
                records.reverse();
                None
            }
        };
        AuditPage {
            records,
            next_after_seq,
        }
    }
}

/// The mode every instance on a shared store is in: the row that the transaction
/// of each mode change or expiry record rewrites.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedMode {
    /// The mode named by the newest mode record.
    pub mode: String,
    /// When it lapses, as the record stores it.
    pub expires_at: Option<String>,
    /// Bumped by every mode record: a decision taken under another epoch is stale.
    pub epoch: u64,
    /// The seq of the newest mode record.
    pub seq: u64,
}

/// An allowed call whose intent record is committed and whose outcome is not,
/// as a store shared by several instances lists it for a mode switch's drain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InFlightIntent {
    /// The seq of its intent record.
    pub intent_seq: u64,
    /// The instance that decided it (the id its store connection registered).
    pub instance: String,
    /// Whether that instance was seen alive lately; a dead one's call never resolves.
    pub alive: bool,
    /// The tool, as requested.
    pub tool: String,
    /// Its arguments (JSON text), as the intent recorded them.
    pub arguments: Option<String>,
}

/// What one append committed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Appended {
    /// The chain head after the batch.
    pub head: ChainHead,
    /// One seq per entry, in order: the record written for it or, when a shared
    /// store found the event already recorded (an expiry another instance
    /// noticed first), the record that did.
    pub seqs: Vec<u64>,
    /// The indexes (into the batch) of the allowed decisions that a shared store
    /// found decided under a stale epoch and recorded as refused instead
    /// ([`crate::reason::Reason::ModeChanged`]); always empty for a store of one instance.
    pub stale: Vec<usize>,
}

/// Makes committed batches durable when a commit alone does not (SQLite's WAL
/// without fsync); run on its own thread so that it overlaps the next commit.
pub trait DurableSync: Send {
    /// Makes every batch committed before this call durable.
    fn sync(&mut self) -> std::io::Result<()>;
}

/// Where the hash chain lives. One writer thread calls the write methods; readers
/// (queries, verification) may run at the same time from other threads.
pub trait AuditStore: Send + Sync + std::fmt::Debug {
    /// Where the store is, for banners and logs (never a password).
    fn describe(&self) -> String;

    /// Opens the chain: its newest record, if any.
    fn head(&self) -> Result<Option<StoredRecord>, AuditError>;

    /// The hash of record `seq` ([`GENESIS_HASH`] for 0), if the store has it.
    fn hash_at(&self, seq: u64) -> Result<Option<String>, AuditError>;

    /// Seals `entries` onto the chain with `key` and commits them in one
    /// transaction. Nothing is stored unless everything is.
    fn append(&self, entries: &[&AuditEntry], key: &AuditKey) -> Result<Appended, AuditError>;

    /// [`AuditStore::append`], where `decided_epochs[i]` is the shared-mode epoch
    /// under which entry `i` (an allowed decision) was taken. A shared store checks
    /// each against its mode row inside the batch's transaction and records an
    /// entry whose epoch is stale as refused (listed in [`Appended::stale`]); a
    /// store of one instance, whose mode lives in the one gateway's memory, ignores them.
    fn append_decided(
        &self,
        entries: &[&AuditEntry],
        decided_epochs: &[Option<u64>],
        key: &AuditKey,
    ) -> Result<Appended, AuditError> {
        let _ = decided_epochs;
        self.append(entries, key)
    }

    /// Whether several instances share this store's mode row (then decisions carry
    /// the epoch they were taken under, see [`AuditStore::append_decided`]).
    fn shares_mode(&self) -> bool {
        false
    }

    /// On a store several instances share: the allowed calls of every instance
    /// whose intent committed before record `seq` and whose outcome has not
    /// (empty for a store of one instance, whose gateway knows its own calls).
    fn in_flight_before(&self, seq: u64) -> Result<Vec<InFlightIntent>, AuditError> {
        let _ = seq;
        Ok(Vec::new())
    }

    /// On a store several instances share: tells the others this instance is
    /// alive, and forgets what instances long gone left behind.
    fn heartbeat(&self) -> Result<(), AuditError> {
        Ok(())
    }

    /// The mode shared by every instance on this store, for stores that several
    /// instances share (`None` for a store of one instance, whose mode lives in memory).
    fn shared_mode(&self) -> Result<Option<SharedMode>, AuditError> {
        Ok(None)
    }

    /// After a failed append: ends whatever it left open and re-reads the head,
    /// so the next record links to what is really stored.
    fn reset(&self) -> Result<(), AuditError>;

    /// A small write that shows whether writes succeed again.
    fn probe(&self) -> Result<(), AuditError>;

    /// Makes durable: the syncer for this store, when commits alone are not durable.
    fn durable_sync(&self) -> Result<Option<Box<dyn DurableSync>>, AuditError>;

    /// Free and total bytes where the store writes, when that is a local
    /// filesystem Proxi should keep a reserve on.
    fn free_space(&self) -> Option<std::io::Result<(u64, u64)>>;

    /// The newest mode change or expiry.
    fn last_mode_event(&self) -> Result<Option<AuditRecord>, AuditError>;

    /// Calls `visit` on every record from `seq` on, oldest first, until it returns false.
    fn scan_from(
        &self,
        seq: u64,
        visit: &mut dyn FnMut(StoredRecord) -> bool,
    ) -> Result<(), AuditError>;

    /// The highest seq ever written, where the store remembers it apart from the
    /// records (SQLite's AUTOINCREMENT), which exposes a deleted tail.
    fn highest_seq_written(&self) -> Result<Option<u64>, AuditError>;

    /// The newest `limit` records, oldest first (unlike [`AuditStore::query`], any limit).
    fn recent(&self, limit: u32) -> Result<Vec<AuditRecord>, AuditError>;

    /// Answers a filtered query (see [`AuditQuery`]).
    fn query(&self, query: &AuditQuery) -> Result<AuditPage, AuditError>;

    /// Calls `visit` on every record, oldest first.
    fn for_each_record(&self, visit: &mut dyn FnMut(AuditRecord)) -> Result<(), AuditError> {
        self.scan_from(1, &mut |record| {
            visit(record.into_record());
            true
        })
    }

    /// Recomputes the whole chain and names the first record that breaks it; with
    /// `anchoring`, also every MAC and the anchor.
    fn verify(&self, anchoring: Option<&Anchoring>) -> Result<Verification, AuditError> {
        verify_store(self, anchoring)
    }
}

/// At startup: the anchor must be authentic and must not be ahead of, or differ from, the trail.
pub(super) fn check_anchor(
    store: &dyn AuditStore,
    anchoring: &Anchoring,
    last_seq: u64,
) -> Result<(), AuditError> {
    let path = anchoring.anchor_path().to_owned();
    let untrusted = |problem| AuditError::AnchorUntrusted {
        anchor: path.clone(),
        problem,
        records: last_seq,
    };
    match anchoring.read_anchor()? {
        None if last_seq > 0 => Err(untrusted("missing")),
        None => Ok(()),
        Some(anchor) if !anchor.is_authentic(anchoring.key()) => {
            Err(untrusted("not authenticated by the configured key"))
        }
        Some(anchor) if anchor.seq > last_seq => Err(AuditError::Truncated {
            last: last_seq,
            anchored: anchor.seq,
            anchor: path,
        }),
        Some(anchor) => match store.hash_at(anchor.seq)? {
            Some(hash) if hash == anchor.hash => Ok(()),
            _ => Err(AuditError::Rewritten(anchor.seq)),
        },
    }
}

/// Checks the chain from record `seq` (its content and MAC, not its link backwards)
/// to the newest record; returns the first problem.
pub(super) fn check_chain_from(
    store: &dyn AuditStore,
    seq: u64,
    key: &AuditKey,
) -> Result<Option<BrokenRecord>, AuditError> {
    let mut check = ChainCheck {
        key: Some(key),
        expected_seq: seq,
        previous_hash: None,
    };
    let mut problem = None;
    store.scan_from(seq, &mut |record| match check.check(record) {
        Ok(()) => true,
        Err(broken) => {
            problem = Some(broken);
            false
        }
    })?;
    Ok(problem)
}

fn verify_store<S: AuditStore + ?Sized>(
    store: &S,
    anchoring: Option<&Anchoring>,
) -> Result<Verification, AuditError> {
    let anchor = match anchoring {
        Some(anchoring) => Some(anchoring.read_anchor()?),
        None => None,
    };
    let anchor_seq = anchor
        .as_ref()
        .and_then(|anchor| anchor.as_ref().map(|a| a.seq));
    let mut check = ChainCheck {
        key: anchoring.map(Anchoring::key),
        expected_seq: 1,
        previous_hash: Some(GENESIS_HASH.to_owned()),
    };
    let mut records = 0;
    let mut hash_at_anchor = (anchor_seq == Some(0)).then(|| GENESIS_HASH.to_owned());
    let result = |records, first_bad: Option<BrokenRecord>, head: Option<String>| Verification {
        records,
        head: if first_bad.is_none() { head } else { None },
        first_bad,
        anchored_seq: None,
        anchored_externally: anchoring.map(Anchoring::is_external),
    };
    let mut first_bad = None;
    store.scan_from(1, &mut |record| {
        records += 1;
        if Some(record.seq) == anchor_seq {
            hash_at_anchor = Some(record.hash.clone());
        }
        match check.check(record) {
            Ok(()) => true,
            Err(broken) => {
                first_bad = Some(broken);
                false
            }
        }
    })?;
    if first_bad.is_some() {
        return Ok(result(records, first_bad, None));
    }
    let last = check.expected_seq - 1;
    let head = check.previous_hash.filter(|_| records > 0);
    if let (Some(anchoring), Some(anchor)) = (anchoring, anchor) {
        let path = anchoring.anchor_path().display();
        let problem = match anchor {
            None if records > 0 => Some(BrokenRecord {
                seq: last,
                problem: format!(
                    "the anchor {path} is missing: it was deleted, or this trail was not written with this key; a deleted tail cannot be ruled out"
                ),
            }),
            None => None,
            Some(anchor) if anchor.key_id != anchoring.key().id() => Some(BrokenRecord {
                seq: anchor.seq,
                problem: format!(
                    "key mismatch: the anchor {path} was made with audit key {}, but the key given is {}",
                    anchor.key_id,
                    anchoring.key().id()
                ),
            }),
            Some(anchor) if !anchor.is_authentic(anchoring.key()) => Some(BrokenRecord {
                seq: anchor.seq,
                problem: format!("the anchor {path} was forged (its MAC does not match)"),
            }),
            Some(anchor) if anchor.seq > last => Some(BrokenRecord {
                seq: last + 1,
                problem: format!(
                    "records {}..{} were written (the anchor vouches for {}) but are missing: the end of the trail was deleted (truncated)",
                    last + 1,
                    anchor.seq,
                    anchor.seq
                ),
            }),
            Some(anchor) if hash_at_anchor.as_deref() != Some(anchor.hash.as_str()) => {
                Some(BrokenRecord {
                    seq: anchor.seq,
                    problem: "differs from the record the anchor vouches for: the trail was rewritten from here".to_owned(),
                })
            }
            Some(anchor) => {
                let mut verification = result(records, None, head.clone());
                verification.anchored_seq = Some(anchor.seq);
                return finish_unanchored(store, verification, last);
            }
        };
        if let Some(problem) = problem {
            return Ok(result(records, Some(problem), None));
        }
    }
    finish_unanchored(store, result(records, None, head), last)
}

/// The hash-only tail check: a store that remembers the highest seq ever written
/// exposes a deleted tail (unless that memory was edited too).
fn finish_unanchored<S: AuditStore + ?Sized>(
    store: &S,
    mut verification: Verification,
    last: u64,
) -> Result<Verification, AuditError> {
    if let Some(highest) = store.highest_seq_written()?
        && highest > last
    {
        verification.head = None;
        verification.first_bad = Some(BrokenRecord {
            seq: last + 1,
            problem: format!(
                "records {}..{highest} were written but are missing (the end of the log was deleted)",
                last + 1
            ),
        });
    }
    Ok(verification)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_naming_an_unknown_kind_or_decision_is_refused() {
        let mut query = AuditQuery::newest(10);
        assert_eq!(query.check(), Ok(()));
        for kind in EntryKind::ALL {
            query.kind = Some(kind.as_str().to_owned());
            assert_eq!(query.check(), Ok(()), "{kind:?}");
        }
        query.kind = Some("shadow_decision".to_owned());
        assert_eq!(query.check(), Ok(()), "retired, but older trails hold it");
        query.kind = Some("toolcall".to_owned());
        assert_eq!(
            query.check(),
            Err(QueryError::UnknownKind("toolcall".to_owned()))
        );
        query.kind = None;
        for decision in AuditDecision::ALL {
            query.decision = Some(decision.as_str().to_owned());
            assert_eq!(query.check(), Ok(()), "{decision:?}");
        }
        query.decision = Some("Allowed".to_owned());
        assert!(
            query
                .check()
                .unwrap_err()
                .to_string()
                .ends_with("the decisions are allowed, denied, rejected")
        );
        // Reason codes of older versions stay queryable.
        query.decision = None;
        query.reason_code = Some("some_retired_code".to_owned());
        assert_eq!(query.check(), Ok(()));
    }

    #[test]
    fn a_star_matches_any_run_of_characters() {
        assert!(glob_matches("restart_*", "restart_service"));
        assert!(glob_matches("*_service", "restart_service"));
        assert!(glob_matches("*", "anything"));
        assert!(glob_matches("r*t*e", "restart_service"));
        assert!(!glob_matches("restart_*", "scale_fleet"));
        assert!(!glob_matches("a*b", "ab_"));
        assert!(glob_matches("exact", "exact"));
        assert!(!glob_matches("exact", "exactly"));
    }

    #[test]
    fn the_limit_is_clamped() {
        assert_eq!(AuditQuery::newest(0).effective_limit(), 1);
        assert_eq!(AuditQuery::newest(5000).effective_limit(), MAX_QUERY_LIMIT);
    }
}
