//! Attack: the agent edits the registry of named tokens in a data dir it can write
//! (under `proxi mcp` the data dir is the agent's own), to give itself an operator
//! token or to bring a revoked token back.
//!
//! The registry is signed with a key derived from the operator token, which the
//! agent does not hold: an added operator digest, a dropped revocation and an older
//! signed copy put back are all refused by the running server (401, audited as
//! `registry_untrusted`), and the built-in tokens keep working.

mod common;

use std::path::Path;

use common::identities::{add_token, revoke_token};
use common::{Api, OPERATOR_TOKEN, ServerProcess, audit_records};
use proxi::identities::PRINCIPALS_FILE;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

fn registry(data_dir: &Path) -> Value {
    let text = std::fs::read_to_string(data_dir.join(PRINCIPALS_FILE)).expect("registry");
    serde_json::from_str(&text).expect("JSON")
}

/// Rewrites the registry as the agent would: in place, keeping the rest of the file.
fn agent_writes(data_dir: &Path, registry: &Value) {
    std::fs::write(
        data_dir.join(PRINCIPALS_FILE),
        serde_json::to_vec_pretty(registry).expect("JSON"),
    )
    .expect("the agent can write the data dir");
}

async fn status_with(api: &Api, token: &str) -> StatusCode {
    api.get("/audit?limit=1", Some(token)).await.0
}

#[tokio::test]
async fn an_added_operator_digest_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = ServerProcess::start(dir.path(), &["--durability", "process"]);
    let api = Api::new(&server.url);
    let bot = add_token(dir.path(), "deploy-bot", "agent");
    assert_eq!(status_with(&api, &bot).await, StatusCode::FORBIDDEN);

    // The agent appends an operator entry with a token it chose, bumps the
    // generation and leaves the old MAC (it cannot compute a new one).
    let forged = "forged-operator-token-0123456789";
    let mut file = registry(dir.path());
    file["generation"] = json!(file["generation"].as_u64().expect("generation") + 1);
    file["principals"]
        .as_array_mut()
        .expect("principals")
        .push(json!({
            "name": "root-bot",
            "role": "operator",
            "token_sha256": hex::encode(Sha256::digest(forged.as_bytes())),
            "created": "2026-01-01T00:00:00Z",
            "revoked": null
        }));
    agent_writes(dir.path(), &file);
    assert_eq!(status_with(&api, forged).await, StatusCode::UNAUTHORIZED);
    // A registry that does not verify is refused as a whole.
    assert_eq!(status_with(&api, &bot).await, StatusCode::UNAUTHORIZED);
    assert_eq!(status_with(&api, OPERATOR_TOKEN).await, StatusCode::OK);
    let refusal = audit_records(dir.path())
        .into_iter()
        .rev()
        .find(|record| record.kind == "auth_refused")
        .expect("the refusal is audited");
    assert_eq!(refusal.reason_code.as_deref(), Some("registry_untrusted"));

    // The operator's tools refuse to build on a registry that does not verify.
    let add = common::identities::token_command(dir.path(), &["add", "carol", "--role", "agent"]);
    assert!(!add.status.success());
    assert!(
        String::from_utf8_lossy(&add.stderr).contains("does not verify"),
        "{}",
        String::from_utf8_lossy(&add.stderr)
    );
}

#[tokio::test]
async fn a_removed_revocation_or_an_old_signed_copy_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = ServerProcess::start(dir.path(), &["--durability", "process"]);
    let api = Api::new(&server.url);
    let alice = add_token(dir.path(), "alice", "operator");
    assert_eq!(status_with(&api, &alice).await, StatusCode::OK);
    let before_revocation = std::fs::read(dir.path().join(PRINCIPALS_FILE)).expect("copy");
    revoke_token(dir.path(), "alice");
    assert_eq!(status_with(&api, &alice).await, StatusCode::UNAUTHORIZED);

    // Dropping the revocation breaks the MAC.
    let mut file = registry(dir.path());
    file["principals"][0]["revoked"] = Value::Null;
    agent_writes(dir.path(), &file);
    assert_eq!(status_with(&api, &alice).await, StatusCode::UNAUTHORIZED);

    // Putting back the validly signed copy from before the revocation is a rollback.
    std::fs::write(dir.path().join(PRINCIPALS_FILE), &before_revocation).expect("write");
    assert_eq!(status_with(&api, &alice).await, StatusCode::UNAUTHORIZED);
    assert_eq!(status_with(&api, OPERATOR_TOKEN).await, StatusCode::OK);
}

#[tokio::test]
async fn with_a_credential_an_old_copy_put_back_while_the_server_is_down_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let outside = tempfile::tempdir().expect("temp dir");
    let credential = common::write_credential(outside.path(), OPERATOR_TOKEN, 7);
    let credential_flag = credential.to_str().expect("utf-8 path");
    let with_credential = ["add", "alice", "--role", "operator"]
        .into_iter()
        .chain(["--operator-credential", credential_flag])
        .collect::<Vec<_>>();
    let added = common::identities::token_command(dir.path(), &with_credential);
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    let alice = String::from_utf8(added.stdout)
        .expect("utf-8")
        .trim()
        .to_owned();
    let before_revocation = std::fs::read(dir.path().join(PRINCIPALS_FILE)).expect("copy");
    let revoked = common::identities::token_command(
        dir.path(),
        &["revoke", "alice", "--operator-credential", credential_flag],
    );
    assert!(
        revoked.status.success(),
        "{}",
        String::from_utf8_lossy(&revoked.stderr)
    );
    // The server was not running: only the mark beside the credential remembers.
    std::fs::write(dir.path().join(PRINCIPALS_FILE), &before_revocation).expect("write");
    let server = ServerProcess::start(
        dir.path(),
        &[
            "--durability",
            "process",
            "--operator-credential",
            credential_flag,
        ],
    );
    let api = Api::new(&server.url);
    assert_eq!(status_with(&api, &alice).await, StatusCode::UNAUTHORIZED);
    assert_eq!(status_with(&api, OPERATOR_TOKEN).await, StatusCode::OK);
}
