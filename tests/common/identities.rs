//! Named principals for end-to-end tests: `proxi token ...` run as the operator would.

use std::path::Path;
use std::process::{Command, Output};

use super::OPERATOR_TOKEN;

/// Runs `proxi token ARGS --data-dir DIR` with the operator token the test servers use.
pub fn token_command(data_dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_proxi"))
        .arg("token")
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .env("PROXI_OPERATOR_TOKEN", OPERATOR_TOKEN)
        .env_remove("PROXI_OPERATOR_CREDENTIAL")
        .output()
        .expect("the proxi binary runs")
}

/// `proxi token add NAME --role ROLE`, which must succeed: the printed token.
pub fn add_token(data_dir: &Path, name: &str, role: &str) -> String {
    let output = token_command(data_dir, &["add", name, "--role", role]);
    assert!(
        output.status.success(),
        "token add {name} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let token = String::from_utf8(output.stdout).expect("utf-8");
    let token = token.trim();
    assert_eq!(
        token.lines().count(),
        1,
        "only the token on stdout: {token}"
    );
    token.to_owned()
}

/// `proxi token revoke NAME`, which must succeed.
pub fn revoke_token(data_dir: &Path, name: &str) {
    let output = token_command(data_dir, &["revoke", name]);
    assert!(
        output.status.success(),
        "token revoke {name} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
