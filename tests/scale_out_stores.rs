//! Approvals on one PostgreSQL store shared by several instances (issue 15): the
//! life cycle of `SqliteApprovals`, consume-once and expire-once across instances,
//! with a real PostgreSQL cluster per test (tests/common/postgres.rs).

mod common;

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use common::postgres::PostgresServer;
use proxi::approval::postgres::PostgresApprovals;
use proxi::approval::{
    ApprovalError, ApprovalKind, ApprovalStatus, ApprovalStore, Binding, DecisionSeal, NewApproval,
    Verdict, open_store,
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
    // Not in effect on any instance until its record is durable and confirmed.
    assert_eq!(a.consume(&first.id, now).unwrap(), None, "not recorded yet");
    assert!(b.confirm_decision(&first.id).unwrap());
    assert!(
        !a.revert_decision(&first.id, ApprovalStatus::Approved)
            .unwrap(),
        "a recorded decision is never taken back"
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
fn an_unrecorded_decision_is_taken_back_on_either_instance_and_never_consumed() {
    let server = PostgresServer::start();
    let (a, b) = two_instances(&server);
    let now = Utc::now();
    let (approval, _) = a
        .create(request(binding("deploy-bot", "d"), now), 10)
        .unwrap();
    let decided = a
        .decide(&approval.id, Verdict::Deny, "alice", "no", now)
        .unwrap();
    assert!(!decided.decision_recorded);
    assert!(!b.get(&approval.id).unwrap().unwrap().decision_recorded);
    // Every instance finds it among the unconfirmed, once it is older than the cutoff.
    let stranded = b
        .unconfirmed_decisions(now + chrono::TimeDelta::seconds(1), 10)
        .unwrap();
    assert_eq!(stranded.len(), 1);
    assert_eq!(stranded[0].id, approval.id);
    assert_eq!(stranded[0].status, ApprovalStatus::Denied);
    assert!(
        b.unconfirmed_decisions(now - chrono::TimeDelta::seconds(60), 10)
            .unwrap()
            .is_empty()
    );
    assert!(
        !b.revert_decision(&approval.id, ApprovalStatus::Approved)
            .unwrap()
    );
    assert!(
        b.revert_decision(&approval.id, ApprovalStatus::Denied)
            .unwrap()
    );
    let pending = a.get(&approval.id).unwrap().unwrap();
    assert_eq!(pending.status, ApprovalStatus::Pending);
    assert_eq!(pending.decided_by, None);
    assert!(pending.decision_recorded);
    // Decided again, approved: unusable until confirmed, then once.
    b.decide(&approval.id, Verdict::Approve, "bob", "ok", now)
        .unwrap();
    assert_eq!(a.consume(&approval.id, now).unwrap(), None);
    assert!(a.confirm_decision(&approval.id).unwrap());
    assert!(!a.confirm_decision(&approval.id).unwrap(), "confirmed once");
    assert!(b.consume(&approval.id, now).unwrap().is_some());
    assert!(
        !a.revert_decision(&approval.id, ApprovalStatus::Approved)
            .unwrap()
    );
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
    assert!(b.confirm_decision(&approval.id).unwrap());
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
    assert!(a.confirm_decision(&ids[1]).unwrap());
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
    let shared = open_store(Some(&server.url()), dir.path(), DecisionSeal::NoOperator).unwrap();
    let (approval, _) = shared
        .create(request(binding("bot", "x"), now), 10)
        .unwrap();
    assert!(
        !dir.path().join("approvals.db").exists(),
        "with a URL nothing goes to the data dir"
    );
    let other_instance = PostgresApprovals::connect(&server.url()).unwrap();
    assert!(other_instance.get(&approval.id).unwrap().is_some());
    let local = open_store(None, dir.path(), DecisionSeal::NoOperator).unwrap();
    assert!(local.get(&approval.id).unwrap().is_none());
    assert!(dir.path().join("approvals.db").exists());
    assert!(matches!(
        open_store(Some("mysql://x"), dir.path(), DecisionSeal::NoOperator),
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

/// Two `proxi serve` instances on one store, each with its own data dir.
struct TwoServers {
    url: String,
    servers: Vec<common::ServerProcess>,
    _dirs: Vec<tempfile::TempDir>,
    _credential_dir: tempfile::TempDir,
    _postgres: PostgresServer,
}

fn two_servers() -> TwoServers {
    let postgres = PostgresServer::start();
    let url = postgres.url();
    let credential_dir = tempfile::tempdir().expect("temp dir");
    let credential = common::write_credential(credential_dir.path(), common::OPERATOR_TOKEN, 42);
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let servers = dirs
        .iter()
        .map(|dir| {
            common::ServerProcess::start_with_policy(
                dir.path(),
                &common::high_rate_limit_policy_path(),
                &[
                    "--store",
                    &url,
                    "--operator-credential",
                    credential.to_str().expect("a UTF-8 path"),
                ],
            )
        })
        .collect();
    TwoServers {
        url,
        servers,
        _dirs: dirs,
        _credential_dir: credential_dir,
        _postgres: postgres,
    }
}

/// `proxi token ARGS --store URL`, which must succeed: its stdout.
fn token_on_store(url: &str, args: &[&str]) -> String {
    let scratch = tempfile::tempdir().unwrap();
    let mut args = args.to_vec();
    args.extend(["--store", url]);
    let output = common::identities::token_command(scratch.path(), &args);
    assert!(
        output.status.success(),
        "token {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        std::fs::read_dir(scratch.path()).unwrap().next().is_none(),
        "with --store nothing is written to the data dir"
    );
    String::from_utf8(output.stdout).expect("utf-8")
}

/// The HTTP status of a read-only tool call with `token` on `server`.
async fn call_status(server: &common::ServerProcess, token: &str) -> u16 {
    let (status, _) = common::Api::new(&server.url)
        .post(
            "/tools/execute",
            Some(token),
            json!({"tool_name": "list_services", "arguments": {}}),
        )
        .await;
    status.as_u16()
}

#[tokio::test]
async fn a_named_token_added_to_the_store_works_on_every_instance_until_revoked_on_one() {
    let cluster = two_servers();
    let token = token_on_store(&cluster.url, &["add", "deploy-bot", "--role", "agent"]);
    let token = token.trim();
    let listed = token_on_store(&cluster.url, &["list", "--json"]);
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed[0]["name"], "deploy-bot");
    assert!(
        !listed.to_string().contains(token),
        "list never shows tokens"
    );
    for server in &cluster.servers {
        assert_eq!(call_status(server, token).await, 200, "{}", server.url);
    }
    token_on_store(&cluster.url, &["revoke", "deploy-bot"]);
    // In force on both instances at their next request: no waiting, no restart.
    for server in &cluster.servers {
        assert_eq!(call_status(server, token).await, 401, "{}", server.url);
    }
    assert_eq!(
        call_status(&cluster.servers[0], common::AGENT_TOKEN).await,
        200,
        "the built-in agent token is untouched"
    );
}

/// Runs one SQL statement on the store as a database writer without the operator token.
fn execute_sql(url: &str, sql: &str) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .expect("the store is reachable");
        let driver = tokio::spawn(connection);
        client.batch_execute(sql).await.expect("the statement runs");
        drop(client);
        let _ = driver.await;
    });
}

#[test]
fn a_row_written_without_the_operator_key_is_refused() {
    use proxi::identities::postgres::PostgresPrincipals;
    use proxi::identities::{IdentityError, Lookup, PrincipalStore, RegistryKey};
    use proxi::principal::{Principal, Role};
    use sha2::Digest;

    let server = PostgresServer::start();
    let url = server.url();
    let key = || RegistryKey::from_operator_token(common::OPERATOR_TOKEN);
    let store = PostgresPrincipals::connect(&url, key()).unwrap();
    let issued = store.add("deploy-bot", Role::Agent).unwrap();
    let digest: [u8; 32] = sha2::Sha256::digest(issued.token.as_bytes()).into();
    assert_eq!(
        store.authenticate(&digest),
        Lookup::Found(Principal::named("deploy-bot", Role::Agent))
    );
    assert!(matches!(
        store.add("deploy-bot", Role::Operator),
        Err(IdentityError::Duplicate(_))
    ));
    // Another instance, signed with another operator token, trusts none of it.
    let other_key = PostgresPrincipals::connect(
        &url,
        RegistryKey::from_operator_token("another-operator-token-0123456789"),
    )
    .unwrap();
    assert_eq!(other_key.authenticate(&digest), Lookup::Untrusted);
    // A database writer promotes the agent to operator: the row no longer verifies.
    execute_sql(
        &url,
        "UPDATE principals SET role = 'operator' WHERE name = 'deploy-bot'",
    );
    assert_eq!(store.authenticate(&digest), Lookup::Untrusted);
    assert!(matches!(store.list(), Err(IdentityError::StoreTampered(_))));
    assert!(matches!(
        store.revoke("deploy-bot"),
        Err(IdentityError::StoreTampered(_))
    ));
    // A forged principal with a made-up MAC is refused too.
    let forged = hex::encode(sha2::Sha256::digest(b"forged-token"));
    execute_sql(
        &url,
        &format!(
            "INSERT INTO principals (name, role, token_sha256, created, revoked, mac) \
             VALUES ('mallory', 'operator', '{forged}', '2026-01-01T00:00:00Z', NULL, '00')"
        ),
    );
    let forged_digest: [u8; 32] = sha2::Sha256::digest(b"forged-token").into();
    assert_eq!(store.authenticate(&forged_digest), Lookup::Untrusted);
    // Unknown tokens are unknown; a store that is down refuses every named token.
    assert_eq!(store.authenticate(&[7u8; 32]), Lookup::Unknown);
    server.stop();
    assert_eq!(store.authenticate(&forged_digest), Lookup::Untrusted);
}
