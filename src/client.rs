//! A typed client for Proxi's REST API, used by the CLI, the agent and the demo.

use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::StatusCode;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::api::{
    AuditPage, AuditRecord, Catalog, ErrorBody, ExecuteRequest, Health, IncidentRequest,
    IncidentResponse, InfrastructureStatus, PolicyStatus, SetModeRequest, ToolResponse,
};
use crate::server::ServerInfo;
use crate::tokens::TokensFile;

/// Where a CLI finds the server when told nothing.
pub const DEFAULT_SERVER_URL: &str = "http://127.0.0.1:8000";

/// Failures talking to a Proxi server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server could not be reached.
    #[error("cannot reach the Proxi server at {url}: {message}")]
    Unreachable {
        /// The URL tried.
        url: String,
        /// Why.
        message: String,
    },
    /// The server answered with an error.
    #[error("the server answered {status}: {message}")]
    Status {
        /// HTTP status.
        status: u16,
        /// The server's error message.
        message: String,
    },
    /// The answer was not what the API promises.
    #[error("unexpected answer from the server: {0}")]
    Decode(String),
    /// The client could not be built.
    #[error("invalid client configuration: {0}")]
    Config(String),
    /// An argument the caller gave cannot be sent as it is (e.g. not an approval id).
    #[error("{0}")]
    InvalidArgument(String),
    /// The data dir's `server.json` cannot be trusted.
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
}

/// Why a `server.json` is not used. Anyone who can write the data dir (under
/// `proxi mcp`, the agent) can write that file, and the CLI would send the operator
/// token to whatever URL it names.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The URL is not on this machine's loopback interface.
    #[error(
        "{file} names {url}, which is not a loopback URL; refusing to send a token there. Pass --server URL (or set PROXI_SERVER) to use that server"
    )]
    NotLoopback {
        /// The server file.
        file: PathBuf,
        /// The URL it names (truncated).
        url: String,
    },
    /// The process that wrote the file is gone.
    #[error(
        "{file} names process {pid}, which is not running (the file is stale or forged); refusing to send a token to {url}. Pass --server URL"
    )]
    DeadProcess {
        /// The server file.
        file: PathBuf,
        /// The pid it names.
        pid: u32,
        /// The URL it names (truncated).
        url: String,
    },
    /// The file exists but is not a server file.
    #[error("{0} is malformed; pass --server URL")]
    Malformed(PathBuf),
}

/// A connection to one Proxi server with one token.
#[derive(Clone, Debug)]
pub struct ProxiClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl ProxiClient {
    /// A client for `base_url` that sends `token` as a bearer token.
    pub fn new(base_url: &str, token: Option<String>) -> Result<ProxiClient, ClientError> {
        let base = base_url.trim_end_matches('/').to_owned();
        crate::tls::install_crypto_provider();
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(60));
        if is_loopback(&base) {
            // A proxy from the environment must not see local tokens.
            builder = builder.no_proxy();
        }
        let http = builder
            .build()
            .map_err(|error| ClientError::Config(error.to_string()))?;
        Ok(ProxiClient { base, token, http })
    }

    /// The server's base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The bearer token this client sends, if any.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// `GET /`.
    pub async fn health(&self) -> Result<Health, ClientError> {
        self.get("/").await
    }

    /// `GET /policy/status`.
    pub async fn policy_status(&self) -> Result<PolicyStatus, ClientError> {
        self.get("/policy/status").await
    }

    /// `POST /policy/set-mode`.
    pub async fn set_mode(&self, request: &SetModeRequest) -> Result<PolicyStatus, ClientError> {
        self.post("/policy/set-mode", request).await
    }

    /// `POST /policy/reload` (operator token): the server reads its policy file
    /// again. A refused file is an error whose message lists the problems.
    pub async fn reload_policy(&self) -> Result<crate::gateway::ReloadReport, ClientError> {
        self.post("/policy/reload", &serde_json::json!({})).await
    }

    /// `GET /tools/catalog`.
    pub async fn catalog(&self) -> Result<Catalog, ClientError> {
        self.get("/tools/catalog").await
    }

    /// `GET /infrastructure/status`.
    pub async fn infrastructure(&self) -> Result<InfrastructureStatus, ClientError> {
        self.get("/infrastructure/status").await
    }

    /// `POST /infrastructure/simulate-incident`.
    pub async fn simulate_incident(
        &self,
        request: &IncidentRequest,
    ) -> Result<IncidentResponse, ClientError> {
        self.post("/infrastructure/simulate-incident", request)
            .await
    }

    /// `GET /approvals?status=...&limit=N` (operator token), newest first.
    pub async fn approvals(
        &self,
        status: Option<crate::approval::ApprovalStatus>,
        limit: usize,
    ) -> Result<crate::api::ApprovalList, ClientError> {
        let path = match status {
            Some(status) => format!("/approvals?status={status}&limit={limit}"),
            None => format!("/approvals?limit={limit}"),
        };
        self.get(&path).await
    }

    /// `POST /approvals/{id}/approve` or `/deny` (operator token), with the reason
    /// the audit record keeps.
    pub async fn decide_approval(
        &self,
        id: &str,
        approve: bool,
        reason: &str,
    ) -> Result<crate::approval::Approval, ClientError> {
        if !crate::approval::is_approval_id(id) {
            return Err(ClientError::InvalidArgument(format!(
                "{id:?} is not an approval id (apr_ and hex digits)"
            )));
        }
        let verdict = if approve { "approve" } else { "deny" };
        let request = crate::api::ApprovalDecisionRequest {
            reason: reason.to_owned(),
        };
        self.post(&format!("/approvals/{id}/{verdict}"), &request)
            .await
    }

    /// `GET /audit?limit=N`.
    pub async fn audit(&self, limit: u32) -> Result<AuditPage, ClientError> {
        self.get(&format!("/audit?limit={limit}")).await
    }

    /// Opens `GET /audit/stream` with these filters (`tool`, `decision`, ...), after
    /// `last_event_id` if given (a resume), else after `after_seq`, else at the head.
    ///
    /// The stream has no overall timeout; a connection silent for longer than
    /// three keep-alive intervals counts as dead.
    pub async fn audit_stream(
        &self,
        filters: &[(&str, String)],
        last_event_id: Option<u64>,
    ) -> Result<AuditStream, ClientError> {
        let mut url = reqwest::Url::parse(&self.url("/audit/stream"))
            .map_err(|error| ClientError::Config(error.to_string()))?;
        for (name, value) in filters {
            url.query_pairs_mut().append_pair(name, value);
        }
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .read_timeout(Duration::from_secs(45));
        if is_loopback(&self.base) {
            builder = builder.no_proxy();
        }
        let http = builder
            .build()
            .map_err(|error| ClientError::Config(error.to_string()))?;
        let mut request = self.authorize(http.get(url));
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id.to_string());
        }
        let response = request
            .send()
            .await
            .map_err(|error| self.unreachable(error))?;
        let status = response.status();
        if !status.is_success() {
            let bytes = response.bytes().await.unwrap_or_default();
            return Err(status_error(status, &bytes));
        }
        Ok(AuditStream {
            body: Box::pin(response.bytes_stream()),
            buffer: Vec::new(),
        })
    }

    /// `POST /tools/execute`; policy refusals and tool failures are answers, not errors.
    pub async fn execute(&self, tool: &str, arguments: Value) -> Result<ToolResponse, ClientError> {
        self.execute_request(&ExecuteRequest {
            tool_name: tool.to_owned(),
            arguments,
            context: Default::default(),
            wait_for_approval_seconds: None,
        })
        .await
    }

    /// `POST /tools/execute` with `wait_for_approval_seconds`: a call that waits
    /// for a human's approval is held by the server until an operator decides
    /// (then run once, or refused) or the hold ends (the server holds at most
    /// about 25 s, then answers 202 again). `wait_seconds` is capped at
    /// [`crate::api::MAX_APPROVAL_WAIT_SECONDS`].
    pub async fn execute_held(
        &self,
        tool: &str,
        arguments: Value,
        wait_seconds: u64,
    ) -> Result<ToolResponse, ClientError> {
        self.execute_request(&ExecuteRequest {
            tool_name: tool.to_owned(),
            arguments,
            context: Default::default(),
            wait_for_approval_seconds: Some(
                wait_seconds.clamp(1, crate::api::MAX_APPROVAL_WAIT_SECONDS),
            ),
        })
        .await
    }

    async fn execute_request(&self, request: &ExecuteRequest) -> Result<ToolResponse, ClientError> {
        let response = self
            .authorize(self.http.post(self.url("/tools/execute")))
            .json(request)
            .send()
            .await
            .map_err(|error| self.unreachable(error))?;
        let response_status = response.status();
        match response_status {
            StatusCode::OK
            | StatusCode::ACCEPTED
            | StatusCode::BAD_REQUEST
            | StatusCode::FORBIDDEN
            | StatusCode::CONFLICT
            | StatusCode::UNPROCESSABLE_ENTITY
            | StatusCode::TOO_MANY_REQUESTS => {
                let bytes = response
                    .bytes()
                    .await
                    .map_err(|error| ClientError::Decode(error.to_string()))?;
                // A 403 from authorization, or a 400 for a malformed request,
                // carries an ErrorBody, not a ToolResponse.
                let status = response_status;
                match serde_json::from_slice::<ToolResponse>(&bytes) {
                    Ok(answer) => Ok(answer),
                    Err(_) => Err(status_error(status, &bytes)),
                }
            }
            status => {
                let bytes = response.bytes().await.unwrap_or_default();
                Err(status_error(status, &bytes))
            }
        }
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let request = self.authorize(self.http.get(self.url(path)));
        self.send(request).await
    }

    async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let request = self.authorize(self.http.post(self.url(path))).json(body);
        self.send(request).await
    }

    async fn send<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let response = request
            .send()
            .await
            .map_err(|error| self.unreachable(error))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|error| ClientError::Decode(error.to_string()))?;
        if !status.is_success() {
            return Err(status_error(status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|error| ClientError::Decode(error.to_string()))
    }

    fn authorize(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn unreachable(&self, error: reqwest::Error) -> ClientError {
        let message = if error.is_timeout() {
            "the request timed out".to_owned()
        } else if error.is_connect() {
            "connection refused or failed; is `proxi serve` running?".to_owned()
        } else {
            error.to_string()
        };
        ClientError::Unreachable {
            url: self.base.clone(),
            message,
        }
    }
}

/// Longest single event `AuditStream` accepts (a record is bounded far below it).
const MAX_EVENT_BYTES: usize = 1024 * 1024;

/// An open `GET /audit/stream`: the records the server commits, in order.
pub struct AuditStream {
    body: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<axum::body::Bytes>> + Send>>,
    buffer: Vec<u8>,
}

impl AuditStream {
    /// The next record; `None` when the server ended the stream (it drops a
    /// client that falls too far behind: resume after the last seq seen).
    pub async fn next(&mut self) -> Result<Option<AuditRecord>, ClientError> {
        use futures::StreamExt;
        loop {
            if let Some(end) = self.buffer.windows(2).position(|pair| pair == b"\n\n") {
                let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
                if let Some(record) = record_event(&block)? {
                    return Ok(Some(record));
                }
                continue;
            }
            if self.buffer.len() > MAX_EVENT_BYTES {
                return Err(ClientError::Decode(
                    "an audit event is too large".to_owned(),
                ));
            }
            match self.body.next().await {
                Some(Ok(chunk)) => self.buffer.extend_from_slice(&chunk),
                Some(Err(error)) => return Err(ClientError::Decode(error.to_string())),
                None => return Ok(None),
            }
        }
    }
}

/// The record in one SSE event block, if it is a `record` event (keep-alive
/// comments and other events are skipped).
fn record_event(block: &[u8]) -> Result<Option<AuditRecord>, ClientError> {
    let text =
        std::str::from_utf8(block).map_err(|error| ClientError::Decode(error.to_string()))?;
    let mut event = "message";
    let mut data = String::new();
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("event:") {
            event = name.trim();
        } else if let Some(value) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(value.strip_prefix(' ').unwrap_or(value));
        }
    }
    if event != "record" || data.is_empty() {
        return Ok(None);
    }
    serde_json::from_str(&data)
        .map(Some)
        .map_err(|error| ClientError::Decode(error.to_string()))
}

fn status_error(status: StatusCode, body: &[u8]) -> ClientError {
    let message = serde_json::from_slice::<ErrorBody>(body)
        .map(|body| body.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).chars().take(200).collect());
    ClientError::Status {
        status: status.as_u16(),
        message,
    }
}

fn is_loopback(url: &str) -> bool {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .unwrap_or(url);
    rest.starts_with("127.") || rest.starts_with("localhost") || rest.starts_with("[::1]")
}

/// The server URL a local CLI should use: explicit, else the data dir's `server.json`
/// (only a loopback URL, written by a process that is still running), else the default.
pub fn resolve_server_url(explicit: Option<&str>, data_dir: &Path) -> Result<String, ClientError> {
    if let Some(url) = explicit {
        return Ok(url.to_owned());
    }
    let file = data_dir.join(crate::server::SERVER_FILE);
    if !file.exists() {
        return Ok(DEFAULT_SERVER_URL.to_owned());
    }
    let info = ServerInfo::read(data_dir).ok_or_else(|| DiscoveryError::Malformed(file.clone()))?;
    let url: String = info.url.chars().take(200).collect();
    if !is_loopback_url(&info.url) {
        return Err(DiscoveryError::NotLoopback { file, url }.into());
    }
    if !info.process_is_alive() {
        return Err(DiscoveryError::DeadProcess {
            file,
            pid: info.pid,
            url,
        }
        .into());
    }
    Ok(info.url)
}

/// True for an `http(s)` URL whose host is a loopback IP address or `localhost`.
pub fn is_loopback_url(url: &str) -> bool {
    let Ok(parsed) = reqwest::Url::parse(url) else {
        return false;
    };
    if !matches!(parsed.scheme(), "http" | "https") || !parsed.username().is_empty() {
        return false;
    }
    let Some(host) = parsed.host_str() else {
        return false;
    };
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    match bare.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => host.eq_ignore_ascii_case("localhost"),
    }
}

/// A token from the environment variable `env`, else from the data dir's tokens file.
pub fn resolve_token(env_value: Option<String>, data_dir: &Path, operator: bool) -> Option<String> {
    env_value.filter(|token| !token.is_empty()).or_else(|| {
        let file = TokensFile::read(data_dir).ok()?;
        if operator {
            file.operator_token
        } else {
            file.agent_token
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_urls_are_recognised() {
        assert!(is_loopback("http://127.0.0.1:8000"));
        assert!(is_loopback("http://localhost:1"));
        assert!(is_loopback("http://[::1]:80"));
        assert!(!is_loopback("https://proxi.example.com"));
    }

    #[test]
    fn explicit_urls_win_over_the_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            resolve_server_url(None, dir.path()).unwrap(),
            DEFAULT_SERVER_URL
        );
        std::fs::write(
            dir.path().join(crate::server::SERVER_FILE),
            r#"{"url":"http://127.0.0.1:9999","pid":1}"#,
        )
        .unwrap();
        assert_eq!(
            resolve_server_url(None, dir.path()).unwrap(),
            "http://127.0.0.1:9999"
        );
        assert_eq!(
            resolve_server_url(Some("http://10.0.0.1:1"), dir.path()).unwrap(),
            "http://10.0.0.1:1"
        );
    }

    #[test]
    fn only_loopback_urls_count_as_loopback() {
        for url in [
            "http://127.0.0.1:8000",
            "http://127.9.9.9:1/",
            "http://[::1]:80",
            "http://LOCALHOST:1",
        ] {
            assert!(is_loopback_url(url), "{url}");
        }
        for url in [
            "http://192.0.2.1:80",
            "http://127.0.0.1.evil.example:80",
            "http://localhost.evil.example",
            "http://user@127.0.0.1:1",
            "file:///tmp/x",
            "not a url",
        ] {
            assert!(!is_loopback_url(url), "{url}");
        }
    }
}
