//! Each genai-backed provider against a local mock HTTP server speaking that
//! provider's real wire format: a plain answer, one tool call, parallel tool
//! calls, a tool-result round trip, and 401 / 429 / 500 errors. No key, no internet.

use std::time::Duration;

use serde_json::{Value, json};
use wiremock::matchers::{body_string_contains, method, path};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

use proxi::agent::genai_provider::{GenaiSettings, ProviderKind};
use proxi::agent::provider::{
    AssistantTurn, LlmProvider, Message, ProviderError, ProviderRequest, ToolResult, ToolSpec,
};
use proxi::agent::select::build_provider;
use proxi::agent::{AgentError, RetryPolicy, complete_with_retry};
use proxi::tools::ToolName;

const KEY: &str = "test-key-not-real";
const SYSTEM: &str = "You are Proxi's SRE agent.";
const TASK: &str = "Restart the web server";
/// Appears only in the tool result, so the second request of a round trip can be told apart.
const MARKER: &str = "ROUND-TRIP-RESULT-7f3a";

/// The catalog the server publishes (built from the tool definitions, not copied by hand).
fn tools() -> Vec<ToolSpec> {
    ToolName::ALL
        .iter()
        .map(|tool| ToolSpec {
            name: tool.as_str().to_owned(),
            description: tool.description().to_owned(),
            input_schema: Value::Object(tool.input_schema().as_ref().clone()),
            category: Some(tool.category().as_str().to_owned()),
            allowed_modes: None,
        })
        .collect()
}

/// One call the mock model makes: id, name, arguments.
type WireCall<'a> = (&'a str, &'a str, Value);

/// A provider's wire format, as the mock server speaks it.
trait Wire {
    const KIND: ProviderKind;
    /// Path prefix of the base URL (e.g. `/v1beta/`).
    const BASE_PATH: &'static str;
    /// Path of the chat request.
    const CHAT_PATH: &'static str;
    /// A plain text answer.
    fn text(text: &str) -> Value;
    /// An answer with tool calls.
    fn calls(calls: &[WireCall<'_>]) -> Value;
    /// An error body.
    fn error(status: u16, message: &str) -> Value;
    /// Checks the request carries the key the provider's way.
    fn check_auth(request: &Request);
    /// Checks the request declares the tools the provider's way.
    fn check_tools(body: &Value);
    /// Checks the second request replays the call and carries its result.
    fn check_round_trip(body: &Value, call: &WireCall<'_>);
}

/// The provider `proxi` uses for `W`'s kind (for OpenAI, Proxi's own adapter).
fn make_provider<W: Wire>(server: &MockServer) -> Box<dyn LlmProvider> {
    let mut settings = GenaiSettings::new(W::KIND);
    settings.api_key = Some(KEY.to_owned());
    settings.base_url = Some(format!("{}{}", server.uri(), W::BASE_PATH));
    settings.timeout = Duration::from_secs(10);
    build_provider(settings).expect("provider builds").0
}

async fn complete(
    provider: &dyn LlmProvider,
    messages: &[Message],
) -> Result<AssistantTurn, ProviderError> {
    let tools = tools();
    provider
        .complete(ProviderRequest {
            system: SYSTEM,
            messages,
            tools: &tools,
        })
        .await
}

fn user() -> Vec<Message> {
    vec![Message::User(TASK.to_owned())]
}

/// Answers every POST (each mock server stands in for one provider).
async fn reply(server: &MockServer, status: u16, body: Value) {
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(status).set_body_json(body))
        .mount(server)
        .await;
}

async fn bodies(server: &MockServer) -> Vec<Value> {
    server
        .received_requests()
        .await
        .unwrap_or_default()
        .iter()
        .map(|request| serde_json::from_slice(&request.body).expect("JSON request body"))
        .collect()
}

async fn plain_answer<W: Wire>() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(W::CHAT_PATH))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(W::text("All services are healthy.")),
        )
        .expect(1)
        .mount(&server)
        .await;
    let turn = complete(make_provider::<W>(&server).as_ref(), &user())
        .await
        .unwrap();
    assert!(turn.is_final());
    assert_eq!(turn.text.as_deref(), Some("All services are healthy."));

    let requests = server.received_requests().await.unwrap();
    W::check_auth(&requests[0]);
    let body: Value = serde_json::from_slice(&requests[0].body).unwrap();
    W::check_tools(&body);
    let text = body.to_string();
    assert!(text.contains(SYSTEM), "system prompt missing: {text}");
    assert!(text.contains(TASK), "task missing: {text}");
}

async fn one_tool_call<W: Wire>() {
    let server = MockServer::start().await;
    reply(
        &server,
        200,
        W::calls(&[(
            "call_1",
            "restart_service",
            json!({"service_name": "web-server"}),
        )]),
    )
    .await;
    let turn = complete(make_provider::<W>(&server).as_ref(), &user())
        .await
        .unwrap();
    assert!(!turn.is_final());
    assert_eq!(turn.tool_calls.len(), 1);
    assert_eq!(turn.tool_calls[0].name, "restart_service");
    assert_eq!(
        turn.tool_calls[0].arguments,
        json!({"service_name": "web-server"})
    );
    assert!(!turn.tool_calls[0].id.is_empty());
    // genai keeps its own message for the round trip; Proxi's OpenAI adapter rebuilds it.
    assert!(turn.native.is_some() || W::KIND == ProviderKind::OpenAi);
}

async fn parallel_tool_calls<W: Wire>() {
    let server = MockServer::start().await;
    reply(
        &server,
        200,
        W::calls(&[
            (
                "call_1",
                "restart_service",
                json!({"service_name": "web-server"}),
            ),
            ("call_2", "scale_fleet", json!({"count": 5})),
            ("call_3", "list_services", json!({})),
        ]),
    )
    .await;
    let turn = complete(make_provider::<W>(&server).as_ref(), &user())
        .await
        .unwrap();
    let names: Vec<&str> = turn.tool_calls.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["restart_service", "scale_fleet", "list_services"]);
    assert_eq!(turn.tool_calls[1].arguments, json!({"count": 5}));
    let ids: std::collections::HashSet<&str> =
        turn.tool_calls.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids.len(), 3, "call ids must be distinct");
}

async fn tool_result_round_trip<W: Wire>() {
    let server = MockServer::start().await;
    let call: WireCall<'_> = (
        "call_1",
        "restart_service",
        json!({"service_name": "web-server"}),
    );
    Mock::given(method("POST"))
        .and(path(W::CHAT_PATH))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(W::calls(std::slice::from_ref(&call))),
        )
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(W::CHAT_PATH))
        .and(body_string_contains(MARKER))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(W::text("❌ Blocked in NORMAL mode.")),
        )
        .with_priority(1)
        .mount(&server)
        .await;

    let provider = make_provider::<W>(&server);
    let mut messages = user();
    let first = complete(provider.as_ref(), &messages).await.unwrap();
    let id = first.tool_calls[0].id.clone();
    messages.push(Message::Assistant(first));
    messages.push(Message::ToolResults(vec![ToolResult {
        call_id: id,
        name: "restart_service".to_owned(),
        content: json!({"decision": "denied", "marker": MARKER}).to_string(),
    }]));
    let second = complete(provider.as_ref(), &messages).await.unwrap();
    assert_eq!(second.text.as_deref(), Some("❌ Blocked in NORMAL mode."));

    let bodies = bodies(&server).await;
    assert_eq!(bodies.len(), 2);
    W::check_round_trip(&bodies[1], &call);
}

async fn unauthorized<W: Wire>() {
    let server = MockServer::start().await;
    reply(&server, 401, W::error(401, "invalid api key")).await;
    let error = complete(make_provider::<W>(&server).as_ref(), &user())
        .await
        .unwrap_err();
    match &error {
        ProviderError::Auth {
            status, message, ..
        } => {
            assert_eq!(*status, 401);
            assert!(message.contains("invalid api key"), "{message}");
        }
        other => panic!("expected an auth error, got {other:?}"),
    }
    assert!(!error.to_string().contains(KEY), "the key must not leak");
}

async fn rate_limited_then_success<W: Wire>() {
    let messages = user();
    let tools = tools();
    let request = ProviderRequest {
        system: SYSTEM,
        messages: &messages,
        tools: &tools,
    };
    let limited = || {
        ResponseTemplate::new(429)
            .insert_header("retry-after", "0")
            .set_body_json(W::error(429, "rate limit exceeded"))
    };

    // Two 429s, then an answer: the bounded backoff gets through on the third attempt.
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(W::CHAT_PATH))
        .respond_with(limited())
        .up_to_n_times(2)
        .with_priority(1)
        .mount(&server)
        .await;
    reply(&server, 200, W::text("done")).await;
    let provider = make_provider::<W>(&server);
    let (turn, attempts) =
        complete_with_retry(provider.as_ref(), request, &RetryPolicy::immediate(3))
            .await
            .unwrap();
    assert_eq!(turn.text.as_deref(), Some("done"));
    assert_eq!(attempts, 3);
    assert_eq!(server.received_requests().await.unwrap().len(), 3);

    // A provider that keeps refusing: the wait it asks for is read, attempts are
    // bounded, and the error says what happened.
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(limited())
        .mount(&server)
        .await;
    let provider = make_provider::<W>(&server);
    let error = provider.complete(request).await.unwrap_err();
    assert!(error.is_retryable(), "{error:?}");
    assert_eq!(error.retry_after(), Some(Duration::ZERO));
    let error = complete_with_retry(provider.as_ref(), request, &RetryPolicy::immediate(3))
        .await
        .unwrap_err();
    assert!(matches!(
        error,
        AgentError::Provider {
            attempts: 3,
            source: ProviderError::RateLimited { .. }
        }
    ));
    assert!(error.to_string().contains("429"), "{error}");
    assert!(error.to_string().contains("rate limit exceeded"), "{error}");
    assert_eq!(server.received_requests().await.unwrap().len(), 4);
}

async fn server_error<W: Wire>() {
    let server = MockServer::start().await;
    reply(&server, 500, W::error(500, "internal failure")).await;
    let error = complete_with_retry(
        make_provider::<W>(&server).as_ref(),
        ProviderRequest {
            system: SYSTEM,
            messages: &user(),
            tools: &tools(),
        },
        &RetryPolicy::immediate(3),
    )
    .await
    .unwrap_err();
    match &error {
        AgentError::Provider {
            source: ProviderError::Server {
                status, message, ..
            },
            attempts,
        } => {
            assert_eq!(*status, 500);
            assert_eq!(*attempts, 1, "5xx is reported, not retried");
            assert!(message.contains("internal failure"), "{message}");
        }
        other => panic!("expected a server error, got {other:?}"),
    }
    assert_eq!(server.received_requests().await.unwrap().len(), 1);
}

macro_rules! provider_tests {
    ($module:ident, $wire:ty) => {
        mod $module {
            use super::*;

            #[tokio::test]
            async fn plain_answer() {
                super::plain_answer::<$wire>().await;
            }

            #[tokio::test]
            async fn one_tool_call() {
                super::one_tool_call::<$wire>().await;
            }

            #[tokio::test]
            async fn parallel_tool_calls() {
                super::parallel_tool_calls::<$wire>().await;
            }

            #[tokio::test]
            async fn tool_result_round_trip() {
                super::tool_result_round_trip::<$wire>().await;
            }

            #[tokio::test]
            async fn unauthorized() {
                super::unauthorized::<$wire>().await;
            }

            #[tokio::test]
            async fn rate_limited_then_success() {
                super::rate_limited_then_success::<$wire>().await;
            }

            #[tokio::test]
            async fn server_error() {
                super::server_error::<$wire>().await;
            }
        }
    };
}

// --- Gemini: generateContent with functionDeclarations ------------------------

struct Gemini;

impl Wire for Gemini {
    const KIND: ProviderKind = ProviderKind::Gemini;
    const BASE_PATH: &'static str = "/v1beta/";
    const CHAT_PATH: &'static str = "/v1beta/models/gemini-2.5-flash:generateContent";

    fn text(text: &str) -> Value {
        json!({
            "candidates": [{
                "content": {"role": "model", "parts": [{"text": text}]},
                "finishReason": "STOP",
                "index": 0
            }],
            "usageMetadata": {"promptTokenCount": 120, "candidatesTokenCount": 8, "totalTokenCount": 128},
            "modelVersion": "gemini-2.5-flash",
            "responseId": "resp-1"
        })
    }

    fn calls(calls: &[WireCall<'_>]) -> Value {
        let parts: Vec<Value> = calls
            .iter()
            .enumerate()
            .map(|(index, (_, name, args))| {
                let mut part = json!({"functionCall": {"name": name, "args": args}});
                // Gemini signs the first call of a turn; the signature must come back.
                if index == 0 {
                    part["thoughtSignature"] = json!("c2lnbmF0dXJlLW9uZQ==");
                }
                part
            })
            .collect();
        json!({
            "candidates": [{
                "content": {"role": "model", "parts": parts},
                "finishReason": "STOP",
                "index": 0
            }],
            "usageMetadata": {"promptTokenCount": 120, "candidatesTokenCount": 20, "totalTokenCount": 140},
            "modelVersion": "gemini-2.5-flash"
        })
    }

    fn error(status: u16, message: &str) -> Value {
        let status_name = match status {
            401 => "UNAUTHENTICATED",
            429 => "RESOURCE_EXHAUSTED",
            _ => "INTERNAL",
        };
        json!({"error": {"code": status, "message": message, "status": status_name}})
    }

    fn check_auth(request: &Request) {
        assert_eq!(
            request
                .headers
                .get("x-goog-api-key")
                .and_then(|v| v.to_str().ok()),
            Some(KEY)
        );
        assert!(
            !request.url.as_str().contains(KEY),
            "the key must not be in the URL"
        );
    }

    fn check_tools(body: &Value) {
        let declarations = body["tools"][0]["functionDeclarations"].as_array().unwrap();
        assert_eq!(declarations.len(), ToolName::ALL.len());
        let restart = declarations
            .iter()
            .find(|d| d["name"] == "restart_service")
            .unwrap();
        assert_eq!(
            restart["parametersJsonSchema"]["required"],
            json!(["service_name"])
        );
        assert!(
            body["systemInstruction"]["parts"][0]["text"]
                .as_str()
                .unwrap()
                .contains(SYSTEM)
        );
    }

    fn check_round_trip(body: &Value, call: &WireCall<'_>) {
        let contents = body["contents"].as_array().unwrap();
        assert_eq!(contents.len(), 3);
        assert_eq!(contents[1]["role"], "model");
        let part = &contents[1]["parts"][0];
        assert_eq!(part["functionCall"]["name"], call.1);
        assert_eq!(part["functionCall"]["args"], call.2);
        assert_eq!(part["thoughtSignature"], "c2lnbmF0dXJlLW9uZQ==");
        assert_eq!(contents[2]["role"], "user");
        let response = &contents[2]["parts"][0]["functionResponse"];
        assert_eq!(response["name"], call.1);
        assert!(response["response"].to_string().contains(MARKER));
    }
}

provider_tests!(gemini, Gemini);

#[tokio::test]
async fn gemini_reports_a_bad_key_given_as_400_as_an_auth_error() {
    let server = MockServer::start().await;
    reply(
        &server,
        400,
        json!({"error": {
            "code": 400,
            "message": "API key not valid. Please pass a valid API key.",
            "status": "INVALID_ARGUMENT",
            "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID", "domain": "googleapis.com"}]
        }}),
    )
    .await;
    let error = complete(make_provider::<Gemini>(&server).as_ref(), &user())
        .await
        .unwrap_err();
    assert!(
        matches!(error, ProviderError::Auth { status: 400, .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("GOOGLE_API_KEY"), "{error}");
}

#[tokio::test]
async fn gemini_retry_delay_in_the_body_is_honoured() {
    let server = MockServer::start().await;
    reply(
        &server,
        429,
        json!({"error": {
            "code": 429,
            "message": "Resource has been exhausted (e.g. check quota).",
            "status": "RESOURCE_EXHAUSTED",
            "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "17s"}]
        }}),
    )
    .await;
    let error = complete(make_provider::<Gemini>(&server).as_ref(), &user())
        .await
        .unwrap_err();
    assert_eq!(error.retry_after(), Some(Duration::from_secs(17)));
}

// --- OpenAI: chat completions with tools (also OpenAI-compatible servers) -----

struct OpenAi;

impl Wire for OpenAi {
    const KIND: ProviderKind = ProviderKind::OpenAi;
    const BASE_PATH: &'static str = "/v1/";
    const CHAT_PATH: &'static str = "/v1/chat/completions";

    fn text(text: &str) -> Value {
        json!({
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": "gpt-4o-mini-2024-07-18",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": null},
                "logprobs": null,
                "finish_reason": "stop"
            }],
            "usage": {"prompt_tokens": 120, "completion_tokens": 8, "total_tokens": 128}
        })
    }

    fn calls(calls: &[WireCall<'_>]) -> Value {
        let tool_calls: Vec<Value> = calls
            .iter()
            .map(|(id, name, args)| {
                json!({
                    "id": id,
                    "type": "function",
                    // OpenAI sends the arguments as a JSON string.
                    "function": {"name": name, "arguments": args.to_string()}
                })
            })
            .collect();
        json!({
            "id": "chatcmpl-2",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": "gpt-4o-mini-2024-07-18",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": null, "tool_calls": tool_calls, "refusal": null},
                "logprobs": null,
                "finish_reason": "tool_calls"
            }],
            "usage": {"prompt_tokens": 120, "completion_tokens": 30, "total_tokens": 150}
        })
    }

    fn error(status: u16, message: &str) -> Value {
        let (kind, code) = match status {
            401 => ("invalid_request_error", json!("invalid_api_key")),
            429 => ("requests", json!("rate_limit_exceeded")),
            _ => ("server_error", Value::Null),
        };
        json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
    }

    fn check_auth(request: &Request) {
        assert_eq!(
            request
                .headers
                .get("authorization")
                .and_then(|v| v.to_str().ok()),
            Some(format!("Bearer {KEY}").as_str())
        );
    }

    fn check_tools(body: &Value) {
        let tools = body["tools"].as_array().unwrap();
        assert_eq!(tools.len(), ToolName::ALL.len());
        assert!(tools.iter().all(|tool| tool["type"] == "function"));
        let scale = tools
            .iter()
            .find(|tool| tool["function"]["name"] == "scale_fleet")
            .unwrap();
        assert_eq!(
            scale["function"]["parameters"]["properties"]["count"]["minimum"],
            1
        );
        assert_eq!(body["messages"][0]["role"], "system");
        assert_eq!(body["model"], "gpt-4o-mini");
    }

    fn check_round_trip(body: &Value, call: &WireCall<'_>) {
        let messages = body["messages"].as_array().unwrap();
        let assistant = messages.iter().find(|m| m["role"] == "assistant").unwrap();
        assert_eq!(assistant["tool_calls"][0]["id"], call.0);
        assert_eq!(assistant["tool_calls"][0]["function"]["name"], call.1);
        let tool = messages.iter().find(|m| m["role"] == "tool").unwrap();
        assert_eq!(tool["tool_call_id"], call.0);
        assert!(tool["content"].as_str().unwrap().contains(MARKER));
    }
}

provider_tests!(openai, OpenAi);

#[tokio::test]
async fn openai_malformed_answers_are_errors_or_data_never_panics() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_string("<html>gateway</html>"))
        .mount(&server)
        .await;
    let error = complete(make_provider::<OpenAi>(&server).as_ref(), &user())
        .await
        .unwrap_err();
    assert!(
        matches!(error, ProviderError::Malformed { .. }),
        "{error:?}"
    );

    // Arguments that are not JSON no longer fail the turn (genai's adapter did):
    // the call is kept, with its text, for the server to reject and audit.
    let server = MockServer::start().await;
    reply(
        &server,
        200,
        json!({"id": "x", "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "restart_service", "arguments": "{not json"}}
        ]}, "finish_reason": "tool_calls"}]}),
    )
    .await;
    let turn = complete(make_provider::<OpenAi>(&server).as_ref(), &user())
        .await
        .unwrap();
    assert_eq!(
        turn.tool_calls[0].unparsed_arguments.as_deref(),
        Some("{not json")
    );

    // No choices is an empty reply, which the loop asks again about.
    let server = MockServer::start().await;
    reply(&server, 200, json!({"id": "x", "choices": []})).await;
    let turn = complete(make_provider::<OpenAi>(&server).as_ref(), &user())
        .await
        .unwrap();
    assert!(turn.is_empty());
}

#[tokio::test]
async fn openai_timeouts_are_reported_as_timeouts() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(OpenAi::text("late"))
                .set_delay(Duration::from_secs(30)),
        )
        .mount(&server)
        .await;
    let mut settings = GenaiSettings::new(ProviderKind::OpenAi);
    settings.api_key = Some(KEY.to_owned());
    settings.base_url = Some(format!("{}/v1", server.uri()));
    settings.timeout = Duration::from_millis(200);
    let (provider, _) = build_provider(settings).unwrap();
    let error = complete(provider.as_ref(), &user()).await.unwrap_err();
    assert!(matches!(error, ProviderError::Timeout { .. }), "{error:?}");
    // The error names the limit and how to raise it.
    let text = error.to_string();
    assert!(text.contains("0.2 s"), "{text}");
    assert!(text.contains("--model-timeout"), "{text}");
    assert!(text.contains("PROXI_MODEL_TIMEOUT"), "{text}");
}

#[tokio::test]
async fn an_unreachable_provider_is_reported_clearly() {
    // Bind and drop a listener to get a port with nothing behind it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut settings = GenaiSettings::new(ProviderKind::Ollama);
    settings.base_url = Some(format!("http://127.0.0.1:{port}"));
    let (provider, _) = build_provider(settings).unwrap();
    let error = complete(provider.as_ref(), &user()).await.unwrap_err();
    assert!(
        matches!(error, ProviderError::Unreachable { .. }),
        "{error:?}"
    );
}

// --- Anthropic: messages with tools -------------------------------------------

struct Anthropic;

impl Wire for Anthropic {
    const KIND: ProviderKind = ProviderKind::Anthropic;
    const BASE_PATH: &'static str = "/v1/";
    const CHAT_PATH: &'static str = "/v1/messages";

    fn text(text: &str) -> Value {
        json!({
            "id": "msg_01",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-5-20250929",
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": null,
            "usage": {"input_tokens": 120, "output_tokens": 8}
        })
    }

    fn calls(calls: &[WireCall<'_>]) -> Value {
        let mut content = vec![json!({"type": "text", "text": "Let me take care of that."})];
        content.extend(calls.iter().map(
            |(id, name, input)| json!({"type": "tool_use", "id": id, "name": name, "input": input}),
        ));
        json!({
            "id": "msg_02",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-5-20250929",
            "content": content,
            "stop_reason": "tool_use",
            "stop_sequence": null,
            "usage": {"input_tokens": 120, "output_tokens": 40}
        })
    }

    fn error(status: u16, message: &str) -> Value {
        let kind = match status {
            401 => "authentication_error",
            429 => "rate_limit_error",
            _ => "api_error",
        };
        json!({"type": "error", "error": {"type": kind, "message": message}})
    }

    fn check_auth(request: &Request) {
        assert_eq!(
            request
                .headers
                .get("x-api-key")
                .and_then(|v| v.to_str().ok()),
            Some(KEY)
        );
        assert!(request.headers.get("anthropic-version").is_some());
    }

    fn check_tools(body: &Value) {
        let tools = body["tools"].as_array().unwrap();
        assert_eq!(tools.len(), ToolName::ALL.len());
        let delete = tools
            .iter()
            .find(|tool| tool["name"] == "delete_database")
            .unwrap();
        assert_eq!(delete["input_schema"]["required"], json!(["db_name"]));
        // genai's default would be 64000; a tool turn needs far less.
        assert_eq!(body["max_tokens"], 4096);
        assert!(body["system"].to_string().contains(SYSTEM));
    }

    fn check_round_trip(body: &Value, call: &WireCall<'_>) {
        let messages = body["messages"].as_array().unwrap();
        assert_eq!(messages.len(), 3);
        assert_eq!(messages[1]["role"], "assistant");
        let tool_use = messages[1]["content"]
            .as_array()
            .unwrap()
            .iter()
            .find(|block| block["type"] == "tool_use")
            .unwrap();
        assert_eq!(tool_use["id"], call.0);
        assert_eq!(tool_use["input"], call.2);
        assert_eq!(messages[2]["role"], "user");
        let result = &messages[2]["content"][0];
        assert_eq!(result["type"], "tool_result");
        assert_eq!(result["tool_use_id"], call.0);
        assert!(result["content"].to_string().contains(MARKER));
    }
}

provider_tests!(anthropic, Anthropic);

#[tokio::test]
async fn anthropic_text_beside_tool_calls_is_kept() {
    let server = MockServer::start().await;
    reply(
        &server,
        200,
        Anthropic::calls(&[("toolu_01", "list_services", json!({}))]),
    )
    .await;
    let turn = complete(make_provider::<Anthropic>(&server).as_ref(), &user())
        .await
        .unwrap();
    assert_eq!(turn.text.as_deref(), Some("Let me take care of that."));
    assert_eq!(turn.tool_calls[0].id, "toolu_01");
}

// --- Ollama: native /api/chat with tools --------------------------------------

struct Ollama;

impl Wire for Ollama {
    const KIND: ProviderKind = ProviderKind::Ollama;
    const BASE_PATH: &'static str = "/";
    const CHAT_PATH: &'static str = "/api/chat";

    fn text(text: &str) -> Value {
        json!({
            "model": "llama3.1",
            "created_at": "2025-01-01T00:00:00.000000Z",
            "message": {"role": "assistant", "content": text},
            "done": true,
            "done_reason": "stop",
            "total_duration": 1_000_000,
            "load_duration": 1_000,
            "prompt_eval_count": 120,
            "prompt_eval_duration": 1_000,
            "eval_count": 8,
            "eval_duration": 1_000
        })
    }

    fn calls(calls: &[WireCall<'_>]) -> Value {
        let tool_calls: Vec<Value> = calls
            .iter()
            .map(|(_, name, args)| json!({"function": {"name": name, "arguments": args}}))
            .collect();
        json!({
            "model": "llama3.1",
            "created_at": "2025-01-01T00:00:00.000000Z",
            "message": {"role": "assistant", "content": "", "tool_calls": tool_calls},
            "done": true,
            "done_reason": "stop",
            "prompt_eval_count": 120,
            "eval_count": 30
        })
    }

    fn error(_status: u16, message: &str) -> Value {
        json!({"error": message})
    }

    fn check_auth(_request: &Request) {
        // Ollama takes no key.
    }

    fn check_tools(body: &Value) {
        let tools = body["tools"].as_array().unwrap();
        assert_eq!(tools.len(), ToolName::ALL.len());
        assert!(tools.iter().all(|tool| tool["type"] == "function"));
        assert_eq!(body["stream"], false);
        assert_eq!(body["model"], "llama3.1");
        assert_eq!(body["messages"][0]["role"], "system");
    }

    fn check_round_trip(body: &Value, call: &WireCall<'_>) {
        let messages = body["messages"].as_array().unwrap();
        let assistant = messages.iter().find(|m| m["role"] == "assistant").unwrap();
        assert_eq!(assistant["tool_calls"][0]["function"]["name"], call.1);
        assert_eq!(assistant["tool_calls"][0]["function"]["arguments"], call.2);
        let tool = messages.iter().find(|m| m["role"] == "tool").unwrap();
        assert!(tool["content"].as_str().unwrap().contains(MARKER));
    }
}

provider_tests!(ollama, Ollama);

#[tokio::test]
async fn ollama_gets_one_tool_message_per_parallel_result() {
    let server = MockServer::start().await;
    reply(&server, 200, Ollama::text("ok")).await;
    let provider = make_provider::<Ollama>(&server);
    let calls = AssistantTurn::calls(vec![
        proxi::agent::provider::ToolCallRequest::new("a", "list_services", json!({})),
        proxi::agent::provider::ToolCallRequest::new("b", "read_logs", json!({})),
    ]);
    let messages = vec![
        Message::User(TASK.to_owned()),
        Message::Assistant(calls),
        Message::ToolResults(vec![
            ToolResult {
                call_id: "a".into(),
                name: "list_services".into(),
                content: "first".into(),
            },
            ToolResult {
                call_id: "b".into(),
                name: "read_logs".into(),
                content: "second".into(),
            },
        ]),
    ];
    complete(provider.as_ref(), &messages).await.unwrap();
    let body = &bodies(&server).await[0];
    let tool_contents: Vec<&str> = body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "tool")
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(tool_contents, ["first", "second"]);
}
