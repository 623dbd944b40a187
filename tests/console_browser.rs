//! The operator console in a real browser: headless Chromium driven over
//! WebDriver (chromedriver on a loopback port) against the real `proxi serve`.
//! `scripts/browser-harness.sh` (run by `scripts/test.sh`) installs Debian
//! `chromium` and `chromium-driver`; without them this test fails and says so.
//! Every wait polls the page (or the server) against a bounded deadline; no step
//! sleeps a fixed time and hopes.

mod common;

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::approvals::approval_policy_text;
use common::{AGENT_TOKEN, Api, OPERATOR_TOKEN, ServerProcess};
use fantoccini::{Client, ClientBuilder, Locator};
use reqwest::StatusCode;
use serde_json::{Value, json};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const PATIENCE: Duration = Duration::from_secs(20);

/// A chromedriver child on a free loopback port, killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    fn start() -> Driver {
        for tool in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(tool).exists(),
                "{tool} is missing: run scripts/browser-harness.sh (installs Debian chromium and chromium-driver)"
            );
        }
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        common::wait_until("chromedriver to listen", PATIENCE, || {
            TcpStream::connect_timeout(&address, Duration::from_millis(200))
                .ok()
                .map(drop)
        });
        Driver {
            child,
            url: format!("http://{address}"),
        }
    }

    async fn browser(&self) -> Client {
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".to_owned(),
            json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--window-size=1280,800",
                    "--no-proxy-server",
                ],
            }),
        );
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&self.url)
            .await
            .expect("a browser session opens")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn text_of(browser: &Client, css: &str) -> String {
    match browser.find(Locator::Css(css)).await {
        Ok(element) => element.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// Polls the page until no element matches `css`.
async fn wait_for_absence(browser: &Client, css: &str, what: &str) {
    let deadline = Instant::now() + PATIENCE;
    while browser.find(Locator::Css(css)).await.is_ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Types `reason` into approval `id`'s reason field and clicks its `button`
/// (`approve` or `deny`).
async fn decide_in_page(browser: &Client, id: &str, reason: &str, button: &str) {
    let item = format!("li.approval[data-approval-id='{id}']");
    browser
        .find(Locator::Css(&format!("{item} .approval-reason")))
        .await
        .expect("the reason field")
        .send_keys(reason)
        .await
        .expect("typing");
    browser
        .find(Locator::Css(&format!("{item} button.{button}")))
        .await
        .expect("the button")
        .click()
        .await
        .expect("click");
}

/// Polls the page until `check` accepts the text of `css`; panics with the last text.
async fn wait_for_text(browser: &Client, css: &str, what: &str, check: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let text = text_of(browser, css).await;
        if check(&text) {
            return;
        }
        if Instant::now() >= deadline {
            let source = browser.source().await.unwrap_or_default();
            let url = browser.current_url().await.map(|url| url.to_string());
            panic!("timed out waiting for {what}; {css} shows {text:?} at {url:?}:\n{source}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn artifact_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/console-browser");
    std::fs::create_dir_all(&dir).expect("artifact dir");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_logs_in_elevates_watches_a_call_approves_one_and_logs_out() {
    let dir = tempfile::tempdir().expect("temp dir");
    let policy_dir = tempfile::tempdir().expect("temp dir");
    // EMERGENCY asks for approval of scale_fleet with count >= 6 (restart_service
    // runs at once, for step 4).
    let mut policy: Value =
        serde_json::from_str(&approval_policy_text(600, "console browser test")).expect("JSON");
    policy["modes"]["EMERGENCY"]["require_approval"]
        .as_object_mut()
        .expect("rules")
        .remove("restart_service");
    let policy = common::write_policy(policy_dir.path(), "policy.json", &policy.to_string());
    let server = ServerProcess::start_with_policy(dir.path(), &policy, &[]);
    let bob = common::identities::add_token(dir.path(), "bob", "operator");
    let api = Api::new(&server.url);
    let driver = Driver::start();
    let browser = driver.browser().await;

    // 1. Log in.
    browser
        .goto(&format!("{}/console", server.url))
        .await
        .expect("the console loads");
    let token = browser
        .wait()
        .at_most(PATIENCE)
        .for_element(Locator::Css("#token"))
        .await
        .expect("the login form");
    assert_eq!(
        token.attr("type").await.expect("attr").as_deref(),
        Some("password")
    );
    token.send_keys(OPERATOR_TOKEN).await.expect("typing");
    browser
        .find(Locator::Css("#login-submit"))
        .await
        .expect("button")
        .click()
        .await
        .expect("click");

    // 2. See NORMAL.
    wait_for_text(&browser, "#mode", "the mode", |text| text == "NORMAL").await;
    wait_for_text(&browser, "#live", "the live feed", |text| text == "live").await;
    // Marks this page load: a reload would lose it.
    browser
        .execute("window.proxiPageLoad = 'first'; return true;", vec![])
        .await
        .expect("script runs");

    // 3. EMERGENCY through the form, and the countdown.
    browser
        .find(Locator::Css("#mode-select"))
        .await
        .expect("select")
        .select_by_value("EMERGENCY")
        .await
        .expect("choose EMERGENCY");
    browser
        .find(Locator::Css("#mode-reason"))
        .await
        .expect("reason")
        .send_keys("browser test: incident on web-server")
        .await
        .expect("typing");
    browser
        .find(Locator::Css("#mode-ttl"))
        .await
        .expect("ttl")
        .send_keys("600")
        .await
        .expect("typing");
    browser
        .find(Locator::Css("#mode-submit"))
        .await
        .expect("button")
        .click()
        .await
        .expect("click");
    wait_for_text(&browser, "#mode", "EMERGENCY", |text| text == "EMERGENCY").await;
    wait_for_text(&browser, "#countdown", "the countdown", |text| {
        text.starts_with("expires in 9:") || text.starts_with("expires in 10:")
    })
    .await;
    let first = text_of(&browser, "#countdown").await;
    wait_for_text(&browser, "#countdown", "the countdown to tick", |text| {
        text.starts_with("expires in ") && text != first
    })
    .await;
    wait_for_text(&browser, "#reason", "the reason", |text| {
        text == "browser test: incident on web-server"
    })
    .await;
    let (status, body) = api.get("/policy/status", Some(AGENT_TOKEN)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["mode"], "EMERGENCY", "{body}");

    // 4. An agent call over REST appears in the audit table without a reload.
    let (status, body) = api
        .execute("restart_service", json!({"service_name": "web-server"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let seq = body["audit_seq"].as_u64().expect("audit_seq");
    let row = format!("#audit-rows tr[data-seq='{seq}']");
    let row = browser
        .wait()
        .at_most(PATIENCE)
        .for_element(Locator::Css(&row))
        .await
        .expect("the call's row appears");
    let cells = row.text().await.expect("row text");
    assert!(
        cells.contains("restart_service") && cells.contains("allowed"),
        "{cells}"
    );
    let same_page = browser
        .execute("return window.proxiPageLoad === 'first';", vec![])
        .await
        .expect("script runs");
    assert_eq!(same_page, Value::Bool(true), "the page was not reloaded");

    // A refused call shows up as well, as denied.
    let (status, body) = api
        .execute("delete_database", json!({"database_name": "prod"}))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let denied = format!(
        "#audit-rows tr[data-seq='{}']",
        body["audit_seq"].as_u64().expect("audit_seq")
    );
    let denied = browser
        .wait()
        .at_most(PATIENCE)
        .for_element(Locator::Css(&denied))
        .await
        .expect("the refused call's row appears");
    assert!(denied.text().await.expect("text").contains("denied"));

    // A change made elsewhere (an operator's REST call) shows up live too.
    let (status, _) = api
        .post(
            "/infrastructure/simulate-incident",
            Some(OPERATOR_TOKEN),
            json!({"service": "database", "status": "critical"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    wait_for_text(&browser, "#services", "the incident", |text| {
        text.contains("critical")
    })
    .await;

    // 5. Approvals. The operator's own request: the page shows the server's refusal.
    let (status, body) = api
        .post(
            "/tools/execute",
            Some(OPERATOR_TOKEN),
            json!({"tool_name": "scale_fleet", "arguments": {"count": 9}}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let own = body["approval_id"]
        .as_str()
        .expect("approval_id")
        .to_owned();
    let own_item = format!("li.approval[data-approval-id='{own}']");
    wait_for_text(&browser, &own_item, "the operator's own request", |text| {
        text.contains("operator (operator)") && text.contains("count=9")
    })
    .await;
    decide_in_page(&browser, &own, "my own request", "approve").await;
    wait_for_text(
        &browser,
        &format!("{own_item} .approval-error"),
        "the self-approval refusal",
        |text| text.contains("cannot approve or deny a request it made itself"),
    )
    .await;

    // The agent's call, held until an operator decides (`wait_for_approval_seconds`).
    let held = tokio::spawn({
        let api = api.clone();
        async move {
            api.post(
                "/tools/execute",
                Some(AGENT_TOKEN),
                json!({"tool_name": "scale_fleet", "arguments": {"count": 8},
                       "wait_for_approval_seconds": 60}),
            )
            .await
        }
    });
    let agent_item = "li.approval[data-principal='agent']";
    wait_for_text(&browser, agent_item, "the agent's request", |text| {
        text.contains("agent (agent)") && text.contains("count=8") && text.contains("expires in")
    })
    .await;
    let requested = browser
        .find(Locator::Css(agent_item))
        .await
        .expect("the agent's request")
        .attr("data-approval-id")
        .await
        .expect("attr")
        .expect("an id");
    wait_for_text(&browser, "#approvals-count", "two pending", |text| {
        text == "2"
    })
    .await;

    let screenshot = browser.screenshot().await.expect("screenshot");
    let path = artifact_dir().join("console.png");
    std::fs::write(&path, &screenshot).expect("screenshot saved");
    assert!(
        screenshot.starts_with(b"\x89PNG"),
        "a PNG at {}",
        path.display()
    );

    // The whole page at the same width, for the README.
    browser.set_window_size(1280, 1400).await.expect("resize");
    browser
        .execute("window.scrollTo(0, 0); return true;", vec![])
        .await
        .expect("script runs");
    let full = browser.screenshot().await.expect("screenshot");
    std::fs::write(artifact_dir().join("console-full.png"), &full).expect("saved");

    // Readable on a phone: nothing wider than the screen but the audit table's own scroller.
    browser.set_window_size(390, 844).await.expect("resize");
    let fits = browser
        .execute(
            "return document.documentElement.scrollWidth <= window.innerWidth;",
            vec![],
        )
        .await
        .expect("script runs");
    assert_eq!(
        fits,
        Value::Bool(true),
        "the page scrolls sideways on a phone"
    );
    let phone = browser.screenshot().await.expect("screenshot");
    std::fs::write(artifact_dir().join("console-phone.png"), &phone).expect("saved");
    browser.set_window_size(1280, 800).await.expect("resize");

    // Approve the agent's request in the page: the held call then runs, and its
    // record appears in the live table.
    decide_in_page(&browser, &requested, "capacity checked", "approve").await;
    wait_for_absence(
        &browser,
        &format!("li.approval[data-approval-id='{requested}']"),
        "the approved request to leave the panel",
    )
    .await;
    let (mut status, mut body) = held.await.expect("the held call");
    if status == StatusCode::ACCEPTED {
        // Held past the server's limit before the click: the agent asks again.
        (status, body) = api.execute("scale_fleet", json!({"count": 8})).await;
    }
    assert_eq!(status, StatusCode::OK, "{body}");
    let ran = format!(
        "#audit-rows tr[data-seq='{}']",
        body["audit_seq"].as_u64().expect("audit_seq")
    );
    wait_for_text(&browser, &ran, "the approved call's row", |text| {
        text.contains("scale_fleet") && text.contains("allowed")
    })
    .await;
    wait_for_text(&browser, "#fleet", "the new fleet size", |text| text == "8").await;
    let records = api.audit(100).await;
    let decision = records
        .iter()
        .find(|record| record["kind"] == "approval" && record["outcome"] == "approved")
        .expect("the approval is recorded");
    assert_eq!(decision["principal"], "operator", "{decision}");
    assert_eq!(decision["detail"]["approval_id"], requested.as_str());

    // Decided elsewhere (another operator over REST): the panel follows.
    let (status, body) = api
        .post(
            &format!("/approvals/{own}/deny"),
            Some(&bob),
            json!({"reason": "not now"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    wait_for_absence(&browser, &own_item, "the denied request to leave the panel").await;
    wait_for_text(&browser, "#approvals-count", "none pending", |text| {
        text == "0"
    })
    .await;

    // A mode change from the CLI (its REST call) reaches the page too.
    api.normal().await;
    wait_for_text(&browser, "#mode", "NORMAL again", |text| text == "NORMAL").await;
    wait_for_text(&browser, "#countdown", "no countdown", str::is_empty).await;

    // 6. Log out, and be refused.
    browser
        .find(Locator::Css("#logout-submit"))
        .await
        .expect("button")
        .click()
        .await
        .expect("click");
    // Polled, not `wait().for_element`: that gives up when a navigation aborts
    // its script, and logging out is a navigation.
    let deadline = Instant::now() + PATIENCE;
    while browser.find(Locator::Css("#token")).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for the login form"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused = browser
        .execute(
            "return fetch('/console/api/overview').then((response) => response.status);",
            vec![],
        )
        .await
        .expect("script runs");
    assert_eq!(refused, json!(401));
    browser
        .goto(&format!("{}/console", server.url))
        .await
        .expect("reload");
    assert!(
        browser.find(Locator::Css("#token")).await.is_ok(),
        "still logged out"
    );
    browser.close().await.expect("the browser closes");
}
