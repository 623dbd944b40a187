//! Attack: an "explanation" nobody can read (issue 8, item 16). A reason made of
//! zero-width characters counted as a reason: EMERGENCY was entered (200) with a
//! reason of U+200B U+200B U+2060. Now a reason needs at least one visible
//! character, over REST and from the CLI, and nothing is recorded otherwise.

mod common;

use std::process::Command;

use common::{OPERATOR_TOKEN, TestServer};
use reqwest::StatusCode;

const INVISIBLE: [&str; 5] = [
    "\u{200b}\u{200b}\u{2060}",
    "\u{feff}",
    "\u{202e}\u{2066}\u{2069}",
    " \u{3164} \u{115f} ",
    "\u{034f}\u{fe0f}\u{2800}",
];

#[tokio::test]
async fn zero_width_reasons_do_not_enter_an_emergency() {
    let server = TestServer::start().await;
    let api = server.api();
    let before = api.audit(1000).await.len();
    for reason in INVISIBLE {
        let (status, body) = api.set_mode("EMERGENCY", Some(reason), Some(60)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{reason:?}: {body}");
        assert!(
            body["error"]
                .as_str()
                .is_some_and(|error| error.contains("visible characters")),
            "{body}"
        );
        // Not even for the default mode, where a reason is optional.
        let (status, _) = api.set_mode("NORMAL", Some(reason), None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{reason:?}");
    }
    assert_eq!(server.gateway().status().mode, "NORMAL");
    assert_eq!(api.audit(1000).await.len(), before, "nothing was recorded");

    // A reason with something visible among the invisible still counts.
    let (status, body) = api
        .set_mode("EMERGENCY", Some("\u{200b}disk full"), Some(60))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_reports_an_invisible_reason() {
    let server = TestServer::start().await;
    let output = Command::new(env!("CARGO_BIN_EXE_proxi"))
        .args([
            "mode",
            "set",
            "EMERGENCY",
            "--reason",
            "\u{200b}\u{200c}",
            "--server",
        ])
        .arg(&server.url)
        .env("PROXI_OPERATOR_TOKEN", OPERATOR_TOKEN)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("visible characters"), "{stderr}");
    assert_eq!(server.gateway().status().mode, "NORMAL");
}
