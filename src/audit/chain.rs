//! The hash chain: how a record's hash covers its fields and its predecessor, and
//! how a run of records is checked. Pure: no I/O.

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::*;
use crate::anchor::{AuditKey, MacCheck};

/// The `prev_hash` of the first record.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One record's columns, borrowed: what is hashed and what is bound to the INSERT.
pub(super) struct Fields<'a> {
    pub(super) seq: u64,
    pub(super) time: &'a str,
    pub(super) principal: &'a str,
    pub(super) kind: &'a str,
    pub(super) tool: Option<&'a str>,
    pub(super) arguments: Option<&'a str>,
    pub(super) mode: &'a str,
    pub(super) decision: &'a str,
    pub(super) reason_code: Option<&'a str>,
    pub(super) outcome: &'a str,
    pub(super) detail: &'a str,
    pub(super) expires_at: Option<&'a str>,
    pub(super) context: Option<&'a str>,
}

impl Fields<'_> {
    /// SHA-256 over the previous hash, the sequence number and every column,
    /// each length-prefixed so that no two different rows hash the same bytes;
    /// returned as lowercase hex.
    pub(super) fn hash(&self, prev_hash: &str) -> [u8; 64] {
        let mut hasher = Sha256::new();
        hasher.update(prev_hash.as_bytes());
        hasher.update(self.seq.to_be_bytes());
        let fields = [
            Some(self.time),
            Some(self.principal),
            Some(self.kind),
            self.tool,
            self.arguments,
            Some(self.mode),
            Some(self.decision),
            self.reason_code,
            Some(self.outcome),
            Some(self.detail),
            self.expires_at,
        ];
        for field in fields {
            match field {
                None => hasher.update([0u8]),
                Some(text) => {
                    hasher.update([1u8]);
                    hasher.update((text.len() as u64).to_be_bytes());
                    hasher.update(text.as_bytes());
                }
            }
        }
        // `context` came later: hashed only when present (with its own tag), so
        // records written before it existed keep their hashes.
        if let Some(context) = self.context {
            hasher.update([2u8]);
            hasher.update((context.len() as u64).to_be_bytes());
            hasher.update(context.as_bytes());
        }
        let mut hex = [0u8; 64];
        // 32 digest bytes always encode into exactly 64 hex digits.
        let _ = hex::encode_to_slice(hasher.finalize(), &mut hex);
        hex
    }
}

impl Row {
    pub(super) fn fields(&self) -> Fields<'_> {
        Fields {
            seq: self.seq,
            time: &self.time,
            principal: &self.principal,
            kind: &self.kind,
            tool: self.tool.as_deref(),
            arguments: self.arguments.as_deref(),
            mode: &self.mode,
            decision: &self.decision,
            reason_code: self.reason_code.as_deref(),
            outcome: &self.outcome,
            detail: &self.detail,
            expires_at: self.expires_at.as_deref(),
            context: self.context.as_deref(),
        }
    }

    pub(super) fn hash_is_valid(&self) -> bool {
        self.fields().hash(&self.prev_hash).as_slice() == self.hash.as_bytes()
    }
}

/// The result of checking the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verification {
    /// Records examined.
    pub records: u64,
    /// Hash of the newest record (the chain head), if any.
    pub head: Option<String>,
    /// The first broken record, if any.
    pub first_bad: Option<BrokenRecord>,
    /// The newest record the anchor vouches for, when a key was given and the anchor checked out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anchored_seq: Option<u64>,
    /// Whether the key and anchor used live outside the data dir (`None`: no key given).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anchored_externally: Option<bool>,
}

/// Where and how the chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BrokenRecord {
    /// The sequence number of the first record that does not check out.
    pub seq: u64,
    /// What is wrong with it.
    pub problem: String,
}

/// Checks records one after another: sequence, link, hash and (with a key) MAC.
pub(super) struct ChainCheck<'a> {
    pub(super) key: Option<&'a AuditKey>,
    pub(super) expected_seq: u64,
    /// `None` while the first record's link is not to be checked (a check from the middle).
    pub(super) previous_hash: Option<String>,
}

impl ChainCheck<'_> {
    pub(super) fn check(&mut self, row: Row) -> Result<(), BrokenRecord> {
        let broken = |problem: String| BrokenRecord {
            seq: row.seq,
            problem,
        };
        if row.seq != self.expected_seq {
            return Err(broken(if row.seq > self.expected_seq {
                format!(
                    "expected record {} next but found {}: record(s) {}..{} were deleted",
                    self.expected_seq,
                    row.seq,
                    self.expected_seq,
                    row.seq - 1
                )
            } else {
                format!("record {} is out of order", row.seq)
            }));
        }
        if self
            .previous_hash
            .as_ref()
            .is_some_and(|previous| *previous != row.prev_hash)
        {
            return Err(broken(
                "does not link to the record before it (records were deleted, reordered or replaced)"
                    .to_owned(),
            ));
        }
        if !row.hash_is_valid() {
            return Err(broken(
                "its content does not match its hash (the record was edited)".to_owned(),
            ));
        }
        if let Some(key) = self.key {
            match key.check_record(&row.hash, row.mac.as_deref()) {
                MacCheck::Valid => {}
                MacCheck::Missing => {
                    return Err(broken(
                        "carries no MAC: it was not written by Proxi with an audit key, or its MAC was removed"
                            .to_owned(),
                    ));
                }
                MacCheck::OtherKey(found) => {
                    return Err(broken(format!(
                        "key mismatch: it was authenticated with audit key {found}, but the key given is {}; use the operator credential this trail was written with",
                        key.id()
                    )));
                }
                MacCheck::Invalid => {
                    return Err(broken(
                        "its MAC does not match: the record was edited and its hash recomputed without the audit key (re-hashed)"
                            .to_owned(),
                    ));
                }
            }
        }
        self.previous_hash = Some(row.hash);
        self.expected_seq += 1;
        Ok(())
    }
}
