//! The official MCP conformance suite (npm `@modelcontextprotocol/conformance`,
//! pinned by tests/mcp-harness/package.json) against `proxi serve`'s `/mcp`.
//!
//! The suite's client cannot send a bearer token, and `/mcp` requires one. So the
//! test puts a loopback relay in front that adds the agent token, as any real MCP
//! client configured with the token would, and changes nothing else except the
//! relay's own port in Host/Origin. A foreign Host (the DNS-rebinding scenario's
//! `evil.example.com`) passes through untouched, so Proxi's own check decides.

mod common;

use std::net::SocketAddr;
use std::process::Command;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header::{
    AUTHORIZATION, CONNECTION, CONTENT_LENGTH, HOST, ORIGIN, TRANSFER_ENCODING,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use common::AGENT_TOKEN;
use common::mcp_harness::{ProxiServer, harness_file, loopback_env, run_with_deadline};

/// The scenarios a server without the suite's fixture tools can pass; all must.
const SCENARIOS: [&str; 5] = [
    "server-initialize",
    "ping",
    "tools-list",
    "logging-set-level",
    "dns-rebinding-protection",
];

#[derive(Clone)]
struct Relay {
    client: reqwest::Client,
    target: String,
    relay_port: u16,
    target_port: u16,
}

/// Replaces the relay's port with the target's in `host:port` or `scheme://host:port`.
fn retarget(value: &HeaderValue, relay: &Relay) -> HeaderValue {
    let Ok(text) = value.to_str() else {
        return value.clone();
    };
    let suffix = format!(":{}", relay.relay_port);
    match text.strip_suffix(&suffix) {
        Some(host) => HeaderValue::from_str(&format!("{host}:{}", relay.target_port))
            .unwrap_or_else(|_| value.clone()),
        None => value.clone(),
    }
}

async fn forward(State(relay): State<Relay>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |path| path.as_str())
        .to_owned();
    let mut headers = HeaderMap::new();
    for (name, value) in &parts.headers {
        if name == CONNECTION || name == TRANSFER_ENCODING || name == AUTHORIZATION {
            continue;
        }
        let value = if name == HOST || name == ORIGIN {
            retarget(value, &relay)
        } else {
            value.clone()
        };
        headers.append(name.clone(), value);
    }
    headers.insert(
        AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {AGENT_TOKEN}")).expect("token is a header value"),
    );
    let upstream = relay
        .client
        .request(parts.method, format!("{}{path}", relay.target))
        .headers(headers)
        .body(reqwest::Body::wrap_stream(body.into_data_stream()))
        .send()
        .await;
    let upstream = match upstream {
        Ok(upstream) => upstream,
        Err(error) => return (StatusCode::BAD_GATEWAY, error.to_string()).into_response(),
    };
    let mut response = Response::builder().status(upstream.status());
    for (name, value) in upstream.headers() {
        if name != CONNECTION && name != TRANSFER_ENCODING && name != CONTENT_LENGTH {
            response = response.header(name, value);
        }
    }
    response
        .body(Body::from_stream(upstream.bytes_stream()))
        .unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response())
}

/// Starts the token-adding relay on a free loopback port; returns its `/mcp` URL.
async fn spawn_relay(target: &str) -> String {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("bind the relay");
    let relay_port = listener.local_addr().expect("relay address").port();
    let target_port = target
        .rsplit(':')
        .next()
        .and_then(|port| port.parse().ok())
        .expect("the server URL has a port");
    proxi::tls::install_crypto_provider();
    let relay = Relay {
        client: reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("http client"),
        target: format!("http://{target}"),
        relay_port,
        target_port,
    };
    let app = Router::new().fallback(forward).with_state(relay);
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://127.0.0.1:{relay_port}/mcp")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_conformance_scenarios_pass_against_proxi_serve() {
    let node = harness_file("npm/node_modules/node/bin/node");
    let suite = harness_file("npm/node_modules/@modelcontextprotocol/conformance/dist/index.js");
    let server = ProxiServer::start();
    let url = spawn_relay(server.authority()).await;
    let workdir = tempfile::tempdir().expect("temp dir");
    for scenario in SCENARIOS {
        let mut command = Command::new(&node);
        command
            .arg(&suite)
            .args(["server", "--url", &url, "--scenario", scenario])
            .current_dir(workdir.path())
            .env("HOME", workdir.path());
        loopback_env(&mut command);
        let output = tokio::task::spawn_blocking(move || run_with_deadline(&mut command))
            .await
            .expect("the conformance run");
        let stdout = String::from_utf8_lossy(&output.stdout);
        // The summary reads "Passed: N/N, 0 failed, 0 warnings".
        let passed = stdout.lines().any(|line| {
            line.strip_prefix("Passed: ")
                .and_then(|rest| rest.split_once(", "))
                .is_some_and(|(ratio, rest)| {
                    ratio
                        .split_once('/')
                        .is_some_and(|(done, all)| done == all && done != "0")
                        && rest.starts_with("0 failed")
                })
        });
        assert!(
            output.status.success() && passed,
            "conformance scenario {scenario} failed ({})\n--- stdout ---\n{stdout}\n--- stderr ---\n{}\n--- proxi log ---\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr),
            server.log()
        );
    }
}
