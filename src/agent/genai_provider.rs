//! Real language models through genai: Gemini, OpenAI (and OpenAI-compatible
//! servers), Anthropic and Ollama, all with native tool calling.
//!
//! genai stays behind [`LlmProvider`]: the rest of the agent never sees its
//! types except the opaque [`NativeTurn`], which carries an assistant message
//! back unchanged so provider state such as Gemini thought signatures
//! survives between tool turns.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use futures::future::BoxFuture;
use genai::adapter::AdapterKind;
use genai::chat::{
    ChatMessage, ChatOptions, ChatRequest, ChatResponse, ContentPart, MessageContent, Tool,
    ToolCall, ToolResponse,
};
use genai::resolver::{AuthData, Endpoint, ProviderConfig};
use genai::{ModelIden, webc};
use reqwest::header::HeaderMap;
use serde_json::Value;

use super::provider::{
    AssistantTurn, LlmProvider, Message, NativeTurn, ProviderError, ProviderRequest,
    ToolCallRequest,
};

/// Longest provider error text kept in a message.
const MAX_ERROR_TEXT: usize = 300;
/// Default limit for one completion, connect included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
/// Environment variable that sets the model timeout in seconds (`--model-timeout` wins).
pub const MODEL_TIMEOUT_ENV: &str = "PROXI_MODEL_TIMEOUT";
/// Anthropic requires a max_tokens; genai's default (64000) is far beyond what a tool turn needs.
pub const DEFAULT_ANTHROPIC_MAX_TOKENS: u32 = 4096;

/// The providers genai serves for the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProviderKind {
    /// Google Gemini (generateContent with functionDeclarations).
    Gemini,
    /// OpenAI chat completions, or any OpenAI-compatible server via a base URL.
    OpenAi,
    /// Anthropic messages.
    Anthropic,
    /// Ollama's native `/api/chat`.
    Ollama,
}

impl ProviderKind {
    /// The lowercase name used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Gemini => "gemini",
            ProviderKind::OpenAi => "openai",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Ollama => "ollama",
        }
    }

    /// The model used when none is given.
    pub fn default_model(self) -> &'static str {
        match self {
            ProviderKind::Gemini => "gemini-2.5-flash",
            ProviderKind::OpenAi => "gpt-4o-mini",
            ProviderKind::Anthropic => "claude-sonnet-4-5",
            ProviderKind::Ollama => "llama3.1",
        }
    }

    /// The provider's public base URL (genai's default), ending in `/`.
    pub fn default_base_url(self) -> &'static str {
        match self {
            ProviderKind::Gemini => "https://generativelanguage.googleapis.com/v1beta/",
            ProviderKind::OpenAi => "https://api.openai.com/v1/",
            ProviderKind::Anthropic => "https://api.anthropic.com/v1/",
            ProviderKind::Ollama => "http://localhost:11434/",
        }
    }

    /// The environment variable that holds the key, for messages.
    pub fn key_variable(self) -> &'static str {
        match self {
            ProviderKind::Gemini => "GOOGLE_API_KEY",
            ProviderKind::OpenAi => "OPENAI_API_KEY",
            ProviderKind::Anthropic => "ANTHROPIC_API_KEY",
            ProviderKind::Ollama => "OLLAMA_HOST",
        }
    }

    fn adapter(self) -> AdapterKind {
        match self {
            ProviderKind::Gemini => AdapterKind::Gemini,
            ProviderKind::OpenAi => AdapterKind::OpenAI,
            ProviderKind::Anthropic => AdapterKind::Anthropic,
            ProviderKind::Ollama => AdapterKind::Ollama,
        }
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ProviderKind {
    type Err = String;

    fn from_str(text: &str) -> Result<ProviderKind, String> {
        match text.to_ascii_lowercase().as_str() {
            "gemini" | "google" => Ok(ProviderKind::Gemini),
            "openai" => Ok(ProviderKind::OpenAi),
            "anthropic" | "claude" => Ok(ProviderKind::Anthropic),
            "ollama" => Ok(ProviderKind::Ollama),
            other => Err(format!(
                "unknown provider '{other}' (expected gemini, openai, anthropic or ollama)"
            )),
        }
    }
}

/// How to reach one provider.
#[derive(Clone)]
pub struct GenaiSettings {
    /// Which provider.
    pub kind: ProviderKind,
    /// The model name; `None` uses the provider's default.
    pub model: Option<String>,
    /// The API key (not needed for Ollama or keyless OpenAI-compatible servers).
    pub api_key: Option<String>,
    /// Overrides the provider's base URL (OpenAI-compatible servers, tests).
    pub base_url: Option<String>,
    /// Limit for one completion, connect included.
    pub timeout: Duration,
    /// Output token limit; `None` keeps the provider default (Anthropic gets 4096).
    pub max_tokens: Option<u32>,
    /// Sampling temperature; `None` keeps the provider default.
    pub temperature: Option<f64>,
    /// Sampling seed, for providers that honour one (OpenAI-compatible servers); `None` sends none.
    pub seed: Option<u64>,
}

impl fmt::Debug for GenaiSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GenaiSettings")
            .field("kind", &self.kind)
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("base_url", &self.base_url)
            .field("timeout", &self.timeout)
            .field("max_tokens", &self.max_tokens)
            .field("temperature", &self.temperature)
            .field("seed", &self.seed)
            .finish()
    }
}

impl GenaiSettings {
    /// Settings with no key, the default model and the public endpoint.
    pub fn new(kind: ProviderKind) -> GenaiSettings {
        GenaiSettings {
            kind,
            model: None,
            api_key: None,
            base_url: None,
            timeout: DEFAULT_TIMEOUT,
            max_tokens: None,
            temperature: None,
            seed: None,
        }
    }

    /// Reads the seed's variables through `lookup` (normally the process environment):
    /// `GOOGLE_API_KEY` (or `GEMINI_API_KEY`), `OPENAI_API_KEY`, `OPENAI_BASE_URL`,
    /// `ANTHROPIC_API_KEY`, `OLLAMA_HOST`, plus `GEMINI_BASE_URL`, `ANTHROPIC_BASE_URL`
    /// and [`MODEL_TIMEOUT_ENV`]. A timeout that is not a positive number of seconds is
    /// a configuration error that names the variable.
    pub fn from_env(
        kind: ProviderKind,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<GenaiSettings, ProviderError> {
        let get = |name: &str| lookup(name).filter(|value| !value.trim().is_empty());
        let mut settings = GenaiSettings::new(kind);
        if let Some(text) = get(MODEL_TIMEOUT_ENV) {
            settings.timeout = parse_timeout(&text).ok_or_else(|| ProviderError::Config {
                provider: kind.as_str().to_owned(),
                message: format!(
                    "{MODEL_TIMEOUT_ENV}={text:?} is not a positive number of seconds"
                ),
            })?;
        }
        match kind {
            ProviderKind::Gemini => {
                settings.api_key = get("GOOGLE_API_KEY").or_else(|| get("GEMINI_API_KEY"));
                settings.base_url = get("GEMINI_BASE_URL");
            }
            ProviderKind::OpenAi => {
                settings.api_key = get("OPENAI_API_KEY");
                settings.base_url = get("OPENAI_BASE_URL");
            }
            ProviderKind::Anthropic => {
                settings.api_key = get("ANTHROPIC_API_KEY");
                settings.base_url = get("ANTHROPIC_BASE_URL");
            }
            ProviderKind::Ollama => {
                settings.base_url = get("OLLAMA_HOST").map(|host| ollama_base_url(&host));
            }
        }
        Ok(settings)
    }
}

/// Reads a timeout in seconds (fractions allowed), as `--model-timeout` and
/// [`MODEL_TIMEOUT_ENV`] take it; `None` unless it is positive and at most a day.
pub fn parse_timeout(text: &str) -> Option<Duration> {
    let seconds: f64 = text.trim().trim_end_matches('s').parse().ok()?;
    (seconds.is_finite() && seconds > 0.0 && seconds <= 86_400.0)
        .then(|| Duration::from_secs_f64(seconds))
}

/// The timeout error every provider gives: it names the limit and how to raise it.
pub fn timeout_error(kind: ProviderKind, limit: Duration) -> ProviderError {
    ProviderError::Timeout {
        provider: kind.as_str().to_owned(),
        message: format!(
            "no answer within the model timeout of {} s; raise it with --model-timeout or {MODEL_TIMEOUT_ENV}",
            limit.as_secs_f64()
        ),
    }
}

/// Turns `OLLAMA_HOST` (`host`, `host:port` or a URL) into a base URL, as Ollama's CLI does.
pub fn ollama_base_url(host: &str) -> String {
    let host = host.trim().trim_end_matches('/');
    let (scheme, rest) = match host.split_once("://") {
        Some((scheme, rest)) => (scheme, rest),
        None => ("http", host),
    };
    let has_port = match rest.rsplit_once(']') {
        Some((_, after)) => after.starts_with(':'),
        None => rest.contains(':'),
    };
    if has_port {
        format!("{scheme}://{rest}/")
    } else {
        format!("{scheme}://{rest}:11434/")
    }
}

/// genai joins paths onto the base URL, which therefore must end in `/`.
fn with_trailing_slash(url: &str) -> String {
    let url = url.trim();
    if url.ends_with('/') {
        url.to_owned()
    } else {
        format!("{url}/")
    }
}

pub(super) fn is_loopback(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.starts_with("127.") || rest.starts_with("localhost") || rest.starts_with("[::1]")
}

/// A genai-backed [`LlmProvider`].
pub struct GenaiProvider {
    kind: ProviderKind,
    model: String,
    base_url: String,
    client: genai::Client,
    options: ChatOptions,
    timeout: Duration,
}

impl fmt::Debug for GenaiProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GenaiProvider")
            .field("kind", &self.kind)
            .field("model", &self.model)
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

/// What every provider needs from [`GenaiSettings`], checked once.
pub(super) struct Resolved {
    /// The base URL, ending in `/`.
    pub base_url: String,
    /// The key to send, if any.
    pub key: Option<String>,
    /// The model name.
    pub model: String,
    /// An HTTP client with the model timeout (and no proxy for loopback URLs).
    pub http: reqwest::Client,
}

/// Checks the settings: a usable base URL, a key where one is required, a model name.
pub(super) fn resolve(settings: &GenaiSettings) -> Result<Resolved, ProviderError> {
    let kind = settings.kind;
    let config_error = |message: String| ProviderError::Config {
        provider: kind.as_str().to_owned(),
        message,
    };
    let base_url = with_trailing_slash(
        settings
            .base_url
            .as_deref()
            .unwrap_or(kind.default_base_url()),
    );
    reqwest::Url::parse(&base_url)
        .map_err(|error| config_error(format!("invalid base URL {base_url}: {error}")))?;
    let key = match (kind, settings.api_key.clone()) {
        (ProviderKind::Ollama, _) => None,
        (_, Some(key)) => Some(key),
        // A local OpenAI-compatible server (llama.cpp, vLLM) usually takes any key.
        (ProviderKind::OpenAi, None) if settings.base_url.is_some() => Some("no-key".to_owned()),
        (_, None) => {
            return Err(config_error(format!(
                "{} is not set; put it in the environment or in .env",
                kind.key_variable()
            )));
        }
    };
    let model = settings
        .model
        .clone()
        .filter(|model| !model.trim().is_empty())
        .unwrap_or_else(|| kind.default_model().to_owned());
    crate::tls::install_crypto_provider();
    let mut http = reqwest::Client::builder()
        .timeout(settings.timeout)
        .connect_timeout(settings.timeout.min(Duration::from_secs(10)));
    if is_loopback(&base_url) {
        // Local model servers (and test doubles) must not go through a proxy.
        http = http.no_proxy();
    }
    let http = http
        .build()
        .map_err(|error| config_error(format!("cannot build the HTTP client: {error}")))?;
    Ok(Resolved {
        base_url,
        key,
        model,
        http,
    })
}

impl GenaiProvider {
    /// Builds a provider; fails if a required key is missing or the URL is unusable.
    ///
    /// `proxi` itself serves OpenAI through [`super::openai_provider`], which
    /// tolerates malformed tool calls; this adapter still speaks OpenAI for
    /// comparison and tests.
    pub fn new(settings: GenaiSettings) -> Result<GenaiProvider, ProviderError> {
        let kind = settings.kind;
        let config_error = |message: String| ProviderError::Config {
            provider: kind.as_str().to_owned(),
            message,
        };
        let Resolved {
            base_url,
            key,
            model,
            http,
        } = resolve(&settings)?;
        let endpoint = Endpoint::from_owned(base_url.clone());
        let provider_config = match key {
            Some(key) => ProviderConfig::from((endpoint, AuthData::from_single(key))),
            None => ProviderConfig::from_endpoint(endpoint),
        };
        let client = genai::Client::builder()
            .with_reqwest(http)
            .with_adapter_kind(kind.adapter())
            .append_provider_config(kind.adapter(), provider_config)
            .build()
            .map_err(|error| config_error(error.to_string()))?;

        let max_tokens = settings.max_tokens.or(match kind {
            ProviderKind::Anthropic => Some(DEFAULT_ANTHROPIC_MAX_TOKENS),
            _ => None,
        });
        let mut options = ChatOptions::default();
        if let Some(max_tokens) = max_tokens {
            options = options.with_max_tokens(max_tokens);
        }
        if let Some(temperature) = settings.temperature {
            options = options.with_temperature(temperature);
        }
        if let Some(seed) = settings.seed {
            options = options.with_seed(seed);
        }
        Ok(GenaiProvider {
            kind,
            model,
            base_url,
            client,
            options,
            timeout: settings.timeout,
        })
    }

    /// The provider kind.
    pub fn kind(&self) -> ProviderKind {
        self.kind
    }

    /// The base URL requests go to.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    fn chat_request(&self, request: ProviderRequest<'_>) -> ChatRequest {
        let mut messages = Vec::with_capacity(request.messages.len());
        for message in request.messages {
            match message {
                Message::User(text) => messages.push(ChatMessage::user(text.as_str())),
                Message::Assistant(turn) => messages.push(match &turn.native {
                    Some(NativeTurn(native)) => native.clone(),
                    None => assistant_message(turn),
                }),
                Message::ToolResults(results) => {
                    let responses = results.iter().map(|result| {
                        ToolResponse::new(result.call_id.as_str(), result.content.as_str())
                            .with_fn_name(result.name.as_str())
                    });
                    if self.kind == ProviderKind::Ollama {
                        // genai's Ollama adapter keeps one result per tool message.
                        for response in responses {
                            messages.push(ChatMessage::tool(MessageContent::from_tool_responses(
                                vec![response],
                            )));
                        }
                    } else {
                        messages.push(ChatMessage::tool(MessageContent::from_tool_responses(
                            responses.collect(),
                        )));
                    }
                }
            }
        }
        let tools: Vec<Tool> = request
            .tools
            .iter()
            .map(|spec| {
                Tool::new(spec.name.as_str())
                    .with_description(spec.description.as_str())
                    .with_schema(spec.input_schema.clone())
            })
            .collect();
        let mut chat = ChatRequest::new(messages).with_system(request.system);
        if !tools.is_empty() {
            chat = chat.with_tools(tools);
        }
        chat
    }

    fn turn(&self, response: ChatResponse) -> AssistantTurn {
        let text = response
            .content
            .joined_texts()
            .filter(|text| !text.trim().is_empty());
        let tool_calls: Vec<ToolCallRequest> = response
            .tool_calls()
            .into_iter()
            .map(|call| {
                ToolCallRequest::from_wire(
                    call.call_id.clone(),
                    call.fn_name.clone(),
                    call.fn_arguments.clone(),
                )
            })
            .collect();
        if tool_calls.is_empty() {
            // An empty reply is a turn, not an error: the loop asks once more.
            return AssistantTurn {
                text,
                ..AssistantTurn::default()
            };
        }
        AssistantTurn {
            text,
            tool_calls,
            native: response
                .into_assistant_message_for_tool_use()
                .map(NativeTurn),
        }
    }
}

/// An assistant message for a turn that did not come from genai (e.g. a replayed transcript).
fn assistant_message(turn: &AssistantTurn) -> ChatMessage {
    let mut parts = Vec::new();
    if let Some(text) = &turn.text {
        parts.push(ContentPart::Text(text.clone()));
    }
    parts.extend(turn.tool_calls.iter().map(|call| {
        ContentPart::ToolCall(ToolCall {
            call_id: call.id.clone(),
            fn_name: call.name.clone(),
            fn_arguments: call.arguments.clone(),
            thought_signatures: None,
        })
    }));
    ChatMessage::assistant(MessageContent::from_parts(parts))
}

impl LlmProvider for GenaiProvider {
    fn name(&self) -> &str {
        self.kind.as_str()
    }

    fn model(&self) -> &str {
        &self.model
    }

    fn complete<'a>(
        &'a self,
        request: ProviderRequest<'a>,
    ) -> BoxFuture<'a, Result<AssistantTurn, ProviderError>> {
        Box::pin(async move {
            let chat = self.chat_request(request);
            let model = ModelIden::new(self.kind.adapter(), self.model.as_str());
            let response = self
                .client
                .exec_chat(model, chat, Some(&self.options))
                .await
                .map_err(|error| match classify(self.kind, error) {
                    ProviderError::Timeout { .. } => timeout_error(self.kind, self.timeout),
                    other => other,
                })?;
            Ok(self.turn(response))
        })
    }
}

/// Maps a genai error to a [`ProviderError`] a user can act on.
pub fn classify(kind: ProviderKind, error: genai::Error) -> ProviderError {
    let provider = kind.as_str().to_owned();
    if let Some(status) = error.status() {
        let body = status_body(&error).unwrap_or_default();
        return classify_status(kind, status.as_u16(), error.headers(), body);
    }
    let malformed = |message: String| ProviderError::Malformed {
        provider: provider.clone(),
        message,
    };
    match error {
        genai::Error::WebModelCall { webc_error, .. }
        | genai::Error::WebAdapterCall { webc_error, .. } => match webc_error {
            webc::Error::Reqwest(error) if error.is_timeout() => ProviderError::Timeout {
                provider,
                message: "no answer within the time limit".to_owned(),
            },
            webc::Error::Reqwest(error) if error.is_connect() => ProviderError::Unreachable {
                provider,
                message: format!("connection failed: {}", source_chain(&error)),
            },
            webc::Error::Reqwest(error) if error.is_decode() || error.is_body() => {
                malformed(format!("unreadable body: {error}"))
            }
            webc::Error::Reqwest(error) => ProviderError::Unreachable {
                provider,
                message: source_chain(&error),
            },
            webc::Error::ResponseFailedNotJson { content_type, body } => malformed(format!(
                "expected JSON but got content type '{content_type}': {}",
                truncate(&body)
            )),
            webc::Error::ResponseFailedInvalidJson { cause, .. } => {
                malformed(format!("invalid JSON: {cause}"))
            }
            other => malformed(truncate(&other.to_string())),
        },
        genai::Error::ChatResponseGeneration { cause, .. } => malformed(truncate(&cause)),
        genai::Error::ChatResponse { body, .. } => malformed(provider_message(&body.to_string())),
        genai::Error::NoChatResponse { .. }
        | genai::Error::InvalidJsonResponseElement { .. }
        | genai::Error::SerdeJson(_)
        | genai::Error::JsonValueExt(_)
        | genai::Error::StreamParse { .. } => malformed(truncate(&error.to_string())),
        other => ProviderError::Config {
            provider,
            message: truncate(&other.to_string()),
        },
    }
}

/// Maps an HTTP error status and body to a [`ProviderError`] a user can act on.
pub(super) fn classify_status(
    kind: ProviderKind,
    status: u16,
    headers: Option<&HeaderMap>,
    body: &str,
) -> ProviderError {
    let provider = kind.as_str().to_owned();
    let message = provider_message(body);
    // Gemini answers a bad key with 400 INVALID_ARGUMENT / API_KEY_INVALID.
    let bad_gemini_key = kind == ProviderKind::Gemini
        && status == 400
        && (body.contains("API_KEY_INVALID") || body.contains("API key not valid"));
    match status {
        _ if bad_gemini_key => ProviderError::Auth {
            provider,
            status,
            message,
            hint: format!("Check {}.", kind.key_variable()),
        },
        401 | 403 => ProviderError::Auth {
            provider,
            status,
            message,
            hint: match kind {
                ProviderKind::Ollama => {
                    "Check OLLAMA_HOST and the server's access settings.".to_owned()
                }
                _ => format!("Check {}.", kind.key_variable()),
            },
        },
        429 => ProviderError::RateLimited {
            provider,
            retry_after: retry_after(headers, body),
            message,
        },
        408 | 504 => ProviderError::Timeout { provider, message },
        500..=599 => ProviderError::Server {
            provider,
            status,
            message,
        },
        _ => ProviderError::Request {
            provider,
            status,
            message,
        },
    }
}

fn status_body(error: &genai::Error) -> Option<&str> {
    match error {
        genai::Error::HttpError { body, .. } => Some(body),
        genai::Error::WebModelCall { webc_error, .. }
        | genai::Error::WebAdapterCall { webc_error, .. } => match webc_error {
            webc::Error::ResponseFailedStatus { body, .. } => Some(body),
            _ => None,
        },
        _ => None,
    }
}

/// The human part of a provider error body: OpenAI, Anthropic and Gemini use
/// `{"error": {"message": ..}}`, Ollama `{"error": ".."}`.
pub(super) fn provider_message(body: &str) -> String {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let from_json = parsed.as_ref().and_then(|value| {
        value
            .pointer("/error/message")
            .or_else(|| value.get("error").filter(|error| error.is_string()))
            .or_else(|| value.get("message"))
            .and_then(Value::as_str)
            .map(str::to_owned)
    });
    let text = from_json.unwrap_or_else(|| body.trim().to_owned());
    if text.is_empty() {
        "(no details)".to_owned()
    } else {
        truncate(&text)
    }
}

/// The wait a 429 asks for: `retry-after-ms`, `retry-after` (seconds), or
/// Gemini's `RetryInfo.retryDelay` in the body.
pub fn retry_after(headers: Option<&HeaderMap>, body: &str) -> Option<Duration> {
    let header = |name: &str| {
        headers
            .and_then(|headers| headers.get(name))
            .and_then(|value| value.to_str().ok())
            .map(str::trim)
    };
    let seconds = |text: &str| {
        text.parse::<f64>()
            .ok()
            .filter(|value| value.is_finite() && *value >= 0.0)
            .map(|value| Duration::from_secs_f64(value.min(86_400.0)))
    };
    if let Some(ms) = header("retry-after-ms").and_then(seconds) {
        return Some(ms / 1000);
    }
    if let Some(wait) = header("retry-after").and_then(seconds) {
        return Some(wait);
    }
    let parsed: Value = serde_json::from_str(body).ok()?;
    parsed
        .pointer("/error/details")?
        .as_array()?
        .iter()
        .find_map(|detail| detail.get("retryDelay")?.as_str())
        .and_then(|delay| seconds(delay.trim_end_matches('s')))
}

pub(super) fn source_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    truncate(&text)
}

pub(super) fn truncate(text: &str) -> String {
    let text = text.trim();
    if text.chars().count() <= MAX_ERROR_TEXT {
        return text.to_owned();
    }
    let cut: String = text.chars().take(MAX_ERROR_TEXT).collect();
    format!("{cut}…")
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn ollama_host_accepts_the_forms_ollama_does() {
        assert_eq!(ollama_base_url("localhost"), "http://localhost:11434/");
        assert_eq!(ollama_base_url("10.0.0.5:9999"), "http://10.0.0.5:9999/");
        assert_eq!(
            ollama_base_url("https://ollama.example.com:443/"),
            "https://ollama.example.com:443/"
        );
        assert_eq!(ollama_base_url("[::1]"), "http://[::1]:11434/");
    }

    #[test]
    fn settings_map_google_api_key_and_base_urls() {
        let env = |name: &str| match name {
            "GOOGLE_API_KEY" => Some("g-key".to_owned()),
            "OPENAI_BASE_URL" => Some("http://127.0.0.1:8080/v1".to_owned()),
            "OLLAMA_HOST" => Some("127.0.0.1:11500".to_owned()),
            _ => None,
        };
        let gemini = GenaiSettings::from_env(ProviderKind::Gemini, env).unwrap();
        assert_eq!(gemini.api_key.as_deref(), Some("g-key"));
        let openai = GenaiSettings::from_env(ProviderKind::OpenAi, env).unwrap();
        assert_eq!(openai.api_key, None);
        // A keyless OpenAI-compatible server is fine; the public API without a key is not.
        let provider = GenaiProvider::new(openai).unwrap();
        assert_eq!(provider.base_url(), "http://127.0.0.1:8080/v1/");
        let missing = GenaiProvider::new(GenaiSettings::new(ProviderKind::Anthropic)).unwrap_err();
        assert!(
            missing.to_string().contains("ANTHROPIC_API_KEY"),
            "{missing}"
        );
        let ollama = GenaiSettings::from_env(ProviderKind::Ollama, env).unwrap();
        assert_eq!(ollama.base_url.as_deref(), Some("http://127.0.0.1:11500/"));
        assert!(!format!("{gemini:?}").contains("g-key"));
    }

    #[test]
    fn retry_after_reads_headers_and_gemini_bodies() {
        let mut headers = HeaderMap::new();
        headers.insert("retry-after", HeaderValue::from_static("7"));
        assert_eq!(
            retry_after(Some(&headers), ""),
            Some(Duration::from_secs(7))
        );
        headers.insert("retry-after-ms", HeaderValue::from_static("250"));
        assert_eq!(
            retry_after(Some(&headers), ""),
            Some(Duration::from_millis(250))
        );
        let body = r#"{"error":{"code":429,"details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"13s"}]}}"#;
        assert_eq!(retry_after(None, body), Some(Duration::from_secs(13)));
        assert_eq!(retry_after(None, "not json"), None);
    }

    #[test]
    fn provider_messages_are_extracted_and_bounded() {
        assert_eq!(
            provider_message(r#"{"error":{"message":"Incorrect API key provided"}}"#),
            "Incorrect API key provided"
        );
        assert_eq!(
            provider_message(r#"{"error":"model not found"}"#),
            "model not found"
        );
        assert_eq!(provider_message(""), "(no details)");
        assert!(provider_message(&"x".repeat(1000)).chars().count() <= MAX_ERROR_TEXT + 1);
    }
}
