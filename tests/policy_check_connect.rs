//! `proxi policy check --connect` and `policy explain --connect` against the real
//! `@modelcontextprotocol/server-filesystem` (pinned, installed by
//! scripts/upstream-harness.sh), with the shipped policies/filesystem.json.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{Value, json};

fn shipped_filesystem_policy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/filesystem.json")
}

/// `proxi` with `args`, with `PROXI_FS_ROOT` set to `root` when given.
fn proxi(args: &[&str], root: Option<&Path>) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_proxi"));
    command.args(args).env_remove("PROXI_FS_ROOT");
    if let Some(root) = root {
        command.env("PROXI_FS_ROOT", root);
    }
    command.output().expect("proxi runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        stdout(output),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The shipped filesystem policy, with `edit` applied, its server started from
/// the pinned local install (`node <entry> ${PROXI_FS_ROOT}`) instead of `npx`,
/// so the test needs no registry. Every rule stays as shipped.
fn local_policy(dir: &Path, edit: impl FnOnce(&mut Value)) -> PathBuf {
    let mut policy: Value =
        serde_json::from_str(&std::fs::read_to_string(shipped_filesystem_policy()).unwrap())
            .unwrap();
    let server = common::upstream::server("server-filesystem", &["${PROXI_FS_ROOT}"]);
    policy["upstreams"]["fs"]["command"] = json!(server.command);
    let args: Vec<&str> = server.args.iter().map(|arg| arg.expose()).collect();
    policy["upstreams"]["fs"]["args"] = json!(args);
    edit(&mut policy);
    common::write_policy(dir, "filesystem.json", &policy.to_string())
}

fn fs_root() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap().join("srv");
    std::fs::create_dir_all(root.join("incidents")).unwrap();
    std::fs::write(root.join("runbook.md"), "restart, then check the logs\n").unwrap();
    (dir, root)
}

#[test]
fn the_shipped_filesystem_policy_passes_the_offline_check() {
    let output = proxi(
        &[
            "policy",
            "check",
            shipped_filesystem_policy().to_str().unwrap(),
        ],
        None,
    );
    assert!(output.status.success(), "{}", text(&output));
    let report = stdout(&output);
    for expected in [
        "NORMAL (default): allows fs__read_*, fs__list_*, fs__search_files",
        "always blocked: fs__move_file, fs__delete_*",
        "upstreams: fs (their tools are checked with --connect)",
        "built-in simulated cloud: no",
        "fs__write_file.path must be a string that wholly matches the pattern incidents/",
    ] {
        assert!(
            report.contains(expected),
            "missing {expected:?} in {report}"
        );
    }
}

#[test]
fn check_connect_lists_the_real_servers_tools_and_what_each_mode_runs() {
    let (dir, root) = fs_root();
    let policy = local_policy(dir.path(), |_| {});
    let output = proxi(
        &["policy", "check", policy.to_str().unwrap(), "--connect"],
        Some(&root),
    );
    let report = stdout(&output);
    assert!(output.status.success(), "{}", text(&output));
    assert!(report.contains("connected:"), "{report}");
    assert!(report.contains("  fs: 14 tools: fs__read_file"), "{report}");
    assert!(
        report.contains(
            "warning: no mode allows (hidden from tools/list): fs__create_directory, fs__move_file"
        ),
        "{report}"
    );
    assert!(
        report.contains("warning: global_rules.always_blocked: 'fs__delete_*' matches no tool"),
        "{report}"
    );
    let runs = |mode: &str| -> Vec<String> {
        let line = report
            .lines()
            .find(|line| line.trim_start().starts_with(mode) && line.contains(" runs: "))
            .unwrap_or_else(|| panic!("no {mode} line in {report}"));
        let (_, tools) = line.split_once(" runs: ").unwrap();
        tools.split(", ").map(str::to_owned).collect()
    };
    let normal = runs("NORMAL");
    let emergency = runs("EMERGENCY");
    for read in [
        "fs__read_text_file",
        "fs__list_directory",
        "fs__search_files",
        "fs__get_file_info",
    ] {
        assert!(normal.iter().any(|tool| tool == read), "{read}: {normal:?}");
    }
    for write in ["fs__write_file", "fs__edit_file"] {
        assert!(!normal.iter().any(|tool| tool == write), "{normal:?}");
        assert!(emergency.iter().any(|tool| tool == write), "{emergency:?}");
    }
    for never in ["fs__move_file", "fs__create_directory"] {
        assert!(!emergency.iter().any(|tool| tool == never), "{emergency:?}");
    }
    assert!(report.contains("connected check: ok"), "{report}");
}

#[test]
fn check_connect_fails_on_constraints_the_schema_cannot_meet() {
    let (dir, root) = fs_root();
    let policy = local_policy(dir.path(), |policy| {
        policy["modes"]["EMERGENCY"]["constraints"]["fs__edit_file"] =
            json!({"file": {"pattern": "x"}, "path": {"min": 1}});
    });
    let output = proxi(
        &["policy", "check", policy.to_str().unwrap(), "--connect"],
        Some(&root),
    );
    let report = stdout(&output);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(
        report.contains("error: modes.EMERGENCY.constraints.fs__edit_file.file: 'fs__edit_file' has no argument 'file' (its arguments: path, edits, dryRun)"),
        "{report}"
    );
    assert!(
        report.contains(
            "the constraint compares integers, but 'fs__edit_file' declares 'path' as string"
        ),
        "{report}"
    );
    assert!(report.contains("connected check: 2 error(s)"), "{report}");
}

#[test]
fn check_connect_names_a_missing_variable_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let policy = local_policy(dir.path(), |_| {});
    let output = proxi(
        &["policy", "check", policy.to_str().unwrap(), "--connect"],
        None,
    );
    let report = stdout(&output);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert!(report.contains("error: upstream fs:"), "{report}");
    assert!(report.contains("PROXI_FS_ROOT"), "{report}");
}

#[test]
fn explain_connect_decides_upstream_calls_with_their_schemas_and_patterns() {
    let (dir, root) = fs_root();
    let policy = local_policy(dir.path(), |_| {});
    let explain = |tool: &str, mode: &str, args: Value, connect: bool| {
        let args = args.to_string();
        let mut argv = vec![
            "policy",
            "explain",
            tool,
            "--mode",
            mode,
            "--args",
            &args,
            "--policy",
            policy.to_str().unwrap(),
        ];
        if connect {
            argv.push("--connect");
        }
        proxi(&argv, Some(&root))
    };
    let note = json!({"path": "incidents/db-outage.md", "content": "notes"});
    let allowed = explain("fs__write_file", "EMERGENCY", note.clone(), true);
    assert!(allowed.status.success(), "{}", text(&allowed));
    assert!(stdout(&allowed).starts_with("ALLOWED  fs__write_file in EMERGENCY mode"));

    let blocked = explain("fs__write_file", "NORMAL", note, true);
    assert_eq!(blocked.status.code(), Some(1));
    assert!(
        stdout(&blocked).contains("reason: blocked_in_mode"),
        "{}",
        text(&blocked)
    );

    for outside in [
        "/etc/passwd",
        "incidents/../../etc/passwd",
        "incidents/a/b.md",
        "notes.md",
    ] {
        let denied = explain(
            "fs__write_file",
            "EMERGENCY",
            json!({"path": outside, "content": "x"}),
            true,
        );
        assert_eq!(denied.status.code(), Some(1), "{outside}");
        assert!(
            stdout(&denied).contains("reason: constraint_violated"),
            "{outside}: {}",
            text(&denied)
        );
    }

    // Schema first: a missing `content` never reaches the constraints.
    let invalid = explain(
        "fs__write_file",
        "EMERGENCY",
        json!({"path": "incidents/a.md"}),
        true,
    );
    assert_eq!(invalid.status.code(), Some(1));
    assert!(
        stdout(&invalid).contains("reason: invalid_arguments"),
        "{}",
        text(&invalid)
    );

    let moved = explain("fs__move_file", "EMERGENCY", json!({}), true);
    assert!(
        stdout(&moved).contains("reason: always_blocked"),
        "{}",
        text(&moved)
    );

    // Without --connect the upstream's tools are unknown, and the output says why.
    let offline = explain(
        "fs__read_text_file",
        "NORMAL",
        json!({"path": "runbook.md"}),
        false,
    );
    assert_eq!(offline.status.code(), Some(1));
    let report = stdout(&offline);
    assert!(report.contains("reason: unknown_tool"), "{report}");
    assert!(report.contains("pass --connect"), "{report}");
}
