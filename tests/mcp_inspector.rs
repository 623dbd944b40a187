//! The official MCP Inspector's CLI (npm `@modelcontextprotocol/inspector`, pinned by
//! tests/mcp-harness/package.json) lists Proxi's tools over stdio with `--strict`,
//! which reports tool-schema portability problems (for example a `type` array,
//! which the OpenAPI subset of Gemini function declarations may reject). Proxi's
//! published schemas must pass it with no error and no warning.

mod common;

use std::process::Command;

use common::mcp_harness::{harness_file, loopback_env, proxi_bin, run_with_deadline};
use common::policy_path;
use serde_json::Value;

#[test]
fn the_inspector_finds_no_schema_problem_in_tools_list() {
    let node = harness_file("npm/node_modules/node/bin/node");
    let inspector = harness_file(
        "npm/node_modules/@modelcontextprotocol/inspector/clients/launcher/build/index.js",
    );
    let scratch = tempfile::tempdir().expect("temp dir");
    let data_dir = scratch.path().join("data");
    let mut command = Command::new(&node);
    command
        .arg(&inspector)
        .args(["--cli", "--method", "tools/list", "--strict"])
        .arg(proxi_bin())
        .arg("mcp")
        .arg("--policy")
        .arg(policy_path())
        .arg("--data-dir")
        .arg(&data_dir)
        .current_dir(scratch.path())
        // The Inspector keeps a catalog under $HOME/.mcp-inspector.
        .env("HOME", scratch.path());
    loopback_env(&mut command);
    let output = run_with_deadline(&mut command);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the Inspector failed ({})\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        output.status
    );
    let listed: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|error| panic!("tools/list is not JSON ({error}):\n{stdout}"));
    let names: Vec<&str> = listed["tools"]
        .as_array()
        .map(|tools| {
            tools
                .iter()
                .filter_map(|tool| tool["name"].as_str())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        names,
        [
            "list_services",
            "get_service_status",
            "read_logs",
            "restart_service",
            "scale_fleet",
            "delete_database"
        ],
        "{stdout}"
    );
    // With --strict, each problem is a "Warning: tool ..." or "Error: tool ..." block
    // followed by a summary ("0 errors, 1 warning across 1 tool."); a clean list
    // prints none of it.
    for sign in ["Warning: tool", "Error: tool", " across "] {
        assert!(
            !stderr.contains(sign),
            "the Inspector reports schema problems:\n{stderr}"
        );
    }
}
