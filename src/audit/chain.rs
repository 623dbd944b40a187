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
    pub(super) policy_hash: Option<&'a str>,
    pub(super) role: Option<&'a str>,
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
        // `policy_hash` came after `context`, the same way (tag 3).
        if let Some(policy_hash) = self.policy_hash {
            hasher.update([3u8]);
            hasher.update((policy_hash.len() as u64).to_be_bytes());
            hasher.update(policy_hash.as_bytes());
        }
        // `role` came after `policy_hash`, the same way (tag 4).
        if let Some(role) = self.role {
            hasher.update([4u8]);
            hasher.update((role.len() as u64).to_be_bytes());
            hasher.update(role.as_bytes());
        }
        let mut hex = [0u8; 64];
        // 32 digest bytes always encode into exactly 64 hex digits.
        let _ = hex::encode_to_slice(hasher.finalize(), &mut hex);
        hex
    }
}

impl StoredRecord {
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
            policy_hash: self.policy_hash.as_deref(),
            role: self.role.as_deref(),
        }
    }

    /// Whether `hash` is the hash of this record's fields after `prev_hash`.
    pub fn hash_is_valid(&self) -> bool {
        self.fields().hash(&self.prev_hash).as_slice() == self.hash.as_bytes()
    }
}

/// The newest record of a chain: where the next record links to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainHead {
    /// Its sequence number (0 for an empty chain).
    pub seq: u64,
    /// Its hash ([`GENESIS_HASH`] for an empty chain).
    pub hash: String,
}

impl ChainHead {
    /// The head of a chain without records.
    pub fn genesis() -> ChainHead {
        ChainHead {
            seq: 0,
            hash: GENESIS_HASH.to_owned(),
        }
    }
}

/// Reusable buffers for [`seal`], so that a batch costs no per-row JSON allocation.
#[derive(Debug, Default)]
pub struct SealBuffers {
    arguments: Vec<u8>,
    detail: Vec<u8>,
    context: Vec<u8>,
}

/// Turns `entry` into the next record after `head`: bounds its fields, hashes it
/// onto the chain and authenticates the hash with `key`; advances `head` to it.
pub fn seal(
    head: &mut ChainHead,
    entry: &AuditEntry,
    key: &AuditKey,
    buffers: &mut SealBuffers,
) -> Result<StoredRecord, AuditError> {
    let seq = head.seq + 1;
    let time = format_time(entry.time);
    let expires_at = entry.expires_at.map(format_time);
    if let Some(value) = &entry.arguments {
        write_bounded(&mut buffers.arguments, value, MAX_STORED_JSON_BYTES)?;
    }
    write_bounded(&mut buffers.detail, &entry.detail, MAX_STORED_JSON_BYTES)?;
    if let Some(value) = &entry.context {
        write_bounded(&mut buffers.context, value, MAX_STORED_CONTEXT_BYTES)?;
    }
    let fields = Fields {
        seq,
        time: &time,
        principal: cut(entry.principal.name(), MAX_STORED_NAME_BYTES),
        kind: entry.kind.as_str(),
        tool: entry
            .tool
            .as_deref()
            .map(|tool| cut(tool, MAX_STORED_NAME_BYTES)),
        arguments: match entry.arguments {
            Some(_) => Some(utf8(&buffers.arguments)?),
            None => None,
        },
        mode: cut(&entry.mode, MAX_STORED_NAME_BYTES),
        decision: entry.decision.as_str(),
        reason_code: entry.reason_code,
        outcome: entry.outcome,
        detail: utf8(&buffers.detail)?,
        expires_at: expires_at.as_deref(),
        context: match entry.context {
            Some(_) => Some(utf8(&buffers.context)?),
            None => None,
        },
        policy_hash: entry
            .policy_hash
            .as_deref()
            .map(|hash| cut(hash, MAX_STORED_POLICY_HASH_BYTES)),
        role: Some(entry.principal.role().as_str()),
    };
    let hash = utf8(&fields.hash(&head.hash))?.to_owned();
    let record = StoredRecord {
        seq,
        principal: fields.principal.to_owned(),
        kind: fields.kind.to_owned(),
        tool: fields.tool.map(str::to_owned),
        arguments: fields.arguments.map(str::to_owned),
        mode: fields.mode.to_owned(),
        decision: fields.decision.to_owned(),
        reason_code: fields.reason_code.map(str::to_owned),
        outcome: fields.outcome.to_owned(),
        detail: fields.detail.to_owned(),
        context: fields.context.map(str::to_owned),
        policy_hash: fields.policy_hash.map(str::to_owned),
        role: fields.role.map(str::to_owned),
        time,
        expires_at,
        prev_hash: std::mem::replace(&mut head.hash, hash.clone()),
        mac: Some(key.record_mac(&hash)),
        hash,
    };
    head.seq = seq;
    Ok(record)
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
    pub(super) fn check(&mut self, row: StoredRecord) -> Result<(), BrokenRecord> {
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use chrono::Utc;
    use serde_json::json;

    use super::*;

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

    fn sealed(count: i64, key: &AuditKey) -> Vec<StoredRecord> {
        let mut head = ChainHead::genesis();
        let mut buffers = SealBuffers::default();
        (1..=count)
            .map(|n| seal(&mut head, &entry(n), key, &mut buffers).unwrap())
            .collect()
    }

    fn first_problem(records: Vec<StoredRecord>, key: &AuditKey) -> Option<u64> {
        let mut check = ChainCheck {
            key: Some(key),
            expected_seq: 1,
            previous_hash: Some(GENESIS_HASH.to_owned()),
        };
        records
            .into_iter()
            .find_map(|record| check.check(record).err())
            .map(|broken| broken.seq)
    }

    #[test]
    fn sealed_records_link_into_a_chain_that_checks_out() {
        let key = AuditKey::from_bytes([3; 32]);
        let records = sealed(3, &key);
        assert_eq!(records[0].prev_hash, GENESIS_HASH);
        assert_eq!(records[1].prev_hash, records[0].hash);
        assert_eq!(records.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(records.iter().all(StoredRecord::hash_is_valid));
        assert_eq!(first_problem(records, &key), None);
    }

    #[test]
    fn an_edited_sealed_record_is_named() {
        let key = AuditKey::from_bytes([3; 32]);
        let mut records = sealed(3, &key);
        records[1].outcome = "denied".to_owned();
        assert!(!records[1].hash_is_valid());
        assert_eq!(first_problem(records, &key), Some(2));
    }

    #[test]
    fn the_role_is_recorded_and_hashed_and_old_records_without_it_still_check() {
        let key = AuditKey::from_bytes([3; 32]);
        let mut named = entry(1);
        named.principal =
            crate::principal::Principal::named("deploy-bot", crate::principal::Role::Agent)
                .via_mcp("claude-code");
        let record = seal(
            &mut ChainHead::genesis(),
            &named,
            &key,
            &mut SealBuffers::default(),
        )
        .unwrap();
        assert_eq!(record.principal, "deploy-bot (mcp:claude-code)");
        assert_eq!(record.role.as_deref(), Some("agent"));
        let mut promoted = record.clone();
        promoted.role = Some("operator".to_owned());
        assert!(!promoted.hash_is_valid(), "the role is covered by the hash");
        // A record from before roles: hashed without one, it still checks out.
        let mut old = record;
        old.role = None;
        old.hash = String::from_utf8(old.fields().hash(&old.prev_hash).to_vec()).unwrap();
        old.mac = Some(key.record_mac(&old.hash));
        assert_eq!(first_problem(vec![old], &key), None);
    }

    #[test]
    fn a_record_sealed_with_another_key_is_named() {
        let key = AuditKey::from_bytes([3; 32]);
        let other = AuditKey::from_bytes([4; 32]);
        let mut records = sealed(2, &key);
        records[1].mac = Some(other.record_mac(&records[1].hash));
        assert_eq!(first_problem(records, &key), Some(2));
    }

    #[test]
    fn sealing_bounds_the_fields_it_hashes() {
        let key = AuditKey::from_bytes([3; 32]);
        let mut huge = entry(1);
        huge.principal =
            crate::principal::Principal::named(&"p".repeat(10_000), crate::principal::Role::Agent);
        huge.arguments = Some(json!({"a": "x".repeat(100_000)}));
        let record = seal(
            &mut ChainHead::genesis(),
            &huge,
            &key,
            &mut SealBuffers::default(),
        )
        .unwrap();
        assert_eq!(record.principal.len(), MAX_STORED_NAME_BYTES);
        assert!(record.arguments.unwrap().len() < MAX_STORED_JSON_BYTES);
    }
}
