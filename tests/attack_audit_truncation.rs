//! Issue 8, item 9: the audit trail could be truncated or re-hashed and still verify.
//!
//! Before the fix, deleting the operator's return to NORMAL (and fixing
//! `sqlite_sequence`) made `audit verify` say OK and the restarted server came up in
//! EMERGENCY; an edit followed by recomputing every hash also verified. Now records
//! carry an HMAC under the audit key from the operator credential, and a MAC'd anchor
//! next to the credential records the newest record: both attacks are named by record,
//! a wrong key is a key mismatch, and the server refuses to extend a truncated trail.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{
    AGENT_TOKEN, Api, OPERATOR_TOKEN, ServerProcess, policy_path, wait_for_exit, write_credential,
};
use proxi::audit::{AUDIT_DB_FILE, GENESIS_HASH};
use rusqlite::Connection;
use sha2::{Digest, Sha256};

fn verify(data_dir: &Path, credential: &Path) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_proxi"))
        .args(["audit", "verify", "--data-dir"])
        .arg(data_dir)
        .arg("--operator-credential")
        .arg(credential)
        .output()
        .expect("proxi runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr),
    )
}

fn serve_once(data_dir: &Path, credential: &Path) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_proxi"))
        .args(["serve", "--bind", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .arg("--policy")
        .arg(policy_path())
        .arg("--operator-credential")
        .arg(credential)
        .env("PROXI_AGENT_TOKEN", AGENT_TOKEN)
        .env_remove("PROXI_OPERATOR_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("proxi starts");
    wait_for_exit(child, Duration::from_secs(30))
}

/// A trail with an EMERGENCY declaration and the operator's return to NORMAL.
async fn trail_with_emergency_then_normal(credential: &Path) -> (tempfile::TempDir, u64) {
    let data = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(
        data.path(),
        &["--operator-credential", credential.to_str().unwrap()],
    );
    let api = Api::new(&server.url);
    api.emergency().await;
    api.execute("list_services", serde_json::json!({})).await;
    api.normal().await;
    server.kill();
    let last: i64 = db(data.path())
        .query_row("SELECT MAX(seq) FROM audit_log", [], |row| row.get(0))
        .unwrap();
    (data, last as u64)
}

fn db(data_dir: &Path) -> Connection {
    Connection::open(data_dir.join(AUDIT_DB_FILE)).unwrap()
}

/// What an attacker who read the source does after an edit: recompute every hash.
fn rehash(data_dir: &Path) {
    let connection = db(data_dir);
    let rows: Vec<(i64, Vec<Option<String>>)> = connection
        .prepare("SELECT seq, ts, principal, kind, tool, arguments, mode, decision, reason_code, outcome, detail, expires_at, context, policy_hash, role FROM audit_log ORDER BY seq")
        .unwrap()
        .query_map([], |row| {
            let fields = (1..=14).map(|i| row.get(i)).collect::<Result<Vec<_>, _>>()?;
            Ok((row.get(0)?, fields))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut previous = GENESIS_HASH.to_owned();
    for (seq, fields) in rows {
        let mut hasher = Sha256::new();
        hasher.update(previous.as_bytes());
        hasher.update((seq as u64).to_be_bytes());
        for (index, field) in fields.into_iter().enumerate() {
            // The eleven original columns, then `context` (tag 2),
            // `policy_hash` (tag 3) and `role` (tag 4), each hashed only when present.
            let tag = match index {
                0..=10 => 1u8,
                11 => 2,
                12 => 3,
                _ => 4,
            };
            match field {
                None if tag == 1 => hasher.update([0u8]),
                None => {}
                Some(text) => {
                    hasher.update([tag]);
                    hasher.update((text.len() as u64).to_be_bytes());
                    hasher.update(text.as_bytes());
                }
            }
        }
        let hash = hex::encode(hasher.finalize());
        connection
            .execute(
                "UPDATE audit_log SET prev_hash = ?1, hash = ?2 WHERE seq = ?3",
                rusqlite::params![previous, hash, seq],
            )
            .unwrap();
        previous = hash;
    }
}

fn credential_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_credential(dir.path(), OPERATOR_TOKEN, 1);
    (dir, path)
}

#[tokio::test]
async fn deleting_the_return_to_normal_is_caught_by_verify_and_at_startup() {
    let (_keep, credential) = credential_dir();
    let (data, last) = trail_with_emergency_then_normal(&credential).await;
    let (ok, output) = verify(data.path(), &credential);
    assert!(ok, "the untouched trail verifies: {output}");

    db(data.path())
        .execute_batch(&format!(
            "DELETE FROM audit_log WHERE seq = {last};
             UPDATE sqlite_sequence SET seq = {} WHERE name = 'audit_log';",
            last - 1
        ))
        .unwrap();
    let (ok, output) = verify(data.path(), &credential);
    assert!(!ok, "a truncated trail must not verify: {output}");
    assert!(
        output.contains(&format!("BROKEN at record {last}")) && output.contains("truncated"),
        "{output}"
    );

    // The server does not come up in the EMERGENCY the truncated trail ends with.
    let refused = serve_once(data.path(), &credential);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success(),
        "the server started on a truncated trail"
    );
    assert!(
        stderr.contains("the end of the trail was deleted"),
        "{stderr}"
    );
}

#[tokio::test]
async fn an_edit_with_every_hash_recomputed_is_named_by_record() {
    let (_keep, credential) = credential_dir();
    let (data, _) = trail_with_emergency_then_normal(&credential).await;
    db(data.path())
        .execute("UPDATE audit_log SET principal = 'agent' WHERE seq = 1", [])
        .unwrap();
    rehash(data.path());
    let (ok, output) = verify(data.path(), &credential);
    assert!(!ok, "a re-hashed trail must not verify: {output}");
    assert!(
        output.contains("BROKEN at record 1") && output.contains("re-hashed"),
        "{output}"
    );
    let refused = serve_once(data.path(), &credential);
    assert!(
        !refused.status.success(),
        "the server extended a re-hashed trail"
    );
}

#[tokio::test]
async fn another_credential_is_reported_as_a_key_mismatch() {
    let (_keep, credential) = credential_dir();
    let (data, _) = trail_with_emergency_then_normal(&credential).await;
    let other_dir = tempfile::tempdir().unwrap();
    let other = write_credential(other_dir.path(), OPERATOR_TOKEN, 2);
    let (ok, output) = verify(data.path(), &other);
    assert!(!ok, "{output}");
    assert!(
        output.contains("BROKEN at record 1") && output.contains("key mismatch"),
        "{output}"
    );
    let refused = serve_once(data.path(), &other);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(stderr.contains("another audit key"), "{stderr}");
}
