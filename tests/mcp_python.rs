//! End to end with the official MCP Python SDK (PyPI `mcp`, pinned by
//! scripts/mcp-harness.sh), over stdio (`proxi mcp`) and Streamable HTTP
//! (`proxi serve`'s `/mcp`), with both lifecycles the SDK speaks: the
//! `initialize` handshake (`legacy`) and `server/discover` + 2026-07-28 (`auto`).
//!
//! The scenario itself is tests/python/mcp_e2e.py.

mod common;

use std::process::Command;

use common::mcp_harness::{
    ProxiServer, assert_success, loopback_env, proxi_bin, python, repo, run_with_deadline,
};
use common::{AGENT_TOKEN, OPERATOR_TOKEN, policy_path};

fn script() -> Command {
    let mut command = Command::new(python());
    command
        .arg(repo().join("tests/python/mcp_e2e.py"))
        .env("PROXI_AGENT_TOKEN", AGENT_TOKEN)
        .env("PROXI_OPERATOR_TOKEN", OPERATOR_TOKEN)
        .env("PYTHONUNBUFFERED", "1");
    loopback_env(&mut command);
    command
}

fn over_stdio(mode: &str) {
    let data_dir = tempfile::tempdir().expect("temp dir");
    let mut command = script();
    command
        .args(["--transport", "stdio", "--mode", mode])
        .arg("--proxi")
        .arg(proxi_bin())
        .arg("--policy")
        .arg(policy_path())
        .arg("--data-dir")
        .arg(data_dir.path());
    let output = run_with_deadline(&mut command);
    assert_success(&format!("the Python SDK over stdio ({mode})"), &output);
}

fn over_http(mode: &str) {
    let server = ProxiServer::start();
    let mut command = script();
    command
        .args(["--transport", "http", "--mode", mode])
        .arg("--data-dir")
        .arg(server.data_dir.path());
    let output = run_with_deadline(&mut command);
    if !output.status.success() {
        eprintln!("--- proxi serve log ---\n{}", server.log());
    }
    assert_success(&format!("the Python SDK over HTTP ({mode})"), &output);
}

#[test]
fn python_sdk_over_stdio_with_the_initialize_handshake() {
    over_stdio("legacy");
}

#[test]
fn python_sdk_over_stdio_with_discover_and_2026_07_28() {
    over_stdio("auto");
}

#[test]
fn python_sdk_over_streamable_http_with_the_initialize_handshake() {
    over_http("legacy");
}

#[test]
fn python_sdk_over_streamable_http_with_discover_and_2026_07_28() {
    over_http("auto");
}
