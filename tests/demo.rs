//! `proxi demo --json` runs all ten scenarios against a real server and every
//! outcome matches the seed; the kept data dir passes `proxi audit verify`.

use std::process::Command;

use serde_json::Value;

#[test]
fn the_demo_runs_all_ten_scenarios_as_expected() {
    let dir = tempfile::tempdir().unwrap();
    let kept = dir.path().join("demo-data");
    let output = Command::new(env!("CARGO_BIN_EXE_proxi"))
        .args(["demo", "--json", "--keep-data"])
        .arg(&kept)
        .env_remove("GOOGLE_API_KEY")
        .output()
        .expect("proxi demo runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|error| {
        panic!(
            "--json output is JSON ({error}): {stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    let scenarios = report["scenarios"].as_array().expect("scenarios");
    assert_eq!(scenarios.len(), 10);
    let expected = [
        "BLOCKED", "ALLOWED", "BLOCKED", "BLOCKED", "FAILED", "ADAPTED", "REJECTED", "FAILED",
        "ALLOWED", "STABLE",
    ];
    for (scenario, expected) in scenarios.iter().zip(expected) {
        assert_eq!(scenario["expected"], expected, "{scenario:#}");
        assert_eq!(scenario["actual"], expected, "{scenario:#}");
        assert_eq!(scenario["passed"], true, "{scenario:#}");
    }
    assert_eq!(scenarios[8]["transport"], "mcp");
    assert!(report["audit"]["verified"].as_bool().unwrap());
    assert!(
        output.status.success(),
        "exit code {:?}",
        output.status.code()
    );

    let verify = Command::new(env!("CARGO_BIN_EXE_proxi"))
        .args(["audit", "verify", "--data-dir"])
        .arg(&kept)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
}

#[test]
fn the_demo_runs_one_scenario_and_rejects_bad_options() {
    let output = Command::new(env!("CARGO_BIN_EXE_proxi"))
        .args(["demo", "--scenario", "3"])
        .output()
        .unwrap();
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("=== SCENARIO 3: Global Safety - Destructive Action ==="),
        "{text}"
    );
    assert!(
        text.contains("Expected: BLOCKED   Actual: BLOCKED"),
        "{text}"
    );
    assert!(
        !text.contains("\x1b["),
        "no colour when stdout is not a terminal"
    );
    assert!(!text.contains("SCENARIO 4"));

    let output = Command::new(env!("CARGO_BIN_EXE_proxi"))
        .args(["demo", "--scenario", "11"])
        .output()
        .unwrap();
    assert!(!output.status.success());

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("precious.txt"), "keep me").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_proxi"))
        .args(["demo", "--scenario", "1", "--keep-data"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("is not empty"));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("precious.txt")).unwrap(),
        "keep me"
    );
}
