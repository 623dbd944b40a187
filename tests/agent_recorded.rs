//! What small local models really sent (Qwen2.5-Coder 1.5B and 0.5B under
//! llama-server), replayed through a mock HTTP server in the OpenAI, Gemini and
//! Anthropic wire formats, driving the full agent loop against a real
//! in-process Proxi server. Each test pins down one defect the recorded runs showed.

mod common;

use std::time::Duration;

use serde_json::{Value, json};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use common::{Replay, TestServer};
use proxi::agent::backend::{Decision, RestBackend};
use proxi::agent::genai_provider::{GenaiSettings, ProviderKind};
use proxi::agent::provider::LlmProvider;
use proxi::agent::select::build_provider;
use proxi::agent::{
    ALREADY_DENIED, ALREADY_DONE, ALREADY_FAILED, Agent, AgentConfig, AgentError,
    EMPTY_REPLY_PROMPT, EXIT_UNVERIFIED, RetryPolicy, RunOutcome, RunRecord, WRITTEN_CALL_PROMPT,
};
use proxi::reason::Reason;

/// One tool call as the model wrote it: id (if any), name, arguments as sent on the wire.
type Call<'a> = (Option<&'a str>, &'a str, Value);

/// A provider's wire format, as the mock model server speaks it.
trait Wire {
    const KIND: ProviderKind;
    const BASE_PATH: &'static str;
    fn text(text: &str) -> Value;
    /// `arguments` is what goes on the wire: OpenAI carries a string, the others
    /// normally an object (a string there replays a model that sent one anyway).
    fn calls(calls: &[Call<'_>]) -> Value;
    fn empty() -> Value;
    /// Arguments text as this format carries it.
    fn raw_arguments(text: &str) -> Value {
        Value::String(text.to_owned())
    }
    /// Ids this format pairs results with, from a request body.
    fn result_ids(body: &Value) -> Vec<String>;
}

struct OpenAi;

impl Wire for OpenAi {
    const KIND: ProviderKind = ProviderKind::OpenAi;
    const BASE_PATH: &'static str = "/v1/";

    fn text(text: &str) -> Value {
        json!({"id": "chatcmpl-1", "object": "chat.completion", "model": "qwen",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]})
    }

    fn calls(calls: &[Call<'_>]) -> Value {
        let calls: Vec<Value> = calls
            .iter()
            .map(|(id, name, arguments)| {
                let arguments = match arguments {
                    Value::String(_) => arguments.clone(),
                    other => Value::String(other.to_string()),
                };
                let mut call =
                    json!({"type": "function", "function": {"name": name, "arguments": arguments}});
                if let Some(id) = id {
                    call["id"] = json!(id);
                }
                call
            })
            .collect();
        json!({"id": "chatcmpl-2", "object": "chat.completion", "model": "qwen",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "tool_calls": calls}, "finish_reason": "tool_calls"}]})
    }

    fn empty() -> Value {
        json!({"id": "chatcmpl-3", "object": "chat.completion", "model": "qwen",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": ""}, "finish_reason": "stop"}]})
    }

    fn result_ids(body: &Value) -> Vec<String> {
        body["messages"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|message| message["role"] == "tool")
            .map(|message| message["tool_call_id"].as_str().unwrap().to_owned())
            .collect()
    }
}

struct Gemini;

impl Wire for Gemini {
    const KIND: ProviderKind = ProviderKind::Gemini;
    const BASE_PATH: &'static str = "/v1beta/";

    fn text(text: &str) -> Value {
        json!({"candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP", "index": 0}]})
    }

    fn calls(calls: &[Call<'_>]) -> Value {
        let parts: Vec<Value> = calls
            .iter()
            .map(|(_, name, arguments)| json!({"functionCall": {"name": name, "args": arguments}}))
            .collect();
        json!({"candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": "STOP", "index": 0}]})
    }

    fn empty() -> Value {
        json!({"candidates": [{"content": {"role": "model", "parts": []}, "finishReason": "STOP", "index": 0}]})
    }

    fn result_ids(body: &Value) -> Vec<String> {
        // Gemini pairs results by name; there are no ids on the wire.
        body["contents"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|content| content["parts"].as_array().cloned().unwrap_or_default())
            .filter_map(|part| part["functionResponse"]["name"].as_str().map(str::to_owned))
            .collect()
    }
}

struct Anthropic;

impl Wire for Anthropic {
    const KIND: ProviderKind = ProviderKind::Anthropic;
    const BASE_PATH: &'static str = "/v1/";

    fn text(text: &str) -> Value {
        json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "claude",
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
            "usage": {"input_tokens": 1, "output_tokens": 1}})
    }

    fn calls(calls: &[Call<'_>]) -> Value {
        // Anthropic always sends an id; a missing one is replayed as an empty one.
        let content: Vec<Value> = calls
            .iter()
            .map(|(id, name, input)| {
                json!({"type": "tool_use", "id": id.unwrap_or(""), "name": name, "input": input})
            })
            .collect();
        json!({"id": "msg_2", "type": "message", "role": "assistant", "model": "claude",
            "content": content, "stop_reason": "tool_use",
            "usage": {"input_tokens": 1, "output_tokens": 1}})
    }

    fn empty() -> Value {
        json!({"id": "msg_3", "type": "message", "role": "assistant", "model": "claude",
            "content": [], "stop_reason": "end_turn", "usage": {"input_tokens": 1, "output_tokens": 0}})
    }

    fn result_ids(body: &Value) -> Vec<String> {
        body["messages"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|message| match &message["content"] {
                Value::Array(blocks) => blocks.clone(),
                _ => Vec::new(),
            })
            .filter(|block| block["type"] == "tool_result")
            .map(|block| block["tool_use_id"].as_str().unwrap().to_owned())
            .collect()
    }
}

/// A model that replays `turns`, in `W`'s format.
async fn model<W: Wire>(turns: Vec<Value>) -> (MockServer, Box<dyn LlmProvider>) {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(Replay::new(turns))
        .mount(&server)
        .await;
    let mut settings = GenaiSettings::new(W::KIND);
    settings.api_key = Some("test-key".to_owned());
    settings.base_url = Some(format!("{}{}", server.uri(), W::BASE_PATH));
    settings.timeout = Duration::from_secs(10);
    let (provider, _) = build_provider(settings).expect("provider builds");
    (server, provider)
}

async fn run(provider: &dyn LlmProvider, server: &TestServer, task: &str) -> RunRecord {
    let backend = RestBackend::new(server.agent.clone());
    Agent::new(provider, &backend)
        .with_config(AgentConfig {
            retry: RetryPolicy::immediate(1),
            ..AgentConfig::default()
        })
        .run(task)
        .await
        .expect("the run finishes")
}

async fn bodies(server: &MockServer) -> Vec<Value> {
    server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .map(|request| serde_json::from_slice(&request.body).unwrap())
        .collect()
}

/// Defect 1: truncated JSON arguments used to end the run with a bare serde error.
async fn truncated_arguments_are_a_rejected_audited_call<W: Wire>() {
    let server = TestServer::start().await;
    server.emergency().await;
    let raw = r#"{"service_name": "web-"#;
    let (llm, provider) = model::<W>(vec![
        W::calls(&[(Some("c1"), "restart_service", W::raw_arguments(raw))]),
        W::text("❌ My arguments were not valid JSON, so nothing ran."),
    ])
    .await;
    let record = run(provider.as_ref(), &server, "Restart the web server").await;
    assert_eq!(record.outcome, RunOutcome::Answered, "{record:#?}");
    let calls: Vec<_> = record.tool_calls().collect();
    assert_eq!(calls.len(), 1);
    assert!(calls[0].forwarded);
    assert_eq!(calls[0].decision, Decision::Rejected);
    assert_eq!(
        calls[0].reason_code.as_deref(),
        Some(Reason::InvalidArguments.as_str())
    );
    assert!(calls[0].message.as_deref().unwrap().starts_with("not JSON"));
    // Audited as such, with the text the model sent.
    let audit = server.tool_calls().await;
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].decision, "rejected");
    assert_eq!(
        audit[0].reason_code.as_deref(),
        Some(Reason::InvalidArguments.as_str())
    );
    // A rejected call's record keeps a digest whose prefix is the text itself.
    assert_eq!(
        audit[0].arguments,
        Some(proxi::audit::json_digest(&json!(raw)))
    );
    // The model was told why.
    let second = bodies(&llm).await[1].to_string();
    assert!(second.contains("not JSON"), "{second}");
    assert!(
        second.contains(Reason::InvalidArguments.as_str()),
        "{second}"
    );
}

/// Defect 1: `""` (sent for tools without arguments) counts as `{}`.
async fn empty_string_arguments_mean_none<W: Wire>() {
    let server = TestServer::start().await;
    let (_llm, provider) = model::<W>(vec![
        W::calls(&[(Some("c1"), "list_services", json!(""))]),
        W::text("All four services are healthy."),
    ])
    .await;
    let record = run(provider.as_ref(), &server, "Check the services").await;
    let calls: Vec<_> = record.tool_calls().collect();
    assert_eq!(calls[0].arguments, json!({}));
    assert_eq!(calls[0].decision, Decision::Allowed);
    assert_eq!(record.outcome, RunOutcome::Answered);
}

/// Defect 1: a call without an id gets one, and its result is paired with it.
async fn a_missing_id_is_generated<W: Wire>() {
    let server = TestServer::start().await;
    let (llm, provider) = model::<W>(vec![
        W::calls(&[
            (None, "list_services", json!({})),
            (None, "read_logs", json!({})),
        ]),
        W::text("Everything is healthy."),
    ])
    .await;
    let record = run(provider.as_ref(), &server, "Check the services").await;
    let ids: Vec<&str> = record
        .tool_calls()
        .map(|call| call.call_id.as_str())
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.iter().all(|id| !id.is_empty()));
    assert_ne!(ids[0], ids[1]);
    let paired = W::result_ids(&bodies(&llm).await[1]);
    assert_eq!(paired.len(), 2, "both results went back");
    if W::KIND != ProviderKind::Gemini {
        assert_eq!(paired, ids);
    }
}

/// Defect 1: an empty reply gets one re-prompt; a second one ends the run clearly.
async fn an_empty_reply_gets_one_reprompt<W: Wire>() {
    let server = TestServer::start().await;
    let (llm, provider) = model::<W>(vec![W::empty(), W::text("All services are healthy.")]).await;
    let record = run(provider.as_ref(), &server, "Check the services").await;
    assert_eq!(record.outcome, RunOutcome::Answered);
    assert_eq!(record.final_answer, "All services are healthy.");
    let second = bodies(&llm).await[1].to_string();
    assert!(second.contains(EMPTY_REPLY_PROMPT), "{second}");

    let (llm, provider) = model::<W>(vec![W::empty()]).await;
    let backend = RestBackend::new(server.agent.clone());
    let failure = Agent::new(provider.as_ref(), &backend)
        .run("Check the services")
        .await
        .unwrap_err();
    assert!(
        matches!(failure.error, AgentError::EmptyReply { step: 2 }),
        "{failure}"
    );
    assert_eq!(llm.received_requests().await.unwrap().len(), 2);
}

/// Defect 2: the model repeats a denied call until the step limit; the run now
/// stops at the first repeat and answers with the server's denial.
async fn a_repeated_denial_stops_with_the_denial<W: Wire>() {
    let server = TestServer::start().await;
    let (llm, provider) = model::<W>(vec![W::calls(&[(
        Some("c1"),
        "restart_service",
        json!({"service_name": "web-server"}),
    )])])
    .await;
    let record = run(provider.as_ref(), &server, "Restart the web server").await;
    assert_eq!(record.outcome, RunOutcome::Refused);
    // One turn after the denial, not six.
    assert_eq!(llm.received_requests().await.unwrap().len(), 2);
    assert_eq!(server.tool_calls().await.len(), 1);
    let calls: Vec<_> = record.tool_calls().collect();
    assert_eq!(calls[1].reason_code.as_deref(), Some(ALREADY_DENIED));
    let answer = &record.final_answer;
    assert!(answer.contains(Reason::BlockedInMode.as_str()), "{answer}");
    assert!(answer.contains("in NORMAL mode"), "{answer}");
    assert!(answer.contains("How to proceed:"), "{answer}");
    assert!(answer.contains("EMERGENCY"), "{answer}");
    assert!(
        answer.contains("Calls sent to the server: restart_service (denied)."),
        "{answer}"
    );
    assert!(!answer.contains("×"), "{answer}");
}

/// Defect 3: `unknown_service` was sent and audited eight times.
async fn a_repeated_deterministic_failure_is_not_resent<W: Wire>() {
    let server = TestServer::start().await;
    server.emergency().await;
    let (llm, provider) = model::<W>(vec![W::calls(&[(
        Some("c1"),
        "restart_service",
        json!({"service_name": "payment-service"}),
    )])])
    .await;
    let record = run(provider.as_ref(), &server, "Restart the payment-service").await;
    assert_eq!(record.outcome, RunOutcome::Refused);
    assert_eq!(server.tool_calls().await.len(), 1, "sent and audited once");
    let calls: Vec<_> = record.tool_calls().collect();
    assert_eq!(calls.len(), 3);
    assert!(calls[1..].iter().all(|call| !call.forwarded));
    assert_eq!(calls[1].reason_code.as_deref(), Some(ALREADY_FAILED));
    let message = calls[1].message.as_deref().unwrap();
    assert!(
        message.contains(Reason::UnknownService.as_str()),
        "{message}"
    );
    // The model was told once why the call was not sent again; asking yet again ended the run.
    let requests = bodies(&llm).await;
    assert_eq!(requests.len(), 3);
    let told = requests[2].to_string();
    assert!(told.contains(ALREADY_FAILED), "{told}");
    assert!(told.contains("did not send it again"), "{told}");
    let answer = &record.final_answer;
    assert!(answer.contains(Reason::UnknownService.as_str()), "{answer}");
}

/// Seen in the by-hand run after the fixes: the 1.5B model restarted a healthy
/// web-server eight times. An identical successful active call is not sent again;
/// the model is told once, and a further repeat ends the run with what ran.
async fn a_repeated_successful_action_is_not_resent<W: Wire>() {
    let server = TestServer::start().await;
    server.emergency().await;
    server.incident("web-server", "critical").await;
    let (llm, provider) = model::<W>(vec![W::calls(&[(
        Some("c1"),
        "restart_service",
        json!({"service_name": "web-server"}),
    )])])
    .await;
    let record = run(
        provider.as_ref(),
        &server,
        "Fix the critical web server issue",
    )
    .await;
    assert_eq!(server.tool_calls().await.len(), 1, "restarted once");
    let requests = bodies(&llm).await;
    assert_eq!(requests.len(), 3);
    assert!(requests[2].to_string().contains(ALREADY_DONE));
    let calls: Vec<_> = record.tool_calls().collect();
    assert_eq!(calls.len(), 3);
    assert_eq!(calls[1].reason_code.as_deref(), Some(ALREADY_DONE));
    assert!(!calls[1].forwarded);
    assert_eq!(record.outcome, RunOutcome::Answered);
    let answer = &record.final_answer;
    assert!(
        answer
            .contains("✓ restart_service {\"service_name\":\"web-server\"} ran in EMERGENCY mode"),
        "{answer}"
    );
    assert!(record.is_verified(), "{:?}", record.unverified_claims);
    assert_eq!(record.exit_code(), 0);
}

/// Defect 4: the 0.5B model wrote its calls as JSON text.
async fn a_call_written_as_json_text_is_run<W: Wire>() {
    let server = TestServer::start().await;
    let (_llm, provider) = model::<W>(vec![
        W::text("```json\n{\"name\": \"restart_service\", \"arguments\": {\"service_name\": \"web-server\"}}\n```"),
        W::text("❌ restart_service was blocked in NORMAL mode."),
    ])
    .await;
    let record = run(provider.as_ref(), &server, "Restart the web server").await;
    let calls: Vec<_> = record.tool_calls().collect();
    assert_eq!(calls.len(), 1);
    assert!(calls[0].from_text);
    assert!(calls[0].forwarded);
    assert_eq!(calls[0].decision, Decision::Denied);
    let audit = server.tool_calls().await;
    assert_eq!(
        audit.len(),
        1,
        "it went through the policy and the audit trail"
    );
    assert_eq!(audit[0].decision, "denied");
    assert_eq!(record.outcome, RunOutcome::Answered);
    assert!(record.is_verified());
}

/// Defect 4: "✅ restart_service(...)" with no call finished with exit 0.
async fn a_claim_without_a_call_is_unverified<W: Wire>() {
    let server = TestServer::start().await;
    server.emergency().await;
    server.incident("web-server", "critical").await;
    let (llm, provider) = model::<W>(vec![W::text(
        "✅ restart_service(service_name=\"web-server\")",
    )])
    .await;
    let record = run(
        provider.as_ref(),
        &server,
        "Fix the critical web server issue",
    )
    .await;
    // One re-prompt to use the tool interface, then the same claim again.
    let requests = bodies(&llm).await;
    assert_eq!(requests.len(), 2);
    assert!(requests[1].to_string().contains(WRITTEN_CALL_PROMPT));
    assert_eq!(record.outcome, RunOutcome::Answered);
    assert!(!record.is_verified());
    assert_eq!(record.unverified_claims.len(), 1);
    assert!(record.final_answer.contains("Unverified"));
    assert_eq!(record.exit_code(), EXIT_UNVERIFIED);
    assert_eq!(server.tool_calls().await.len(), 0);
}

/// Defect 5: the timeout error names the limit and how to raise it.
async fn a_timeout_names_the_limit<W: Wire>() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(W::text("late"))
                .set_delay(Duration::from_secs(30)),
        )
        .mount(&server)
        .await;
    let mut settings = GenaiSettings::new(W::KIND);
    settings.api_key = Some("test-key".to_owned());
    settings.base_url = Some(format!("{}{}", server.uri(), W::BASE_PATH));
    settings.timeout = Duration::from_millis(300);
    let (provider, _) = build_provider(settings).unwrap();
    let messages = vec![proxi::agent::provider::Message::User("x".to_owned())];
    let error = provider
        .complete(proxi::agent::provider::ProviderRequest {
            system: "s",
            messages: &messages,
            tools: &[],
        })
        .await
        .unwrap_err();
    let text = error.to_string();
    assert!(text.contains("model timeout of 0.3 s"), "{text}");
    assert!(text.contains("--model-timeout"), "{text}");
}

macro_rules! recorded {
    ($module:ident, $wire:ty) => {
        mod $module {
            use super::*;

            #[tokio::test]
            async fn truncated_arguments_are_a_rejected_audited_call() {
                super::truncated_arguments_are_a_rejected_audited_call::<$wire>().await;
            }

            #[tokio::test]
            async fn empty_string_arguments_mean_none() {
                super::empty_string_arguments_mean_none::<$wire>().await;
            }

            #[tokio::test]
            async fn a_missing_id_is_generated() {
                super::a_missing_id_is_generated::<$wire>().await;
            }

            #[tokio::test]
            async fn an_empty_reply_gets_one_reprompt() {
                super::an_empty_reply_gets_one_reprompt::<$wire>().await;
            }

            #[tokio::test]
            async fn a_repeated_denial_stops_with_the_denial() {
                super::a_repeated_denial_stops_with_the_denial::<$wire>().await;
            }

            #[tokio::test]
            async fn a_repeated_deterministic_failure_is_not_resent() {
                super::a_repeated_deterministic_failure_is_not_resent::<$wire>().await;
            }

            #[tokio::test]
            async fn a_repeated_successful_action_is_not_resent() {
                super::a_repeated_successful_action_is_not_resent::<$wire>().await;
            }

            #[tokio::test]
            async fn a_call_written_as_json_text_is_run() {
                super::a_call_written_as_json_text_is_run::<$wire>().await;
            }

            #[tokio::test]
            async fn a_claim_without_a_call_is_unverified() {
                super::a_claim_without_a_call_is_unverified::<$wire>().await;
            }

            #[tokio::test]
            async fn a_timeout_names_the_limit() {
                super::a_timeout_names_the_limit::<$wire>().await;
            }
        }
    };
}

recorded!(openai, OpenAi);
recorded!(gemini, Gemini);
recorded!(anthropic, Anthropic);

/// A denial in one mode is sent again once the operator has changed the mode:
/// the guard holds only while the answer cannot change.
#[tokio::test]
async fn a_denied_call_is_sent_again_after_a_mode_change() {
    struct DeclareEmergency<'a>(&'a TestServer);
    impl proxi::agent::AgentObserver for DeclareEmergency<'_> {
        fn after_tool_call<'a>(
            &'a self,
            _step: usize,
            _record: &'a proxi::agent::ToolCallRecord,
        ) -> futures::future::BoxFuture<'a, ()> {
            Box::pin(async move { self.0.emergency().await })
        }
    }
    let server = TestServer::start().await;
    let restart = OpenAi::calls(&[(
        Some("c1"),
        "restart_service",
        json!({"service_name": "web-server"}),
    )]);
    let (_llm, provider) = model::<OpenAi>(vec![
        restart.clone(),
        restart,
        OpenAi::text("✓ Restarted web-server."),
    ])
    .await;
    let backend = RestBackend::new(server.agent.clone());
    let observer = DeclareEmergency(&server);
    let record = Agent::new(provider.as_ref(), &backend)
        .with_observer(&observer)
        .run("Restart the web server")
        .await
        .unwrap();
    let decisions: Vec<Decision> = record.tool_calls().map(|call| call.decision).collect();
    assert_eq!(decisions, [Decision::Denied, Decision::Allowed]);
    assert!(record.tool_calls().all(|call| call.forwarded));
    assert!(record.is_verified(), "{:?}", record.unverified_claims);
    assert_eq!(record.exit_code(), 0);
}
