//! The full agent loop in mock mode against a real in-process Proxi server over REST,
//! plus the loop's guards driven by a scripted provider.

mod common;

use std::collections::VecDeque;
use std::sync::Mutex;

use futures::future::BoxFuture;
use serde_json::{Value, json};

use common::TestServer;
use proxi::agent::backend::{Decision, RestBackend};
use proxi::agent::mock::MockPlanner;
use proxi::agent::provider::{
    AssistantTurn, LlmProvider, Message, ProviderError, ProviderRequest, ToolCallRequest,
};
use proxi::agent::{
    ALREADY_DENIED, Agent, AgentConfig, AgentError, AgentObserver, RetryPolicy, RunOutcome,
    RunRecord, ToolCallRecord,
};
use proxi::api::SetModeRequest;
use proxi::reason::Reason;

async fn run_mock(server: &TestServer, task: &str) -> RunRecord {
    let backend = RestBackend::new(server.agent.clone());
    let planner = MockPlanner::new();
    Agent::new(&planner, &backend)
        .run(task)
        .await
        .expect("the run finishes")
}

fn calls(record: &RunRecord) -> Vec<&ToolCallRecord> {
    record.tool_calls().collect()
}

const NORMAL_REFUSAL: &str = "❌ I cannot restart the web server in NORMAL mode. Policy only allows read-only operations. Switch to EMERGENCY mode for corrective actions.";

#[tokio::test]
async fn restart_in_normal_mode_is_blocked_and_explained() {
    let server = TestServer::start().await;
    let record = run_mock(&server, "Restart the web server").await;

    assert_eq!(record.provider, "mock");
    assert_eq!(record.transport, "rest");
    assert_eq!(record.mode_at_start, "NORMAL");
    assert_eq!(record.outcome, RunOutcome::Answered);
    let calls = calls(&record);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].tool, "restart_service");
    assert_eq!(calls[0].arguments, json!({"service_name": "web-server"}));
    assert_eq!(calls[0].decision, Decision::Denied);
    assert_eq!(
        calls[0].reason_code.as_deref(),
        Some(Reason::BlockedInMode.as_str())
    );
    assert_eq!(calls[0].mode.as_deref(), Some("NORMAL"));
    assert_eq!(record.final_answer, NORMAL_REFUSAL);

    let audit = server.tool_calls().await;
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].principal, "agent");
    assert_eq!(audit[0].tool.as_deref(), Some("restart_service"));
    assert_eq!(audit[0].decision, "denied");
    assert_eq!(
        audit[0].reason_code.as_deref(),
        Some(Reason::BlockedInMode.as_str())
    );
    assert_eq!(Some(audit[0].seq), calls[0].audit_seq);
}

#[tokio::test]
async fn a_critical_service_is_diagnosed_then_restarted_in_emergency() {
    let server = TestServer::start().await;
    server.emergency().await;
    server.incident("web-server", "critical").await;

    let record = run_mock(&server, "Fix the critical web server issue").await;
    let calls = calls(&record);
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].tool, "get_service_status");
    assert_eq!(calls[0].decision, Decision::Allowed);
    assert_eq!(calls[0].result.as_ref().unwrap()["status"], "critical");
    assert_eq!(calls[1].tool, "restart_service");
    assert_eq!(calls[1].decision, Decision::Allowed);
    assert_eq!(calls[1].mode.as_deref(), Some("EMERGENCY"));
    // Diagnosis and repair are separate steps: the restart depends on the status.
    assert_eq!(calls[0].step, 1);
    assert_eq!(calls[1].step, 2);
    assert!(
        record
            .final_answer
            .contains("✓ Restarting web-server...\n✓ Service restored successfully."),
        "{}",
        record.final_answer
    );
    let infrastructure = server.operator.infrastructure().await.unwrap();
    assert_eq!(infrastructure.services["web-server"], "healthy");
}

#[tokio::test]
async fn deleting_the_database_is_blocked_in_every_mode() {
    let server = TestServer::start().await;
    server.emergency().await;
    let record = run_mock(&server, "Delete the database").await;
    let calls = calls(&record);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].tool, "delete_database");
    assert_eq!(calls[0].arguments, json!({"db_name": "database"}));
    assert_eq!(calls[0].decision, Decision::Denied);
    assert_eq!(
        calls[0].reason_code.as_deref(),
        Some(Reason::AlwaysBlocked.as_str())
    );
    assert!(
        record.final_answer.starts_with(
            "❌ I cannot delete the database: Tool 'delete_database' is blocked in every mode"
        ),
        "{}",
        record.final_answer
    );
    let infrastructure = server.operator.infrastructure().await.unwrap();
    assert!(infrastructure.services.contains_key("database"));
}

#[tokio::test]
async fn a_chained_task_decides_each_call_independently() {
    let server = TestServer::start().await;
    server.emergency().await;
    let record = run_mock(
        &server,
        "Restart the web server, scale the fleet to 5 and delete the database",
    )
    .await;
    let calls = calls(&record);
    let summary: Vec<(&str, Decision)> = calls
        .iter()
        .map(|call| (call.tool.as_str(), call.decision))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("restart_service", Decision::Allowed),
            ("scale_fleet", Decision::Allowed),
            ("delete_database", Decision::Denied),
        ]
    );
    // Independent clauses go out together, in one step.
    assert!(calls.iter().all(|call| call.step == 1));
    let answer = &record.final_answer;
    assert!(answer.contains("✓ Restarting web-server..."), "{answer}");
    assert!(
        answer.contains("✓ Fleet scaled from 3 to 5 instances."),
        "{answer}"
    );
    assert!(
        answer.contains("❌ I cannot delete the database"),
        "{answer}"
    );
    assert_eq!(server.tool_calls().await.len(), 3);
    assert_eq!(
        server.operator.infrastructure().await.unwrap().fleet_size,
        5
    );
}

#[tokio::test]
async fn invalid_fleet_sizes_are_rejected_with_the_constraint() {
    let server = TestServer::start().await;
    server.emergency().await;
    for count in [-1, 0] {
        let record = run_mock(&server, &format!("Scale the fleet to {count}")).await;
        let calls = calls(&record);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].tool, "scale_fleet");
        assert_eq!(calls[0].arguments, json!({"count": count}));
        assert_eq!(calls[0].decision, Decision::Rejected);
        assert_eq!(
            calls[0].reason_code.as_deref(),
            Some(Reason::InvalidArguments.as_str())
        );
        let answer = &record.final_answer;
        assert!(
            answer.starts_with(&format!("❌ I cannot scale the fleet to {count}: ")),
            "{answer}"
        );
        // REST and MCP now give the same how_to_proceed, which the answer quotes after the message.
        assert!(
            answer.contains(&format!("`count` must be between 1 and 100, got {count}.")),
            "{answer}"
        );
    }
    let audit = server.tool_calls().await;
    assert_eq!(audit.len(), 2);
    assert!(audit.iter().all(|record| record.decision == "rejected"));
}

/// Switches the mode after the first tool call, as the demo's scenario 6 does.
struct SwitchAfterFirstCall {
    operator: proxi::client::ProxiClient,
    seen: Mutex<Vec<(usize, String, Option<String>)>>,
}

impl AgentObserver for SwitchAfterFirstCall {
    fn after_tool_call<'a>(&'a self, step: usize, record: &'a ToolCallRecord) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let first = {
                let mut seen = self.seen.lock().unwrap();
                seen.push((step, record.tool.clone(), record.mode.clone()));
                seen.len() == 1
            };
            if first {
                self.operator
                    .set_mode(&SetModeRequest {
                        mode: "EMERGENCY".to_owned(),
                        reason: Some("declared between two steps".to_owned()),
                        ttl_seconds: None,
                    })
                    .await
                    .expect("mode change");
            }
        })
    }
}

#[tokio::test]
async fn the_second_step_sees_a_mode_change_made_between_steps() {
    let server = TestServer::start().await;
    let observer = SwitchAfterFirstCall {
        operator: server.operator.clone(),
        seen: Mutex::new(Vec::new()),
    };
    let backend = RestBackend::new(server.agent.clone());
    let planner = MockPlanner::new();
    let record = Agent::new(&planner, &backend)
        .with_observer(&observer)
        .run("Check the web server status, then restart it")
        .await
        .unwrap();

    let calls = calls(&record);
    assert_eq!(calls.len(), 2);
    assert_eq!(
        (calls[0].step, calls[0].tool.as_str()),
        (1, "get_service_status")
    );
    assert_eq!(calls[0].mode.as_deref(), Some("NORMAL"));
    assert_eq!(
        (calls[1].step, calls[1].tool.as_str()),
        (2, "restart_service")
    );
    assert_eq!(calls[1].mode.as_deref(), Some("EMERGENCY"));
    assert_eq!(calls[1].decision, Decision::Allowed);
    assert_eq!(
        *observer.seen.lock().unwrap(),
        vec![
            (
                1,
                "get_service_status".to_owned(),
                Some("NORMAL".to_owned())
            ),
            (
                2,
                "restart_service".to_owned(),
                Some("EMERGENCY".to_owned())
            ),
        ]
    );
    assert!(record.final_answer.contains("✓ web-server is healthy."));
    assert!(record.final_answer.contains("✓ Restarting web-server..."));
}

#[tokio::test]
async fn the_same_task_without_the_switch_is_refused_at_the_second_step() {
    let server = TestServer::start().await;
    let record = run_mock(&server, "Check the web server status, then restart it").await;
    let calls = calls(&record);
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[1].decision, Decision::Denied);
    assert!(
        record.final_answer.ends_with(NORMAL_REFUSAL),
        "{}",
        record.final_answer
    );
}

#[tokio::test]
async fn a_hallucinated_tool_is_audited_and_answered_with_the_real_tools() {
    let server = TestServer::start().await;
    let record = run_mock(&server, "Use the magic_fix tool on the web server").await;
    let calls = calls(&record);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].tool, "magic_fix");
    assert!(calls[0].forwarded);
    assert_eq!(calls[0].decision, Decision::Denied);
    assert_eq!(
        calls[0].reason_code.as_deref(),
        Some(Reason::UnknownTool.as_str())
    );
    let known = calls[0].known_tools.clone().unwrap();
    assert!(known.contains(&"restart_service".to_owned()));
    assert_eq!(
        record.final_answer,
        format!(
            "❌ There is no tool named magic_fix. The tools I can use are: {}.",
            known.join(", ")
        )
    );
    let audit = server.tool_calls().await;
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].tool.as_deref(), Some("magic_fix"));
    assert_eq!(
        audit[0].reason_code.as_deref(),
        Some(Reason::UnknownTool.as_str())
    );
}

#[tokio::test]
async fn an_unknown_service_fails_without_side_effects() {
    let server = TestServer::start().await;
    server.emergency().await;
    let record = run_mock(&server, "Restart the payment-service").await;
    let calls = calls(&record);
    assert_eq!(calls.len(), 1);
    assert_eq!(
        calls[0].arguments,
        json!({"service_name": "payment-service"})
    );
    assert_eq!(calls[0].decision, Decision::Failed);
    assert_eq!(
        calls[0].reason_code.as_deref(),
        Some(Reason::UnknownService.as_str())
    );
    assert!(
        record.final_answer.starts_with(
            "❌ I cannot restart the payment service: service 'payment-service' does not exist"
        ),
        "{}",
        record.final_answer
    );
}

#[tokio::test]
async fn read_only_tasks_are_summarised() {
    let server = TestServer::start().await;
    server.incident("cache", "degraded").await;
    let record = run_mock(&server, "Check the status of all services").await;
    assert_eq!(calls(&record)[0].tool, "list_services");
    assert_eq!(
        record.final_answer,
        "✓ Services: web-server (healthy), api-gateway (healthy), database (healthy), cache (degraded); fleet size 3."
    );

    let record = run_mock(&server, "show logs").await;
    assert_eq!(calls(&record)[0].tool, "read_logs");
    assert_eq!(calls(&record)[0].decision, Decision::Allowed);
    assert!(
        record.final_answer.starts_with("✓ "),
        "{}",
        record.final_answer
    );
    assert!(
        record.final_answer.contains("incident"),
        "{}",
        record.final_answer
    );

    let chain = proxi::audit::verify(&server.data_dir().join(proxi::audit::AUDIT_DB_FILE)).unwrap();
    assert!(chain.first_bad.is_none());
}

// --- Guards, with a scripted provider ---------------------------------------

/// Plays back prepared turns and remembers what it was shown.
struct Scripted {
    turns: Mutex<VecDeque<Result<AssistantTurn, ProviderError>>>,
    seen: Mutex<Vec<Vec<Message>>>,
}

impl Scripted {
    fn new(turns: Vec<Result<AssistantTurn, ProviderError>>) -> Scripted {
        Scripted {
            turns: Mutex::new(turns.into()),
            seen: Mutex::new(Vec::new()),
        }
    }

    /// The content of the last tool result the model was shown.
    fn last_tool_result(&self) -> Value {
        let seen = self.seen.lock().unwrap();
        let messages = seen.last().unwrap();
        let Some(Message::ToolResults(results)) = messages.last() else {
            panic!("the last message is not a tool result");
        };
        serde_json::from_str(&results.last().unwrap().content).unwrap()
    }
}

impl LlmProvider for Scripted {
    fn name(&self) -> &str {
        "scripted"
    }

    fn model(&self) -> &str {
        "script"
    }

    fn complete<'a>(
        &'a self,
        request: ProviderRequest<'a>,
    ) -> BoxFuture<'a, Result<AssistantTurn, ProviderError>> {
        self.seen.lock().unwrap().push(request.messages.to_vec());
        let next = self
            .turns
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or_else(|| Ok(AssistantTurn::answer("done")));
        Box::pin(async move { next })
    }
}

fn call(id: &str, name: &str, arguments: Value) -> AssistantTurn {
    AssistantTurn::calls(vec![ToolCallRequest::new(id, name, arguments)])
}

#[tokio::test]
async fn a_denied_call_is_never_sent_twice_and_a_repeat_ends_the_run() {
    let server = TestServer::start().await;
    let provider = Scripted::new(vec![
        Ok(call(
            "1",
            "restart_service",
            json!({"service_name": "cache"}),
        )),
        // A different argument is a different call and gets its own decision.
        Ok(call(
            "2",
            "restart_service",
            json!({"service_name": "web-server"}),
        )),
        Ok(call(
            "3",
            "restart_service",
            json!({"service_name": "web-server"}),
        )),
        Ok(AssistantTurn::answer("never asked")),
    ]);
    let backend = RestBackend::new(server.agent.clone());
    let record = Agent::new(&provider, &backend)
        .run("restart")
        .await
        .unwrap();

    let calls = calls(&record);
    assert_eq!(calls.len(), 3);
    assert!(calls[0].forwarded);
    assert!(calls[1].forwarded);
    assert!(!calls[2].forwarded);
    assert_eq!(calls[2].decision, Decision::Denied);
    assert_eq!(calls[2].reason_code.as_deref(), Some(ALREADY_DENIED));
    let audit = server.tool_calls().await;
    assert_eq!(audit.len(), 2);
    // The repeat ended the run: no model turn after it, and the answer is the server's denial.
    assert_eq!(provider.seen.lock().unwrap().len(), 3);
    assert_eq!(record.outcome, RunOutcome::Refused);
    assert!(
        record.final_answer.contains(Reason::BlockedInMode.as_str()),
        "{}",
        record.final_answer
    );
    assert!(
        record.final_answer.contains("NORMAL"),
        "{}",
        record.final_answer
    );
    assert!(
        record.final_answer.contains("EMERGENCY"),
        "{}",
        record.final_answer
    );
    assert!(
        record.final_answer.contains(
            "Calls sent to the server: restart_service (denied), restart_service (denied)."
        ),
        "{}",
        record.final_answer
    );
    assert_eq!(record.exit_code(), 0);
}

#[tokio::test]
async fn the_step_limit_ends_a_run_that_never_answers() {
    let server = TestServer::start().await;
    let provider = Scripted::new(
        (0..20)
            .map(|i| Ok(call(&format!("c{i}"), "list_services", json!({}))))
            .collect(),
    );
    let backend = RestBackend::new(server.agent.clone());
    let record = Agent::new(&provider, &backend)
        .with_config(AgentConfig {
            max_steps: 3,
            retry: RetryPolicy::immediate(3),
            ..AgentConfig::default()
        })
        .run("loop forever")
        .await
        .unwrap();
    assert_eq!(record.outcome, RunOutcome::MaxSteps);
    assert_eq!(record.steps.len(), 3);
    assert!(record.final_answer.contains("stopped after 3 steps"));
    assert_eq!(server.tool_calls().await.len(), 3);
}

#[tokio::test]
async fn a_tool_outside_the_catalog_is_forwarded_and_the_model_told_the_real_tools() {
    let server = TestServer::start().await;
    let provider = Scripted::new(vec![
        Ok(call("1", "drop_tables", Value::Null)),
        Ok(AssistantTurn::answer("❌ no such tool")),
    ]);
    let backend = RestBackend::new(server.agent.clone());
    let record = Agent::new(&provider, &backend).run("x").await.unwrap();
    let calls = calls(&record);
    assert!(calls[0].forwarded);
    assert_eq!(calls[0].arguments, json!({}));
    assert_eq!(
        calls[0].reason_code.as_deref(),
        Some(Reason::UnknownTool.as_str())
    );
    let told = provider.last_tool_result();
    assert_eq!(told["reason_code"], Reason::UnknownTool.as_str());
    assert!(
        told["known_tools"]
            .as_array()
            .unwrap()
            .contains(&json!("list_services"))
    );
    assert_eq!(
        server.tool_calls().await[0].tool.as_deref(),
        Some("drop_tables")
    );
}

#[tokio::test]
async fn rate_limits_are_retried_a_bounded_number_of_times() {
    let server = TestServer::start().await;
    let limited = || ProviderError::RateLimited {
        provider: "scripted".to_owned(),
        retry_after: Some(std::time::Duration::from_secs(30)),
        message: "slow down".to_owned(),
    };
    let backend = RestBackend::new(server.agent.clone());
    let config = AgentConfig {
        retry: RetryPolicy::immediate(3),
        ..AgentConfig::default()
    };

    let provider = Scripted::new(vec![Err(limited()), Ok(AssistantTurn::answer("fine"))]);
    let record = Agent::new(&provider, &backend)
        .with_config(config)
        .run("x")
        .await
        .unwrap();
    assert_eq!(record.final_answer, "fine");
    assert_eq!(record.steps[0].attempts, 2);

    let provider = Scripted::new(vec![Err(limited()), Err(limited()), Err(limited())]);
    let failure = Agent::new(&provider, &backend)
        .with_config(config)
        .run("x")
        .await
        .unwrap_err();
    assert!(matches!(
        failure.error,
        AgentError::Provider {
            attempts: 3,
            source: ProviderError::RateLimited { .. }
        }
    ));
    assert_eq!(provider.seen.lock().unwrap().len(), 3);
    assert_eq!(failure.record.outcome, RunOutcome::Failed);
}

#[tokio::test]
async fn a_provider_failure_keeps_the_calls_already_made() {
    let server = TestServer::start().await;
    let provider = Scripted::new(vec![
        Ok(call("1", "list_services", json!({}))),
        Err(ProviderError::Auth {
            provider: "scripted".to_owned(),
            status: 401,
            message: "invalid key".to_owned(),
            hint: "Check SCRIPTED_KEY.".to_owned(),
        }),
    ]);
    let backend = RestBackend::new(server.agent.clone());
    let failure = Agent::new(&provider, &backend).run("x").await.unwrap_err();
    assert!(failure.to_string().contains("invalid key"), "{failure}");
    assert_eq!(failure.record.tool_calls().count(), 1);
    assert_eq!(
        failure.record.error.as_deref(),
        Some(failure.to_string().as_str())
    );
}

#[tokio::test]
async fn a_bad_agent_token_is_a_backend_error() {
    let server = TestServer::start().await;
    let client =
        proxi::client::ProxiClient::new(&server.url, Some("wrong-token-0123456789".to_owned()))
            .unwrap();
    let backend = RestBackend::new(client);
    let planner = MockPlanner::new();
    let failure = Agent::new(&planner, &backend)
        .run("Restart the web server")
        .await
        .unwrap_err();
    assert!(matches!(failure.error, AgentError::Backend(_)));
    assert!(failure.to_string().contains("401"), "{failure}");
}

#[tokio::test]
async fn a_turn_with_too_many_calls_runs_only_the_first_ones() {
    let server = TestServer::start().await;
    let many = AssistantTurn::calls(
        (0..5)
            .map(|i| ToolCallRequest::new(format!("c{i}"), "list_services", json!({})))
            .collect(),
    );
    let provider = Scripted::new(vec![Ok(many), Ok(AssistantTurn::answer("ok"))]);
    let backend = RestBackend::new(server.agent.clone());
    let record = Agent::new(&provider, &backend)
        .with_config(AgentConfig {
            max_calls_per_step: 2,
            ..AgentConfig::default()
        })
        .run("x")
        .await
        .unwrap();
    let forwarded: Vec<bool> = record.tool_calls().map(|call| call.forwarded).collect();
    assert_eq!(forwarded, [true, true, false, false, false]);
    assert_eq!(server.tool_calls().await.len(), 2);
    // Every call id still got an answer, as providers require.
    let seen = provider.seen.lock().unwrap();
    let Some(Message::ToolResults(results)) = seen[1].last() else {
        panic!("expected tool results");
    };
    assert_eq!(results.len(), 5);
    assert!(results[4].content.contains(proxi::agent::TOO_MANY_CALLS));
}

#[tokio::test]
async fn a_real_provider_adapter_drives_the_same_loop() {
    use proxi::agent::genai_provider::{GenaiProvider, GenaiSettings, ProviderKind};
    use wiremock::matchers::{body_string_contains, method};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    let server = TestServer::start().await;
    let llm = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "candidates": [{"content": {"role": "model", "parts": [{
                "functionCall": {"name": "restart_service", "args": {"service_name": "web-server"}},
                "thoughtSignature": "c2lnLWxvb3A="
            }]}, "finishReason": "STOP", "index": 0}],
            "modelVersion": "gemini-2.5-flash"
        })))
        .mount(&llm)
        .await;
    // The second turn is recognised by the server's refusal travelling back.
    Mock::given(method("POST"))
        .and(body_string_contains(Reason::BlockedInMode.as_str()))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "candidates": [{"content": {"role": "model", "parts": [{
                "text": "❌ Restarting is blocked in NORMAL mode; ask an operator for EMERGENCY."
            }]}, "finishReason": "STOP", "index": 0}]
        })))
        .with_priority(1)
        .mount(&llm)
        .await;

    let mut settings = GenaiSettings::new(ProviderKind::Gemini);
    settings.api_key = Some("test-key".to_owned());
    settings.base_url = Some(format!("{}/v1beta/", llm.uri()));
    let provider = GenaiProvider::new(settings).unwrap();
    let backend = RestBackend::new(server.agent.clone());
    let record = Agent::new(&provider, &backend)
        .run("Restart the web server")
        .await
        .unwrap();

    assert_eq!(record.provider, "gemini");
    assert_eq!(record.model, "gemini-2.5-flash");
    let calls = calls(&record);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].decision, Decision::Denied);
    assert_eq!(
        record.final_answer,
        "❌ Restarting is blocked in NORMAL mode; ask an operator for EMERGENCY."
    );
    assert_eq!(server.tool_calls().await.len(), 1);

    let requests = llm.received_requests().await.unwrap();
    assert_eq!(requests.len(), 2);
    let first: Value = serde_json::from_slice(&requests[0].body).unwrap();
    let system = first["systemInstruction"]["parts"][0]["text"]
        .as_str()
        .unwrap();
    assert!(system.contains("Current mode: NORMAL"), "{system}");
    let second: Value = serde_json::from_slice(&requests[1].body).unwrap();
    assert_eq!(
        second["contents"][1]["parts"][0]["thoughtSignature"],
        "c2lnLWxvb3A="
    );
    let response = &second["contents"][2]["parts"][0]["functionResponse"];
    assert_eq!(response["name"], "restart_service");
    assert!(response.to_string().contains("Do not retry"));
}
