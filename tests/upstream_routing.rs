//! Per-caller routing through `UpstreamSet` with the fixture upstream
//! (tests/fixtures/fixture_upstream.py): two MCP clients at once, each connected to
//! a small relay that hands its `tools/call` to the set with a `CallContext`, as
//! Proxi's MCP front end does. Progress, logging and sampling must reach only the
//! caller they belong to, a cancellation must cancel only that caller's upstream
//! request, and the fixture's call log shows what reached it.

// Sampling and logging are deprecated by SEP-2577 in rmcp 3.11 but still carried
// by the protocol versions Proxi serves (see src/upstream/client.rs).
#![allow(deprecated)]

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::mcp_client::{result_of, send_call};
use common::upstream::{
    arguments, eventually, fixture, fixture_calls, resolved, text_of, wait_for_fixture_call,
};
use proxi::upstream::call::{CallContext, CallerPeer};
use proxi::upstream::set::UpstreamSet;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ClientCapabilities, ClientConfig,
    CreateMessageRequestParams, CreateMessageResult, ElicitRequestParams, ElicitResult,
    ElicitationAction, ErrorData, Implementation, LoggingMessageNotificationParam,
    ProgressNotificationParam, ProgressToken, SamplingMessage, ServerCapabilities, ServerConfig,
};
use rmcp::service::{NotificationContext, RequestContext, RoleClient, RoleServer, RunningService};
use rmcp::{ClientHandler, ServerHandler, ServiceExt};
use serde_json::json;

const MINUTE: Duration = Duration::from_secs(60);

/// Hands every `tools/call` named `<upstream>__<tool>` to the set, with the
/// caller's peer, progress token and cancellation.
#[derive(Clone)]
struct Relay {
    set: Arc<UpstreamSet>,
}

impl ServerHandler for Relay {
    fn get_info(&self) -> ServerConfig {
        let capabilities = ServerCapabilities::builder()
            .enable_logging()
            .enable_tools()
            .build();
        ServerConfig::new(capabilities)
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let ctx = CallContext {
            cancel: context.ct.clone(),
            caller: Some(CallerPeer {
                peer: context.peer.clone(),
                progress_token: context.meta.get_progress_token(),
            }),
        };
        let (upstream, tool) = request
            .name
            .split_once("__")
            .ok_or_else(|| ErrorData::invalid_params("no upstream prefix", None))?;
        match self.set.call(upstream, tool, request.arguments, &ctx).await {
            Ok(result) => Ok(result.into()),
            Err(error) => Ok(CallToolResult::error(vec![rmcp::model::ContentBlock::text(
                error.to_string(),
            )])
            .into()),
        }
    }
}

/// What one downstream client saw.
#[derive(Clone, Default)]
struct Seen {
    progress: Arc<Mutex<Vec<ProgressNotificationParam>>>,
    logs: Arc<Mutex<Vec<LoggingMessageNotificationParam>>>,
    sampled: Arc<Mutex<Vec<CreateMessageRequestParams>>>,
    elicited: Arc<Mutex<usize>>,
}

/// A downstream client; with `sampling_reply` it declares sampling and answers
/// with it; with `elicitation` it declares elicitation and accepts with
/// `{"confirmed": true}`.
#[derive(Clone)]
struct Caller {
    seen: Seen,
    sampling_reply: Option<&'static str>,
    elicitation: bool,
}

impl ClientHandler for Caller {
    fn get_info(&self) -> ClientConfig {
        let mut capabilities = ClientCapabilities::default();
        if self.sampling_reply.is_some() {
            capabilities.sampling = ClientCapabilities::builder()
                .enable_sampling()
                .build()
                .sampling;
        }
        if self.elicitation {
            capabilities.elicitation = ClientCapabilities::builder()
                .enable_elicitation()
                .build()
                .elicitation;
        }
        ClientConfig::new(capabilities, Implementation::new("routing-test", "1"))
    }

    async fn create_elicitation(
        &self,
        _request: ElicitRequestParams,
        _context: RequestContext<RoleClient>,
    ) -> Result<ElicitResult, ErrorData> {
        *self.seen.elicited.lock().unwrap() += 1;
        if !self.elicitation {
            return Err(ErrorData::internal_error("no elicitation here", None));
        }
        Ok(ElicitResult::new(ElicitationAction::Accept).with_content(json!({"confirmed": true})))
    }

    async fn on_progress(
        &self,
        params: ProgressNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        self.seen.progress.lock().unwrap().push(params);
    }

    async fn on_logging_message(
        &self,
        params: LoggingMessageNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        self.seen.logs.lock().unwrap().push(params);
    }

    async fn create_message(
        &self,
        params: CreateMessageRequestParams,
        _context: RequestContext<RoleClient>,
    ) -> Result<CreateMessageResult, ErrorData> {
        self.seen.sampled.lock().unwrap().push(params);
        match self.sampling_reply {
            Some(reply) => Ok(CreateMessageResult::new(
                SamplingMessage::assistant_text(reply),
                "test-model".into(),
            )),
            None => Err(ErrorData::internal_error("no sampling here", None)),
        }
    }
}

/// Connects a new client to a relay in front of `set`, over an in-memory pipe.
async fn connect(
    set: &Arc<UpstreamSet>,
    sampling_reply: Option<&'static str>,
) -> (RunningService<RoleClient, Caller>, Seen) {
    let (server_end, client_end) = tokio::io::duplex(1 << 16);
    let relay = Relay { set: set.clone() };
    tokio::spawn(async move {
        if let Ok(server) = relay.serve(server_end).await {
            let _ = server.waiting().await;
        }
    });
    let seen = Seen::default();
    let client = Caller {
        seen: seen.clone(),
        sampling_reply,
        elicitation: sampling_reply.is_some(),
    }
    .serve(client_end)
    .await
    .expect("client handshake");
    (client, seen)
}

async fn fixture_set(call_log: &Path) -> Arc<UpstreamSet> {
    Arc::new(
        UpstreamSet::start(vec![resolved("fx", fixture(call_log), true, MINUTE)])
            .await
            .expect("the fixture starts"),
    )
}

fn progress_seen(seen: &Seen) -> Vec<(ProgressToken, f64)> {
    seen.progress
        .lock()
        .unwrap()
        .iter()
        .map(|p| (p.progress_token.clone(), p.progress))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_reaches_only_its_caller_under_the_callers_token() {
    let dir = tempfile::tempdir().unwrap();
    let call_log = dir.path().join("calls.jsonl");
    let set = fixture_set(&call_log).await;
    let (alice, alice_seen) = connect(&set, None).await;
    let (bob, bob_seen) = connect(&set, None).await;

    let alice_call = send_call(&alice, "fx__progress", json!({"steps": 5, "gap_ms": 30})).await;
    let bob_call = send_call(&bob, "fx__progress", json!({"steps": 3, "gap_ms": 30})).await;
    let (alice_token, bob_token) = (
        alice_call.progress_token.clone(),
        bob_call.progress_token.clone(),
    );
    let (alice_result, bob_result) = tokio::join!(result_of(alice_call), result_of(bob_call));
    assert_eq!(text_of(&alice_result), "5 steps done");
    assert_eq!(text_of(&bob_result), "3 steps done");

    // Forwarding runs beside the result, so the last one may trail it a little.
    eventually("all progress to arrive", Duration::from_secs(10), || {
        let counts = (
            alice_seen.progress.lock().unwrap().len(),
            bob_seen.progress.lock().unwrap().len(),
        );
        async move { (counts == (5, 3)).then_some(()) }
    })
    .await;
    let alice_progress = progress_seen(&alice_seen);
    let bob_progress = progress_seen(&bob_seen);
    assert!(
        alice_progress
            .iter()
            .all(|(token, _)| *token == alice_token),
        "{alice_progress:?}"
    );
    assert!(
        bob_progress.iter().all(|(token, _)| *token == bob_token),
        "{bob_progress:?}"
    );
    let mut alice_values: Vec<f64> = alice_progress.iter().map(|(_, value)| *value).collect();
    alice_values.sort_by(f64::total_cmp);
    assert_eq!(alice_values, [1.0, 2.0, 3.0, 4.0, 5.0]);
    drop((alice, bob));
    set.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancellation_cancels_only_that_callers_upstream_request() {
    let dir = tempfile::tempdir().unwrap();
    let call_log = dir.path().join("calls.jsonl");
    let set = fixture_set(&call_log).await;
    let (alice, _) = connect(&set, None).await;
    let (bob, _) = connect(&set, None).await;

    let doomed = send_call(&alice, "fx__slow", json!({"ms": 30000})).await;
    let kept = send_call(&bob, "fx__slow", json!({"ms": 800})).await;
    // Cancel once the fixture has the slow call.
    eventually(
        "the fixture to receive both calls",
        Duration::from_secs(10),
        || {
            let calls = fixture_calls(&call_log);
            async move { (calls.len() == 2).then_some(()) }
        },
    )
    .await;
    doomed.cancel(Some("changed my mind".into())).await.unwrap();
    let kept = result_of(kept).await;
    assert_eq!(text_of(&kept), "slept 800 ms");

    let cancelled = eventually(
        "the fixture to see the cancellation",
        Duration::from_secs(10),
        || {
            let calls = fixture_calls(&call_log);
            async move {
                let cancelled: Vec<_> = calls
                    .into_iter()
                    .filter(|c| c["event"] == "cancelled")
                    .collect();
                (!cancelled.is_empty()).then_some(cancelled)
            }
        },
    )
    .await;
    assert_eq!(cancelled.len(), 1, "{cancelled:?}");
    assert_eq!(cancelled[0]["arguments"], json!({"ms": 30000}));
    drop((alice, bob));
    set.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logging_reaches_the_caller_and_list_changed_ticks() {
    let dir = tempfile::tempdir().unwrap();
    let call_log = dir.path().join("calls.jsonl");
    let set = fixture_set(&call_log).await;
    let (alice, alice_seen) = connect(&set, None).await;
    let (_bob, bob_seen) = connect(&set, None).await;

    let logged =
        result_of(send_call(&alice, "fx__log", json!({"message": "disk at 91%"})).await).await;
    assert_eq!(text_of(&logged), "logged");
    eventually(
        "alice to get the log message",
        Duration::from_secs(10),
        || {
            let count = alice_seen.logs.lock().unwrap().len();
            async move { (count == 1).then_some(()) }
        },
    )
    .await;
    assert_eq!(
        alice_seen.logs.lock().unwrap()[0].data,
        json!("disk at 91%")
    );
    assert!(bob_seen.logs.lock().unwrap().is_empty());

    let mut changed = set.tools_changed();
    changed.borrow_and_update();
    let added = result_of(send_call(&alice, "fx__add_tool", json!({"name": "extra"})).await).await;
    assert_eq!(text_of(&added), "added extra");
    tokio::time::timeout(
        Duration::from_secs(10),
        changed.wait_for(|_| {
            set.listings()["fx"]
                .as_ref()
                .is_ok_and(|listing| listing.tools.iter().any(|t| t.exposed_name == "fx__extra"))
        }),
    )
    .await
    .expect("the new tool is listed after list_changed")
    .unwrap();
    let extra = result_of(send_call(&alice, "fx__extra", json!({"message": "new"})).await).await;
    assert_eq!(text_of(&extra), "new");
    drop(alice);
    set.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_and_elicitation_go_to_the_calling_client_only_when_it_declared_them() {
    let dir = tempfile::tempdir().unwrap();
    let call_log = dir.path().join("calls.jsonl");
    let set = fixture_set(&call_log).await;
    let (alice, alice_seen) = connect(&set, Some("yes, restart it")).await;
    let (bob, bob_seen) = connect(&set, None).await;

    let answered =
        result_of(send_call(&alice, "fx__ask", json!({"question": "restart?"})).await).await;
    assert_eq!(
        text_of(&answered),
        "client said: yes, restart it",
        "{answered:?}"
    );
    assert_eq!(alice_seen.sampled.lock().unwrap().len(), 1);

    // Bob did not declare sampling: the upstream gets an error, which it reports as
    // a failed tool call; Alice, who could answer, is never asked on Bob's behalf.
    let refused =
        result_of(send_call(&bob, "fx__ask", json!({"question": "from bob"})).await).await;
    assert_eq!(refused.is_error, Some(true), "{refused:?}");
    assert!(bob_seen.sampled.lock().unwrap().is_empty());
    assert_eq!(alice_seen.sampled.lock().unwrap().len(), 1);

    // Elicitation follows the same rule: Alice declared it, Bob did not.
    let confirmed =
        result_of(send_call(&alice, "fx__confirm", json!({"question": "restart web?"})).await)
            .await;
    assert_eq!(text_of(&confirmed), "confirmed: True", "{confirmed:?}");
    let unconfirmed =
        result_of(send_call(&bob, "fx__confirm", json!({"question": "restart db?"})).await).await;
    assert_eq!(unconfirmed.is_error, Some(true), "{unconfirmed:?}");
    assert_eq!(*alice_seen.elicited.lock().unwrap(), 1);
    assert_eq!(*bob_seen.elicited.lock().unwrap(), 0);

    // Over stdio a request cannot name its call: with a second call in flight it is
    // refused rather than guessed.
    let busy = send_call(&bob, "fx__slow", json!({"ms": 1500})).await;
    wait_for_fixture_call(&call_log, "slow", "call").await;
    let ambiguous =
        result_of(send_call(&alice, "fx__ask", json!({"question": "again?"})).await).await;
    assert_eq!(ambiguous.is_error, Some(true), "{ambiguous:?}");
    assert_eq!(alice_seen.sampled.lock().unwrap().len(), 1);
    assert_eq!(text_of(&result_of(busy).await), "slept 1500 ms");
    drop((alice, bob));
    set.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fixture_records_every_call_it_receives() {
    let dir = tempfile::tempdir().unwrap();
    let call_log = dir.path().join("calls.jsonl");
    let set = fixture_set(&call_log).await;
    let echo = set
        .call(
            "fx",
            "echo",
            arguments(json!({"message": "one"})),
            &CallContext::detached(),
        )
        .await
        .unwrap();
    assert_eq!(text_of(&echo), "one");
    let calls = fixture_calls(&call_log);
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0]["tool"], "echo");
    assert_eq!(calls[0]["arguments"], json!({"message": "one"}));
    set.shutdown().await;
}

/// The fixture serving Streamable HTTP on a free loopback port, and its URL.
fn http_fixture(call_log: &Path) -> (tokio::process::Child, u16) {
    let port = common::upstream::free_port();
    let child = tokio::process::Command::new(common::upstream::python())
        .arg(common::upstream::fixture_script())
        .args(["--http", "--port", &port.to_string()])
        .env("FIXTURE_CALL_LOG", call_log)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start the http fixture");
    (child, port)
}

fn http_upstream(name: &str, port: u16) -> proxi::upstream::config::ResolvedUpstream {
    let declaration: proxi::upstream::config::UpstreamDeclaration =
        serde_json::from_value(json!({"url": format!("http://127.0.0.1:{port}/mcp")})).unwrap();
    declaration.resolve(name, &|_| None).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http_a_request_is_routed_by_its_stream_even_with_calls_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let call_log = dir.path().join("calls.jsonl");
    let (_server, port) = http_fixture(&call_log);
    // Optional, so start returns at once; the fixture may still be booting.
    let set = Arc::new(
        UpstreamSet::start(vec![http_upstream("web", port)])
            .await
            .unwrap(),
    );
    let mut changed = set.tools_changed();
    tokio::time::timeout(
        Duration::from_secs(30),
        changed.wait_for(|_| set.listings()["web"].is_ok()),
    )
    .await
    .expect("the http fixture is listed")
    .unwrap();
    let (alice, alice_seen) = connect(&set, Some("over http")).await;
    let (bob, _) = connect(&set, None).await;

    let busy = send_call(&bob, "web__slow", json!({"ms": 1500})).await;
    wait_for_fixture_call(&call_log, "slow", "call").await;
    // Two calls in flight, but the sampling request comes on the SSE stream of
    // Alice's POST, so it is hers without doubt.
    let answered = result_of(send_call(&alice, "web__ask", json!({"question": "ok?"})).await).await;
    assert_eq!(text_of(&answered), "client said: over http", "{answered:?}");
    assert_eq!(alice_seen.sampled.lock().unwrap().len(), 1);
    assert_eq!(text_of(&result_of(busy).await), "slept 1500 ms");
    drop((alice, bob));
    set.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_upstream_that_restarts_is_reconnected() {
    let dir = tempfile::tempdir().unwrap();
    let call_log = dir.path().join("calls.jsonl");
    let (mut server, port) = http_fixture(&call_log);
    let set = UpstreamSet::start(vec![http_upstream("web", port)])
        .await
        .unwrap();
    let mut changed = set.tools_changed();
    tokio::time::timeout(
        Duration::from_secs(30),
        changed.wait_for(|_| set.listings()["web"].is_ok()),
    )
    .await
    .expect("the http fixture is listed")
    .unwrap();
    let echo = set
        .call(
            "web",
            "echo",
            arguments(json!({"message": "first"})),
            &CallContext::detached(),
        )
        .await
        .unwrap();
    assert_eq!(text_of(&echo), "first");

    server.kill().await.unwrap();
    let down = set
        .call(
            "web",
            "echo",
            arguments(json!({"message": "down"})),
            &CallContext::detached(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            down,
            proxi::upstream::client::UpstreamError::Unavailable { .. }
        ),
        "{down:?}"
    );

    // The same server again on the same port: the set reconnects by itself.
    let mut again = tokio::process::Command::new(common::upstream::python())
        .arg(common::upstream::fixture_script())
        .args(["--http", "--port", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let echo = eventually(
        "a call after the reconnect",
        Duration::from_secs(40),
        || {
            let set = &set;
            async move {
                set.call(
                    "web",
                    "echo",
                    arguments(json!({"message": "second"})),
                    &CallContext::detached(),
                )
                .await
                .ok()
            }
        },
    )
    .await;
    assert_eq!(text_of(&echo), "second");
    assert!(set.status()[0].starts >= 2, "{:?}", set.status());
    set.shutdown().await;
    again.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_call_is_cancelled_upstream_and_frees_its_route() {
    let dir = tempfile::tempdir().unwrap();
    let call_log = dir.path().join("calls.jsonl");
    let set = fixture_set(&call_log).await;
    let (alice, alice_seen) = connect(&set, Some("still mine")).await;

    // The caller's future is dropped once the fixture has the call (a REST client
    // that hung up, a front end that gave up), with no cancellation token fired.
    let detached = CallContext::detached();
    let slow = set.call("fx", "slow", arguments(json!({"ms": 30000})), &detached);
    tokio::select! {
        outcome = slow => panic!("the slow call ended: {outcome:?}"),
        () = wait_for_fixture_call(&call_log, "slow", "call") => {}
    }
    wait_for_fixture_call(&call_log, "slow", "cancelled").await;
    // Had the dropped call stayed in flight, this request could not be attributed
    // over stdio and would be refused.
    let answered =
        result_of(send_call(&alice, "fx__ask", json!({"question": "mine?"})).await).await;
    assert_eq!(
        text_of(&answered),
        "client said: still mine",
        "{answered:?}"
    );
    assert_eq!(alice_seen.sampled.lock().unwrap().len(), 1);
    drop(alice);
    set.shutdown().await;
}
