//! The seam between the agent loop and a language model.
//!
//! The loop speaks only [`LlmProvider`]: a system prompt, the conversation so far
//! and the tool specs go in; one assistant turn (tool calls, or a final text)
//! comes out. Real providers ([`super::genai_provider`]) and the deterministic
//! planner ([`super::mock`]) implement the same trait, so the loop is identical.

use std::fmt;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One tool the model may call, as the server's catalog describes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolSpec {
    /// Wire name, e.g. `restart_service`.
    pub name: String,
    /// What the tool does.
    pub description: String,
    /// JSON Schema of its arguments.
    pub input_schema: Value,
    /// `read_only`, `active` or `destructive`, when the backend says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// Modes whose policy allows the tool, when the backend says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_modes: Option<Vec<String>>,
}

/// A tool invocation the model asked for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolCallRequest {
    /// The provider's id for the call, used to pair it with its result
    /// (the loop generates one when the provider sent none).
    pub id: String,
    /// The tool name as the model wrote it (it may not exist).
    pub name: String,
    /// The arguments as the model wrote them (untrusted). When they were text
    /// that is not JSON, this is that text as a JSON string, which the server
    /// rejects (and audits) as `invalid_arguments`.
    pub arguments: Value,
    /// The arguments text, when the model sent text that does not parse as JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unparsed_arguments: Option<String>,
}

impl ToolCallRequest {
    /// A call whose arguments arrived as a JSON value.
    pub fn new(id: impl Into<String>, name: impl Into<String>, arguments: Value) -> Self {
        ToolCallRequest {
            id: id.into(),
            name: name.into(),
            arguments,
            unparsed_arguments: None,
        }
    }

    /// A call as a provider's wire format carried it: `arguments` may be an
    /// object, `null`, or a string holding JSON (OpenAI's form).
    ///
    /// `null`, a missing value and an empty or blank string (several servers send
    /// `""` for tools without arguments) all mean "no arguments". A string that is
    /// not JSON (e.g. truncated output) is kept as text: the call still goes to the
    /// server, which rejects and audits it, and the model is told why.
    pub fn from_wire(id: impl Into<String>, name: impl Into<String>, arguments: Value) -> Self {
        let mut call = ToolCallRequest::new(id, name, Value::Null);
        call.arguments = match arguments {
            Value::Null => Value::Object(serde_json::Map::new()),
            Value::String(text) if text.trim().is_empty() => Value::Object(serde_json::Map::new()),
            Value::String(text) => match serde_json::from_str::<Value>(&text) {
                Ok(Value::Null) => Value::Object(serde_json::Map::new()),
                Ok(parsed) => parsed,
                Err(_) => {
                    call.unparsed_arguments = Some(text.clone());
                    Value::String(text)
                }
            },
            other => other,
        };
        call
    }

    /// The arguments as a JSON text, as OpenAI-style wire formats carry them.
    pub fn arguments_text(&self) -> String {
        match &self.unparsed_arguments {
            Some(text) => text.clone(),
            None => self.arguments.to_string(),
        }
    }
}

/// What the loop tells the model about one call.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolResult {
    /// The id of the call this answers.
    pub call_id: String,
    /// The tool name of that call (Gemini pairs results by name).
    pub name: String,
    /// The result as text (JSON rendered by the loop).
    pub content: String,
}

/// A provider's own form of an assistant turn, kept so that provider state
/// (e.g. Gemini thought signatures) survives the round trip untouched.
#[derive(Clone)]
pub struct NativeTurn(pub(crate) genai::chat::ChatMessage);

impl fmt::Debug for NativeTurn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NativeTurn { .. }")
    }
}

/// One assistant turn: tool calls to run, or (when there are none) the final answer.
#[derive(Clone, Debug, Default)]
pub struct AssistantTurn {
    /// Text the model wrote alongside or instead of tool calls.
    pub text: Option<String>,
    /// The calls the model wants run, in order.
    pub tool_calls: Vec<ToolCallRequest>,
    /// The provider's native message, replayed verbatim on the next request.
    pub native: Option<NativeTurn>,
}

impl AssistantTurn {
    /// A turn that answers without calling tools.
    pub fn answer(text: impl Into<String>) -> AssistantTurn {
        AssistantTurn {
            text: Some(text.into()),
            ..AssistantTurn::default()
        }
    }

    /// A turn that calls tools.
    pub fn calls(tool_calls: Vec<ToolCallRequest>) -> AssistantTurn {
        AssistantTurn {
            tool_calls,
            ..AssistantTurn::default()
        }
    }

    /// Whether this turn ends the run.
    pub fn is_final(&self) -> bool {
        self.tool_calls.is_empty()
    }

    /// Whether the model said nothing at all: no text and no calls.
    pub fn is_empty(&self) -> bool {
        self.tool_calls.is_empty()
            && self
                .text
                .as_deref()
                .is_none_or(|text| text.trim().is_empty())
    }
}

/// One entry of the conversation.
#[derive(Clone, Debug)]
pub enum Message {
    /// The user's task.
    User(String),
    /// A model turn.
    Assistant(AssistantTurn),
    /// The results of the previous turn's tool calls, in call order.
    ToolResults(Vec<ToolResult>),
}

/// Everything a provider sees for one completion.
#[derive(Clone, Copy, Debug)]
pub struct ProviderRequest<'a> {
    /// Instructions, including the policy context.
    pub system: &'a str,
    /// The conversation so far; starts with the user's task.
    pub messages: &'a [Message],
    /// The tools the model may call.
    pub tools: &'a [ToolSpec],
}

/// Why a completion failed, in terms a user can act on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ProviderError {
    /// The provider is not configured (missing key, bad URL, unknown model name).
    #[error("{provider}: {message}")]
    Config {
        /// Provider name.
        provider: String,
        /// What is missing or wrong.
        message: String,
    },
    /// The provider refused the credentials (401/403).
    #[error("{provider} rejected the API key (HTTP {status}): {message}. {hint}")]
    Auth {
        /// Provider name.
        provider: String,
        /// HTTP status.
        status: u16,
        /// The provider's message.
        message: String,
        /// Which setting to check.
        hint: String,
    },
    /// The provider is rate limiting (429); the loop retries these a bounded number of times.
    #[error("{provider} is rate limiting requests (HTTP 429): {message}")]
    RateLimited {
        /// Provider name.
        provider: String,
        /// How long the provider asked us to wait, if it said.
        retry_after: Option<Duration>,
        /// The provider's message.
        message: String,
    },
    /// The request took too long.
    #[error("{provider} did not answer in time: {message}")]
    Timeout {
        /// Provider name.
        provider: String,
        /// Details.
        message: String,
    },
    /// The provider could not be reached.
    #[error("cannot reach {provider}: {message}")]
    Unreachable {
        /// Provider name.
        provider: String,
        /// Details.
        message: String,
    },
    /// The provider answered with something that is not a valid completion.
    #[error("{provider} sent a malformed response: {message}")]
    Malformed {
        /// Provider name.
        provider: String,
        /// What was wrong.
        message: String,
    },
    /// The provider failed (5xx).
    #[error("{provider} failed with HTTP {status}: {message}")]
    Server {
        /// Provider name.
        provider: String,
        /// HTTP status.
        status: u16,
        /// The provider's message.
        message: String,
    },
    /// The provider rejected the request (other 4xx, e.g. an unknown model).
    #[error("{provider} rejected the request with HTTP {status}: {message}")]
    Request {
        /// Provider name.
        provider: String,
        /// HTTP status.
        status: u16,
        /// The provider's message.
        message: String,
    },
}

impl ProviderError {
    /// Whether waiting and asking again may help (only rate limits qualify).
    pub fn is_retryable(&self) -> bool {
        matches!(self, ProviderError::RateLimited { .. })
    }

    /// How long the provider asked us to wait, if it said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProviderError::RateLimited { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// A language model that plans tool calls.
pub trait LlmProvider: Send + Sync {
    /// Short provider name for output, e.g. `gemini` or `mock`.
    fn name(&self) -> &str;

    /// The model in use, e.g. `gemini-2.5-flash`.
    fn model(&self) -> &str;

    /// Produces the next assistant turn.
    fn complete<'a>(
        &'a self,
        request: ProviderRequest<'a>,
    ) -> BoxFuture<'a, Result<AssistantTurn, ProviderError>>;
}
