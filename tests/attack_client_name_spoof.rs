//! Attack: an MCP client name that reads like a principal (issue 8, item 6). Over
//! stdio the agent called itself `operator` and the trail showed `mcp:operator`.
//! Now stdio principals read `agent (mcp:NAME)` as over HTTP, and names with
//! control, bidi, zero-width or line-separator characters are escaped.

mod common;

use common::{McpStdio, policy_path};
use serde_json::json;

fn principal_of_last_call(client_name: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut mcp = McpStdio::start(&data, &policy_path(), client_name);
    let result = mcp.call_tool("list_services", json!({}));
    assert_ne!(result["isError"], true, "{result}");
    mcp.close();
    let records = proxi::audit::read_recent(&data.join(proxi::audit::AUDIT_DB_FILE), 5).unwrap();
    records
        .into_iter()
        .rev()
        .find(|record| record.kind == "tool_call")
        .expect("the call is audited")
        .principal
}

#[test]
fn a_client_called_operator_is_recorded_as_the_agent() {
    assert_eq!(principal_of_last_call("operator"), "agent (mcp:operator)");
    assert_eq!(principal_of_last_call("system"), "agent (mcp:system)");
}

#[test]
fn invisible_and_reordering_characters_in_client_names_are_escaped() {
    for (name, recorded) in [
        ("\u{202e}rotarepo", "agent (mcp:\\u{202e}rotarepo)"),
        ("oper\u{200b}ator", "agent (mcp:oper\\u{200b}ator)"),
        ("ops\u{2028}operator", "agent (mcp:ops\\u{2028}operator)"),
        (
            "x\r\u{1b}[2Koperator",
            "agent (mcp:x\\r\\u{001b}[2Koperator)",
        ),
        ("\u{2066}\u{2069}", "agent (mcp:\\u{2066}\\u{2069})"),
    ] {
        let principal = principal_of_last_call(name);
        assert_eq!(principal, recorded, "{name:?}");
        assert!(!principal.chars().any(proxi::text::needs_escape));
    }
}
