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
