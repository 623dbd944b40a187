//! Approvals on one PostgreSQL store shared by several instances (issue 15): the
//! life cycle of `SqliteApprovals`, consume-once and expire-once across instances,
//! with a real PostgreSQL cluster per test (tests/common/postgres.rs).

mod common;

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use common::postgres::PostgresServer;
use proxi::approval::postgres::PostgresApprovals;
use proxi::approval::{
    ApprovalError, ApprovalKind, ApprovalStatus, ApprovalStore, Binding, NewApproval, Verdict,
    open_store,
};
use serde_json::json;

fn binding(principal: &str, digest: &str) -> Binding {
    Binding {
        kind: ApprovalKind::ToolCall,
        principal: principal.to_owned(),
        role: "agent".to_owned(),
        target: "scale_fleet".to_owned(),
        arguments_digest: digest.to_owned(),
        policy_hash: "p1".to_owned(),
    }
}

fn request(binding: Binding, now: DateTime<Utc>) -> NewApproval {
    NewApproval {
        binding,
        arguments: json!({"count": 8}),
        mode: "EMERGENCY".to_owned(),
        reason: Some("load spike".to_owned()),
        created_at: now,
        expires_at: now + Duration::seconds(600),
    }
}

/// Two instances' stores on one database.
fn two_instances(server: &PostgresServer) -> (Arc<PostgresApprovals>, Arc<PostgresApprovals>) {
    let a = PostgresApprovals::connect(&server.url()).expect("instance A connects");
    let b =
        PostgresApprovals::connect(&server.url()).expect("instance B connects (migrations again)");
    (Arc::new(a), Arc::new(b))
}

#[test]
fn an_approval_made_on_one_instance_is_decided_and_consumed_once_on_another() {
    let server = PostgresServer::start();
    let (a, b) = two_instances(&server);
    let now = Utc::now();
    let (first, fresh) = a
        .create(request(binding("deploy-bot", "d1"), now), 10)
        .unwrap();
    assert!(fresh);
    assert_eq!(first.status, ApprovalStatus::Pending);
    assert_eq!(first.reason.as_deref(), Some("load spike"));
    // The identical request on the other instance shares the approval.
    let (again, fresh) = b
        .create(request(binding("deploy-bot", "d1"), now), 10)
        .unwrap();
    assert!(!fresh);
    assert_eq!(again, first);
    let (other, _) = b
        .create(request(binding("deploy-bot", "d2"), now), 10)
        .unwrap();
    assert_ne!(other.id, first.id);
    assert_eq!(a.count_pending().unwrap(), 2);
    assert_eq!(b.consume(&first.id, now).unwrap(), None, "not approved yet");
    let approved = b
        .decide(&first.id, Verdict::Approve, "alice", "looks right", now)
        .unwrap();
    assert_eq!(approved.status, ApprovalStatus::Approved);
    assert_eq!(approved.decided_by.as_deref(), Some("alice"));
    assert_eq!(
        a.get(&first.id).unwrap().unwrap().status,
        ApprovalStatus::Approved
    );
    assert!(matches!(
        a.decide(&first.id, Verdict::Deny, "bob", "no", now),
        Err(ApprovalError::NotPending(ApprovalStatus::Approved))
    ));
    assert!(matches!(
        a.decide("apr_00", Verdict::Approve, "alice", "x", now),
        Err(ApprovalError::NotFound)
    ));
    let consumed = a.consume(&first.id, now).unwrap().unwrap();
    assert_eq!(consumed.status, ApprovalStatus::Consumed);
    assert_eq!(b.consume(&first.id, now).unwrap(), None);
    assert_eq!(
        b.latest_for(&binding("deploy-bot", "d1"))
            .unwrap()
            .unwrap()
            .id,
        first.id
    );
    assert_eq!(b.latest_for(&binding("someone-else", "d1")).unwrap(), None);
    let pending = a.list(Some(ApprovalStatus::Pending), 10).unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].id, other.id);
    let newest = a.list(None, 1).unwrap();
    assert_eq!(newest.len(), 1);
    assert_eq!(newest[0].id, other.id, "newest first");
}

#[test]
fn twenty_concurrent_consumes_on_two_instances_have_exactly_one_winner() {
    let server = PostgresServer::start();
    let (a, b) = two_instances(&server);
    let now = Utc::now();
    let (approval, _) = a
        .create(request(binding("deploy-bot", "d"), now), 10)
        .unwrap();
    b.decide(&approval.id, Verdict::Approve, "alice", "ok", now)
        .unwrap();
    let barrier = std::sync::Barrier::new(20);
    let winners: usize = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..20)
            .map(|index| {
                let store = if index % 2 == 0 { &a } else { &b };
                let id = &approval.id;
                let barrier = &barrier;
                scope.spawn(move || {
                    barrier.wait();
                    store.consume(id, now).expect("consume answers").is_some()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| usize::from(handle.join().expect("no panic")))
            .sum()
    });
    assert_eq!(winners, 1);
    assert_eq!(
        a.get(&approval.id).unwrap().unwrap().status,
        ApprovalStatus::Consumed
    );
}

#[test]
fn expiry_is_recorded_once_across_instances_and_the_pending_cap_is_shared() {
    let server = PostgresServer::start();
    let (a, b) = two_instances(&server);
    let now = Utc::now();
    let mut ids = Vec::new();
    for (index, digest) in ["a", "b", "c"].into_iter().enumerate() {
        let store = if index % 2 == 0 { &a } else { &b };
        ids.push(
            store
                .create(request(binding("bot", digest), now), 3)
                .unwrap()
                .0
                .id,
        );
    }
    // The cap counts the other instance's approvals too.
    assert!(matches!(
        b.create(request(binding("bot", "d"), now), 3),
        Err(ApprovalError::TooManyPending(3))
    ));
    a.decide(&ids[1], Verdict::Approve, "alice", "ok", now)
        .unwrap();
    assert_eq!(
        b.next_expiry().unwrap().map(|t| t.timestamp_millis()),
        Some((now + Duration::seconds(600)).timestamp_millis())
    );
    assert!(a.expire_due(now).unwrap().is_empty());
    let later = now + Duration::seconds(600);
    assert!(matches!(
        b.decide(&ids[0], Verdict::Approve, "alice", "ok", later),
        Err(ApprovalError::Expired)
    ));
    assert_eq!(a.consume(&ids[1], later).unwrap(), None, "lapsed");
    // Both instances notice at once: each approval is reported expired once in all.
    let barrier = std::sync::Barrier::new(8);
    let expired: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|index| {
                let store = if index % 2 == 0 { &a } else { &b };
                let barrier = &barrier;
                scope.spawn(move || {
                    barrier.wait();
                    store.expire_due(later).expect("expire answers")
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|handle| handle.join().expect("no panic"))
            .map(|approval| {
                assert!(
                    matches!(
                        approval.status,
                        ApprovalStatus::Pending | ApprovalStatus::Approved
                    ),
                    "reported with the status it left"
                );
                approval.id
            })
            .collect()
    });
    let mut sorted = expired.clone();
    sorted.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(sorted, expected, "each expired exactly once: {expired:?}");
    assert_eq!(a.next_expiry().unwrap(), None);
    assert_eq!(
        b.get(&ids[2]).unwrap().unwrap().status,
        ApprovalStatus::Expired
    );
    // Room again.
    a.create(request(binding("bot", "d"), later), 3).unwrap();
}

#[test]
fn open_store_picks_postgres_for_a_url_and_sqlite_otherwise() {
    let server = PostgresServer::start();
    let dir = tempfile::tempdir().unwrap();
    let now = Utc::now();
    let shared = open_store(Some(&server.url()), dir.path()).unwrap();
    let (approval, _) = shared
        .create(request(binding("bot", "x"), now), 10)
        .unwrap();
    assert!(
        !dir.path().join("approvals.db").exists(),
        "with a URL nothing goes to the data dir"
    );
    let other_instance = PostgresApprovals::connect(&server.url()).unwrap();
    assert!(other_instance.get(&approval.id).unwrap().is_some());
    let local = open_store(None, dir.path()).unwrap();
    assert!(local.get(&approval.id).unwrap().is_none());
    assert!(dir.path().join("approvals.db").exists());
    assert!(matches!(
        open_store(Some("mysql://x"), dir.path()),
        Err(ApprovalError::UnsupportedStore)
    ));
}

#[test]
fn an_unreachable_store_fails_with_an_error_that_names_no_statement() {
    let server = PostgresServer::start();
    let store = PostgresApprovals::connect(&server.url()).unwrap();
    server.stop();
    let error = store.count_pending().expect_err("the server is down");
    let text = error.to_string();
    assert!(matches!(error, ApprovalError::Postgres(_)), "{text}");
    assert!(!text.contains("SELECT"), "{text}");
    server.start_again();
    // Recovers without a new store once the server is back.
    let pending = common::wait_until(
        "the approval store answers again",
        std::time::Duration::from_secs(10),
        || store.count_pending().ok(),
    );
    assert_eq!(pending, 0);
}
