//! The console's login, session cookie, CSRF and headers over plain HTTP (the
//! browser test drives the page itself; this checks what a browser relies on).

mod common;

use common::{AGENT_TOKEN, OPERATOR_TOKEN, TestServer};
use reqwest::StatusCode;
use reqwest::header::{
    CONTENT_SECURITY_POLICY, CONTENT_TYPE, COOKIE, LOCATION, ORIGIN, SET_COOKIE,
};
use serde_json::{Value, json};

/// Tokens and CSRF tokens are URL-safe, so form bodies need no encoding here.
const FORM: &str = "application/x-www-form-urlencoded";

fn client() -> reqwest::Client {
    proxi::tls::install_crypto_provider();
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client builds")
}

async fn login(server: &TestServer, token: &str, origin: Option<&str>) -> reqwest::Response {
    let mut request = client()
        .post(format!("{}/console/login", server.url))
        .header(CONTENT_TYPE, FORM)
        .body(format!("token={token}"));
    if let Some(origin) = origin {
        request = request.header(ORIGIN, origin);
    }
    request.send().await.expect("login is sent")
}

/// Logs in with the operator token: the cookie pair and the page's CSRF token.
async fn session(server: &TestServer) -> (String, String) {
    let response = login(server, OPERATOR_TOKEN, Some(&server.url)).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let cookie = response.headers()[SET_COOKIE]
        .to_str()
        .expect("cookie")
        .split(';')
        .next()
        .expect("pair")
        .to_owned();
    let page = client()
        .get(format!("{}/console", server.url))
        .header(COOKIE, &cookie)
        .send()
        .await
        .expect("page")
        .text()
        .await
        .expect("text");
    let csrf = page
        .split(r#"<meta name="csrf-token" content=""#)
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the page carries a CSRF token")
        .to_owned();
    (cookie, csrf)
}

async fn set_mode(
    server: &TestServer,
    cookie: &str,
    csrf: Option<&str>,
    origin: Option<&str>,
) -> (StatusCode, Value) {
    let mut request = client()
        .post(format!("{}/console/api/mode", server.url))
        .header(COOKIE, cookie)
        .json(&json!({"mode": "EMERGENCY", "reason": "console test", "ttl_seconds": 600}));
    if let Some(csrf) = csrf {
        request = request.header("X-CSRF-Token", csrf);
    }
    if let Some(origin) = origin {
        request = request.header(ORIGIN, origin);
    }
    let response = request.send().await.expect("sent");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn only_the_operator_token_logs_in_and_the_cookie_is_locked_down() {
    let server = TestServer::start().await;
    let refused = login(&server, AGENT_TOKEN, Some(&server.url)).await;
    assert_eq!(refused.status(), StatusCode::FORBIDDEN);
    assert!(refused.headers().get(SET_COOKIE).is_none());
    let wrong = login(&server, "not-a-token", None).await;
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert!(wrong.headers().get(SET_COOKIE).is_none());
    assert!(
        wrong.text().await.expect("page").contains("not valid"),
        "the login page says why"
    );
    // Both refusals are in the trail.
    let records = server.gateway().audit().recent(100).expect("trail");
    let refusals: Vec<_> = records
        .iter()
        .filter(|record| record.kind == "auth_refused")
        .collect();
    assert_eq!(refusals.len(), 2, "{refusals:?}");

    let accepted = login(&server, OPERATOR_TOKEN, Some(&server.url)).await;
    assert_eq!(accepted.status(), StatusCode::SEE_OTHER);
    assert_eq!(accepted.headers()[LOCATION], "/console");
    let cookie = accepted.headers()[SET_COOKIE].to_str().expect("cookie");
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/console", "Max-Age="] {
        assert!(cookie.contains(attribute), "{cookie}");
    }
    assert!(!cookie.contains("Secure"), "plain HTTP: {cookie}");
    // Behind a TLS terminator the browser's Origin is https: the cookie is Secure.
    let port = server.url.rsplit(':').next().expect("port");
    let tls = login(
        &server,
        OPERATOR_TOKEN,
        Some(&format!("https://localhost:{port}")),
    )
    .await;
    assert!(
        tls.headers()[SET_COOKIE]
            .to_str()
            .expect("cookie")
            .contains("; Secure")
    );
}

#[tokio::test]
async fn the_page_has_a_strict_csp_and_embedded_assets_only() {
    let server = TestServer::start().await;
    let response = client()
        .get(format!("{}/console", server.url))
        .send()
        .await
        .expect("page");
    assert_eq!(response.status(), StatusCode::OK);
    let csp = response.headers()[CONTENT_SECURITY_POLICY]
        .to_str()
        .expect("csp")
        .to_owned();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert!(csp.contains("script-src 'self'"), "{csp}");
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(response.headers()["x-frame-options"], "DENY");
    let login_page = response.text().await.expect("text");
    assert!(login_page.contains(r#"type="password""#), "{login_page}");

    let (cookie, _) = session(&server).await;
    let page = client()
        .get(format!("{}/console", server.url))
        .header(COOKIE, &cookie)
        .send()
        .await
        .expect("page")
        .text()
        .await
        .expect("text");
    assert!(!page.contains("<script>"), "no inline script");
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "no external asset"
    );
    for asset in ["/console/app.js", "/console/app.css"] {
        let response = client()
            .get(format!("{}{asset}", server.url))
            .send()
            .await
            .expect("asset");
        assert_eq!(response.status(), StatusCode::OK, "{asset}");
    }
}

#[tokio::test]
async fn a_mode_change_needs_the_csrf_token_and_an_origin() {
    let server = TestServer::start().await;
    let (cookie, csrf) = session(&server).await;
    let origin = server.url.clone();
    let (status, _) = set_mode(&server, &cookie, None, Some(&origin)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = set_mode(&server, &cookie, Some("forged"), Some(&origin)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = set_mode(&server, &cookie, Some(&csrf), None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = set_mode(
        &server,
        &cookie,
        Some(&csrf),
        Some("http://attacker.example"),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(server.gateway().status().mode, "NORMAL");

    let (status, body) = set_mode(&server, &cookie, Some(&csrf), Some(&origin)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["mode"], "EMERGENCY");
    assert_eq!(body["changed_by"], "operator");
    assert!(body["emergency_expires_at"].is_string(), "{body}");
}

#[tokio::test]
async fn console_endpoints_take_the_cookie_only_and_logout_ends_the_session() {
    let server = TestServer::start().await;
    let overview = format!("{}/console/api/overview", server.url);
    // A bearer token is not a console session, even the operator's.
    let response = client()
        .get(&overview)
        .bearer_auth(OPERATOR_TOKEN)
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

    let (cookie, csrf) = session(&server).await;
    let response = client()
        .get(&overview)
        .header(COOKIE, &cookie)
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["status"]["mode"], "NORMAL");
    assert_eq!(body["infrastructure"]["fleet_size"], 3);

    // Logout needs the CSRF token as well.
    let logout = |csrf: String| {
        client()
            .post(format!("{}/console/logout", server.url))
            .header(COOKIE, &cookie)
            .header(ORIGIN, &server.url)
            .header(CONTENT_TYPE, FORM)
            .body(format!("csrf={csrf}"))
            .send()
    };
    assert_eq!(
        logout("forged".to_owned()).await.expect("sent").status(),
        StatusCode::FORBIDDEN
    );
    let response = logout(csrf).await.expect("sent");
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert!(
        response.headers()[SET_COOKIE]
            .to_str()
            .expect("cookie")
            .contains("Max-Age=0")
    );
    let response = client()
        .get(&overview)
        .header(COOKIE, &cookie)
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

    // The Host check of /mcp protects the console too.
    let response = client()
        .get(format!("{}/console", server.url))
        .header("Host", "attacker.example")
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn a_console_session_may_use_the_connections_kept_for_operators() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().expect("temp dir");
    let server = common::ServerProcess::start(
        dir.path(),
        &["--max-connections", "16", "--durability", "process"],
    );
    let response = client()
        .post(format!("{}/console/login", server.url))
        .header(ORIGIN, &server.url)
        .header(CONTENT_TYPE, FORM)
        .body(format!("token={OPERATOR_TOKEN}"))
        .send()
        .await
        .expect("login");
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let cookie = response.headers()[SET_COOKIE]
        .to_str()
        .expect("cookie")
        .split(';')
        .next()
        .expect("pair")
        .to_owned();
    // Agent requests that never finish their bodies hold every connection they may.
    let address = server.url.trim_start_matches("http://").to_owned();
    let mut dripping = Vec::new();
    for _ in 0..24 {
        let mut stream = std::net::TcpStream::connect(&address).expect("connect");
        stream
            .write_all(
                format!(
                    "POST /tools/execute HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {AGENT_TOKEN}\r\n\
                     Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"tool_name\""
                )
                .as_bytes(),
            )
            .expect("headers and a first byte are sent");
        dripping.push(stream);
    }
    let response = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        client()
            .get(format!("{}/console/api/overview", server.url))
            .header(COOKIE, &cookie)
            .send(),
    )
    .await
    .expect("the console is answered in time")
    .expect("sent");
    assert_eq!(response.status(), StatusCode::OK);
}

/// Logs in at `url` with `token` (which must open the console): the cookie pair
/// and the page's CSRF token.
async fn session_at(url: &str, token: &str) -> (String, String) {
    let response = client()
        .post(format!("{url}/console/login"))
        .header(ORIGIN, url)
        .header(CONTENT_TYPE, FORM)
        .body(format!("token={token}"))
        .send()
        .await
        .expect("login is sent");
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let cookie = response.headers()[SET_COOKIE]
        .to_str()
        .expect("cookie")
        .split(';')
        .next()
        .expect("pair")
        .to_owned();
    let page = client()
        .get(format!("{url}/console"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .expect("page")
        .text()
        .await
        .expect("text");
    let csrf = page
        .split(r#"<meta name="csrf-token" content=""#)
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the page carries a CSRF token")
        .to_owned();
    (cookie, csrf)
}

/// How a console decision request is sent: which session headers it carries.
struct Decision<'a> {
    url: &'a str,
    cookie: Option<&'a str>,
    csrf: Option<&'a str>,
    origin: bool,
    bearer: Option<&'a str>,
}

impl Decision<'_> {
    async fn send(&self, id: &str, verdict: &str, body: Value) -> (StatusCode, Value) {
        let url = self.url;
        let mut request = client()
            .post(format!("{url}/console/api/approvals/{id}/{verdict}"))
            .json(&body);
        if let Some(cookie) = self.cookie {
            request = request.header(COOKIE, cookie);
        }
        if let Some(csrf) = self.csrf {
            request = request.header("X-CSRF-Token", csrf);
        }
        if self.origin {
            request = request.header(ORIGIN, url);
        }
        if let Some(token) = self.bearer {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("sent");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }
}

async fn console_pending(url: &str, cookie: &str) -> Vec<Value> {
    let response = client()
        .get(format!("{url}/console/api/approvals"))
        .header(COOKIE, cookie)
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.expect("json");
    body["approvals"].as_array().expect("approvals").clone()
}

#[tokio::test]
async fn console_approvals_need_the_session_and_csrf_and_record_the_operator() {
    use common::approvals::{listed, request_scale, write_approval_policy};
    let dir = tempfile::tempdir().expect("temp dir");
    let policy_dir = tempfile::tempdir().expect("temp dir");
    let policy = write_approval_policy(policy_dir.path(), 600, "console approvals");
    let server =
        common::ServerProcess::start_with_policy(dir.path(), &policy, &["--durability", "process"]);
    let alice = common::identities::add_token(dir.path(), "alice", "operator");
    let api = common::Api::new(&server.url);
    api.emergency().await;
    let id = request_scale(&api, 8).await;

    let (cookie, csrf) = session_at(&server.url, &alice).await;
    let pending = console_pending(&server.url, &cookie).await;
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!(pending[0]["id"], id.as_str());
    assert_eq!(pending[0]["principal"], "agent");
    assert_eq!(pending[0]["target"], "scale_fleet");
    assert_eq!(pending[0]["arguments"], json!({"count": 8}));

    // Bearer tokens are not console sessions: the list and the decisions refuse them.
    for token in [AGENT_TOKEN, OPERATOR_TOKEN] {
        let response = client()
            .get(format!("{}/console/api/approvals", server.url))
            .bearer_auth(token)
            .send()
            .await
            .expect("sent");
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let bearer = Decision {
            url: &server.url,
            cookie: None,
            csrf: None,
            origin: true,
            bearer: Some(token),
        };
        let (status, _) = bearer.send(&id, "approve", json!({"reason": "x"})).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }

    // CSRF token and Origin are required.
    let reason = json!({"reason": "checked the capacity"});
    for (csrf, origin) in [
        (None, true),
        (Some("forged"), true),
        (Some(csrf.as_str()), false),
    ] {
        let attempt = Decision {
            url: &server.url,
            cookie: Some(&cookie),
            csrf,
            origin,
            bearer: None,
        };
        let (status, body) = attempt.send(&id, "approve", reason.clone()).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    }
    assert_eq!(listed(&api, "pending").await, vec![id.clone()]);

    let alice_decides = Decision {
        url: &server.url,
        cookie: Some(&cookie),
        csrf: Some(&csrf),
        origin: true,
        bearer: None,
    };
    // Bad ids and bad reasons: clear 4xx, nothing decided.
    let (status, body) = alice_decides
        .send("not-an-id", "approve", reason.clone())
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"]
            .as_str()
            .expect("error")
            .contains("approval id"),
        "{body}"
    );
    let unknown = format!("apr_{}", "0".repeat(32));
    let (status, body) = alice_decides.send(&unknown, "deny", reason.clone()).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = alice_decides
        .send(&id, "approve", json!({"reason": "x".repeat(501)}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"].as_str().expect("error").contains("500"),
        "{body}"
    );
    let (status, body) = alice_decides
        .send(&id, "approve", json!({"reason": "  "}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = alice_decides.send(&id, "approve", json!({})).await;
    assert!(status.is_client_error(), "{status} {body}");
    assert_eq!(listed(&api, "pending").await, vec![id.clone()]);

    // The named operator approves; the record names alice, and the call runs once.
    let (status, body) = alice_decides.send(&id, "approve", reason.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "approved", "{body}");
    assert_eq!(body["decided_by"], "alice", "{body}");
    let records = api.audit(50).await;
    let decided = records
        .iter()
        .find(|record| record["kind"] == "approval" && record["outcome"] == "approved")
        .expect("the decision is recorded");
    assert_eq!(decided["principal"], "alice", "{decided}");
    assert_eq!(decided["detail"]["requested_by"], "agent", "{decided}");
    let (status, body) = api.execute("scale_fleet", json!({"count": 8})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(console_pending(&server.url, &cookie).await.is_empty());
    // Decided already: a conflict, said so.
    let (status, body) = alice_decides.send(&id, "deny", reason.clone()).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");

    // An operator cannot decide its own request: alice's own call, from her session.
    let (status, body) = api
        .post(
            "/tools/execute",
            Some(&alice),
            json!({"tool_name": "scale_fleet", "arguments": {"count": 9}}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let own = body["approval_id"]
        .as_str()
        .expect("approval_id")
        .to_owned();
    let (status, body) = alice_decides.send(&own, "approve", reason.clone()).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body["error"]
            .as_str()
            .expect("error")
            .contains("request it made itself"),
        "{body}"
    );
    // The built-in operator's session may: another holder.
    let (cookie, csrf) = session_at(&server.url, OPERATOR_TOKEN).await;
    let operator_decides = Decision {
        url: &server.url,
        cookie: Some(&cookie),
        csrf: Some(&csrf),
        origin: true,
        bearer: None,
    };
    let (status, body) = operator_decides.send(&own, "deny", reason.clone()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "denied", "{body}");
    assert_eq!(body["decided_by"], "operator", "{body}");
}

/// Reads `approvals` events from a console approvals stream until one's pending
/// list satisfies `check` (bounded: panics after 10 s), and returns that list.
async fn next_approvals(
    response: &mut reqwest::Response,
    buffer: &mut String,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    next_event(response, buffer, "approvals", what, check).await
}

/// Reads events named `name` from a console stream until one's data satisfies
/// `check` (bounded: panics after 10 s), and returns that data.
async fn next_event(
    response: &mut reqwest::Response,
    buffer: &mut String,
    name: &str,
    what: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let event_line = format!("event: {name}");
    loop {
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            if !event.lines().any(|line| line == event_line) {
                continue;
            }
            let data = event
                .lines()
                .filter_map(|line| line.strip_prefix("data: "))
                .collect::<String>();
            let data: Value = serde_json::from_str(&data).expect("the event is JSON");
            if check(&data) {
                return data;
            }
        }
        let chunk = tokio::time::timeout_at(deadline, response.chunk())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .expect("read")
            .expect("the stream stays open");
        buffer.push_str(&String::from_utf8_lossy(&chunk));
    }
}

#[tokio::test]
async fn the_approvals_stream_follows_requests_and_expiries() {
    let policy_dir = tempfile::tempdir().expect("temp dir");
    let policy =
        common::approvals::write_approval_policy(policy_dir.path(), 1, "console stream test");
    let server = TestServer::start_with_policy(&policy).await;
    let (cookie, _) = session(&server).await;
    let url = format!("{}/console/api/approvals/stream", server.url);
    let refused = client()
        .get(&url)
        .bearer_auth(OPERATOR_TOKEN)
        .send()
        .await
        .expect("sent");
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    let mut response = client()
        .get(&url)
        .header(COOKIE, &cookie)
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), StatusCode::OK);
    let mut buffer = String::new();
    next_approvals(&mut response, &mut buffer, "the first list", |list| {
        list["count"] == 0
    })
    .await;

    // A new request is pushed...
    let api = server.api();
    api.emergency().await;
    let id = common::approvals::request_scale(&api, 8).await;
    let list = next_approvals(&mut response, &mut buffer, "the new request", |list| {
        list["count"] == 1
    })
    .await;
    assert_eq!(list["approvals"][0]["id"], id.as_str(), "{list}");
    // ...and so is its expiry (one second later), with no request from the page.
    next_approvals(&mut response, &mut buffer, "the expiry", |list| {
        list["count"] == 0
    })
    .await;
    assert_eq!(
        common::approvals::listed(&api, "expired").await,
        vec![id.clone()]
    );
}

/// Before, the console learnt an upstream's health only when it fetched the
/// overview (at load, or after an audit record), so a crash showed late or not at all.
#[tokio::test]
async fn the_status_stream_pushes_an_upstreams_crash_and_its_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let policy = json!({
        "description": "console: an upstream that crashes on request.",
        "default_mode": "NORMAL",
        "max_emergency_ttl_seconds": 3600,
        "upstreams": {"fx": {
            "command": common::upstream::python().display().to_string(),
            "args": [common::upstream::fixture_script().display().to_string()],
            "required": true
        }},
        "modes": {
            "NORMAL": {"allowed_tools": ["fx__echo", "fx__crash"]},
            "EMERGENCY": {"allowed_tools": ["fx__echo", "fx__crash"]}
        }
    });
    let policy = common::write_policy(dir.path(), "policy.json", &policy.to_string());
    let server = common::ServerProcess::start_with_policy(&dir.path().join("data"), &policy, &[]);
    let (cookie, _) = session_at(&server.url, OPERATOR_TOKEN).await;
    let mut response = client()
        .get(format!("{}/console/api/status/stream", server.url))
        .header(COOKIE, &cookie)
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), StatusCode::OK);
    let mut buffer = String::new();
    next_event(
        &mut response,
        &mut buffer,
        "status",
        "the first status",
        |_| true,
    )
    .await;

    let fx_up = |up: bool| {
        move |list: &Value| {
            list.as_array()
                .and_then(|list| list.iter().find(|upstream| upstream["name"] == "fx"))
                .is_some_and(|fx| fx["up"] == json!(up))
        }
    };
    let api = common::Api::new(&server.url);
    let (_, body) = api.execute("fx__crash", json!({})).await;
    assert_eq!(body["success"], false, "{body}");
    let down = next_event(
        &mut response,
        &mut buffer,
        "upstreams",
        "fx down",
        fx_up(false),
    )
    .await;
    assert_eq!(down[0]["transport"], "stdio", "{down}");
    // The supervisor starts it again, and the page hears of that too.
    next_event(
        &mut response,
        &mut buffer,
        "upstreams",
        "fx up again",
        fx_up(true),
    )
    .await;
    server.terminate();
}

#[tokio::test]
async fn the_overview_lists_the_policys_upstreams_and_their_health() {
    let dir = tempfile::tempdir().expect("temp dir");
    let policy_dir = tempfile::tempdir().expect("temp dir");
    // An upstream that exits at once: declared, never up, and not required.
    let mut policy: Value =
        serde_json::from_str(&std::fs::read_to_string(common::policy_path()).expect("policy"))
            .expect("JSON");
    policy["simulated_cloud"] = json!(true);
    policy["upstreams"] = json!({"broken": {"command": "true"}});
    let policy = common::write_policy(policy_dir.path(), "policy.json", &policy.to_string());
    let server = common::ServerProcess::start_with_policy(dir.path(), &policy, &[]);
    let (cookie, _) = session_at(&server.url, OPERATOR_TOKEN).await;
    let response = client()
        .get(format!("{}/console/api/overview", server.url))
        .header(COOKIE, &cookie)
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.expect("json");
    let upstreams = body["upstreams"].as_array().expect("upstreams");
    assert_eq!(upstreams.len(), 1, "{body}");
    assert_eq!(upstreams[0]["name"], "broken");
    assert_eq!(upstreams[0]["transport"], "stdio");
    assert_eq!(upstreams[0]["up"], false, "{body}");
    assert_eq!(upstreams[0]["required"], false, "{body}");
}

#[tokio::test]
async fn an_elevation_request_approved_in_the_console_changes_the_mode_as_that_operator() {
    let policy_dir = tempfile::tempdir().expect("temp dir");
    let policy =
        common::approvals::write_approval_policy(policy_dir.path(), 600, "console elevation");
    let server = TestServer::start_with_policy(&policy).await;
    let api = server.api();
    let (status, body) = api
        .post(
            "/policy/request-mode",
            Some(AGENT_TOKEN),
            json!({"mode": "EMERGENCY", "reason": "web-server is down", "ttl_seconds": 300}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let id = body["approval_id"]
        .as_str()
        .expect("approval_id")
        .to_owned();
    let (cookie, csrf) = session(&server).await;
    let pending = console_pending(&server.url, &cookie).await;
    assert_eq!(pending[0]["kind"], "mode_change", "{pending:?}");
    assert_eq!(pending[0]["target"], "EMERGENCY", "{pending:?}");
    assert_eq!(pending[0]["reason"], "web-server is down", "{pending:?}");
    let decide = Decision {
        url: &server.url,
        cookie: Some(&cookie),
        csrf: Some(&csrf),
        origin: true,
        bearer: None,
    };
    let (status, body) = decide
        .send(&id, "approve", json!({"reason": "confirmed the outage"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let status = server.gateway().status();
    assert_eq!(status.mode, "EMERGENCY");
    assert_eq!(status.changed_by, "operator");
}
