//! Attack: an agent-chosen tool name that rewrites the operator's terminal
//! (issue 8, item 12). `proxi audit tail` printed raw CR and ESC bytes from a
//! tool name (1 ESC and 1 CR byte in five lines of output), so the agent could
//! redraw or hide lines. Now tool names with control, bidi or zero-width
//! characters are refused at the edge (REST 400, MCP isError) and audited as
//! rejected with the name escaped, and every text output escapes what it prints.

mod common;

use std::process::Command;
use std::sync::Arc;

use chrono::Utc;
use common::{McpStdio, OPERATOR_TOKEN, TestServer, policy_path};
use proxi::audit::{AuditDecision, AuditEntry, AuditLog, Durability, EntryKind};
use reqwest::StatusCode;
use serde_json::{Value, json};

const REDRAW: &str = "list_services\r\u{1b}[2K\u{1b}[1Aall clear";

fn has_terminal_controls(bytes: &[u8]) -> bool {
    let text = String::from_utf8_lossy(bytes);
    text.chars()
        .any(|c| c != '\n' && proxi::text::needs_escape(c))
}

#[tokio::test]
async fn control_characters_in_tool_names_are_refused_and_audited_escaped() {
    let server = TestServer::start().await;
    let api = server.api();
    for name in [
        REDRAW,
        "list_services\u{202e}",
        "list\u{200b}_services",
        "a\u{2028}b",
    ] {
        let (status, body) = api.execute(name, json!({})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{name:?}: {body}");
        assert_eq!(body["reason_code"], "invalid_tool_name", "{body}");
        assert!(
            !has_terminal_controls(body.to_string().as_bytes()),
            "{body}"
        );
    }
    let records = server.tool_calls().await;
    assert_eq!(records.len(), 4);
    assert_eq!(
        records[0].tool.as_deref(),
        Some("list_services\\r\\u{001b}[2K\\u{001b}[1Aall clear")
    );
    assert_eq!(records[1].tool.as_deref(), Some("list_services\\u{202e}"));
    for record in &records {
        assert_eq!(record.decision, "rejected");
        assert_eq!(record.outcome, "invalid_tool_name");
        assert_eq!(record.reason_code.as_deref(), Some("invalid_tool_name"));
    }
}

#[test]
fn mcp_refuses_control_characters_in_tool_names() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut mcp = McpStdio::start(&data, &policy_path(), "escape-test");
    let result = mcp.call_tool(REDRAW, json!({}));
    assert_eq!(result["isError"], true, "{result}");
    assert_eq!(
        result["structuredContent"]["reason_code"],
        "invalid_tool_name"
    );
    mcp.close();
    let records = proxi::audit::read_recent(&data.join(proxi::audit::AUDIT_DB_FILE), 5).unwrap();
    let record = records
        .iter()
        .find(|record| record.kind == "tool_call")
        .expect("the refusal is audited");
    assert_eq!(record.decision, "rejected");
    assert!(!record.tool.as_deref().unwrap().contains('\u{1b}'));
}

/// Writes records whose fields hold raw control and bidi characters, as a trail
/// from before this fix (or one edited by someone with file access) would.
fn hostile_trail(data_dir: &std::path::Path) {
    let (audit, _) = AuditLog::open(data_dir, Durability::Process).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(async {
        audit
            .append(AuditEntry {
                time: Utc::now(),
                principal: proxi::principal::Principal::named(
                    "mcp:oper\u{202e}rotare\u{1b}]0;owned\u{7}",
                    proxi::principal::Role::Agent,
                ),
                kind: EntryKind::ToolCall,
                tool: Some(REDRAW.to_owned()),
                arguments: Some(json!({"x": "\u{1b}[31mred\u{85}\u{2029}"})),
                mode: Arc::from("NORMAL"),
                decision: AuditDecision::Rejected,
                reason_code: Some("unknown_tool"),
                outcome: "unknown_tool",
                detail: json!("\r\u{1b}[2K"),
                expires_at: None,
                context: None,
                policy_hash: None,
            })
            .await
            .unwrap();
    });
}

#[test]
fn audit_tail_escapes_every_field_in_both_formats() {
    let dir = tempfile::tempdir().unwrap();
    hostile_trail(dir.path());
    for json in [false, true] {
        let mut command = Command::new(env!("CARGO_BIN_EXE_proxi"));
        command.args(["audit", "tail", "-n", "5", "--data-dir"]);
        command.arg(dir.path());
        if json {
            command.arg("--json");
        }
        let output = command.output().unwrap();
        assert!(output.status.success());
        assert!(
            !has_terminal_controls(&output.stdout),
            "raw controls in {:?}",
            String::from_utf8_lossy(&output.stdout)
        );
        let text = String::from_utf8_lossy(&output.stdout);
        if json {
            // Still one valid JSON record per line, with the same content.
            let record: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
            assert_eq!(record["tool"], REDRAW);
        } else {
            assert!(text.contains("list_services\\r\\u{001b}[2K"), "{text}");
            assert!(text.contains("mcp:oper\\u{202e}rotare"), "{text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mode_status_escapes_the_reason() {
    let server = TestServer::start().await;
    let (status, body) = server
        .api()
        .set_mode(
            "EMERGENCY",
            Some("disk \u{1b}[2J\u{1b}[H full\r\u{202e}"),
            Some(60),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for json in [false, true] {
        let mut command = Command::new(env!("CARGO_BIN_EXE_proxi"));
        command
            .args(["mode", "status", "--server"])
            .arg(&server.url)
            .env("PROXI_OPERATOR_TOKEN", OPERATOR_TOKEN);
        if json {
            command.arg("--json");
        }
        let output = command.output().unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(!has_terminal_controls(&output.stdout), "{text:?}");
        assert!(text.contains("disk \\u"), "{text}");
    }
}
