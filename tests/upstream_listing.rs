//! How upstream tools are listed (REST `/tools/catalog`, MCP `tools/list`) and
//! decided: a server whose policy is bound to a catalog of upstream tools, with
//! their descriptions, schemas and annotations as the upstream listed them.

mod common;

use std::path::Path;
use std::sync::Arc;

use proxi::catalog::Catalog;
use proxi::policy::PolicyEngine;
use proxi::reason::Reason;
use proxi::upstream::client::{ExposedTool, ToolListing};
use reqwest::StatusCode;
use rmcp::model::{Tool, ToolAnnotations};
use serde_json::{Value, json};

fn tool(name: &str, description: &str, annotations: ToolAnnotations) -> ExposedTool {
    let schema = json!({"type": "object", "properties": {"path": {"type": "string"},
        "content": {"type": "string"}}, "required": ["path"]});
    ExposedTool {
        exposed_name: format!("fs__{name}"),
        tool: Tool::new(
            name.to_owned(),
            description.to_owned(),
            schema.as_object().cloned().unwrap(),
        )
        .annotate(annotations),
    }
}

/// policies/filesystem.json bound to three of server-filesystem's tools.
fn filesystem_engine() -> PolicyEngine {
    let engine =
        PolicyEngine::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/filesystem.json"))
            .expect("the shipped filesystem policy loads");
    let listing = ToolListing {
        tools: vec![
            tool(
                "read_text_file",
                "Read a file.",
                ToolAnnotations::new().read_only(true),
            ),
            tool(
                "write_file",
                "Write a file.",
                ToolAnnotations::new().read_only(false).destructive(true),
            ),
            tool(
                "move_file",
                "Move a file.",
                ToolAnnotations::new().read_only(false).destructive(false),
            ),
        ],
        skipped: Vec::new(),
    };
    engine.bind(Arc::new(Catalog::from_sources(false, [("fs", &listing)])))
}

#[tokio::test]
async fn the_rest_catalog_lists_allowed_upstream_tools_with_their_modes_and_hides_the_rest() {
    let server = common::TestServer::start_with_engine(filesystem_engine()).await;
    let (status, body) = server
        .api()
        .get("/tools/catalog", Some(common::AGENT_TOKEN))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let tools = body["tools"].as_array().expect("tools");
    let names: Vec<&str> = tools.iter().filter_map(|t| t["name"].as_str()).collect();
    assert_eq!(names, ["fs__read_text_file", "fs__write_file"]);
    let read = &tools[0];
    assert_eq!(read["description"], "Read a file.");
    assert_eq!(read["allowed"], true);
    assert_eq!(read["allowed_modes"], json!(["EMERGENCY", "NORMAL"]));
    assert_eq!(read["category"], "read_only");
    assert_eq!(read["annotations"]["readOnlyHint"], true);
    assert_eq!(read["input_schema"]["properties"]["path"]["type"], "string");
    let write = &tools[1];
    assert_eq!(write["allowed"], false);
    assert_eq!(write["allowed_modes"], json!(["EMERGENCY"]));
    assert_eq!(write["category"], "destructive");
}

#[tokio::test]
async fn mcp_tools_list_carries_the_upstream_description_modes_and_annotations() {
    let server = common::TestServer::start_with_engine(filesystem_engine()).await;
    let tools = proxi::mcp::tool_definitions(&server.gateway());
    let names: Vec<&str> = tools.iter().map(|tool| tool.name.as_ref()).collect();
    assert_eq!(names, ["fs__read_text_file", "fs__write_file"]);
    assert_eq!(
        tools[0].description.as_deref(),
        Some("Read a file. Allowed in modes: EMERGENCY, NORMAL.")
    );
    assert_eq!(
        tools[1].description.as_deref(),
        Some("Write a file. Allowed in modes: EMERGENCY.")
    );
    let annotations = tools[1].annotations.clone().expect("annotations");
    assert_eq!(annotations.read_only_hint, Some(false));
    assert_eq!(annotations.destructive_hint, Some(true));
    assert_eq!(
        Value::Object(tools[0].input_schema.as_ref().clone())["required"],
        json!(["path"])
    );
}

#[tokio::test]
async fn a_hidden_tool_is_still_decided_and_audited_and_bad_arguments_are_rejected() {
    let server = common::TestServer::start_with_engine(filesystem_engine()).await;
    let api = server.api();
    let (status, body) = api
        .execute("fs__move_file", json!({"path": "a", "content": "b"}))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(
        body["reason_code"],
        Reason::AlwaysBlocked.as_str(),
        "{body}"
    );
    // Schema-invalid arguments of a permitted tool: 422, never forwarded.
    let (status, body) = api.execute("fs__read_text_file", json!({"path": 7})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(
        body["reason_code"],
        Reason::InvalidArguments.as_str(),
        "{body}"
    );
    // Blocked in NORMAL, whatever the arguments.
    let (status, body) = api.execute("fs__write_file", json!({})).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(
        body["reason_code"],
        Reason::BlockedInMode.as_str(),
        "{body}"
    );

    let records = api.audit(10).await;
    let decided: Vec<(String, String)> = records
        .iter()
        .filter(|record| record["kind"] == "tool_call")
        .map(|record| {
            (
                record["tool"].as_str().unwrap_or_default().to_owned(),
                record["decision"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    for expected in [
        ("fs__move_file", "denied"),
        ("fs__read_text_file", "rejected"),
        ("fs__write_file", "denied"),
    ] {
        assert!(
            decided
                .iter()
                .any(|(tool, decision)| (tool.as_str(), decision.as_str()) == expected),
            "missing {expected:?} in {records:?}"
        );
    }
}
