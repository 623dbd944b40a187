//! `proxi init`: the files a new user starts from, written into a directory of
//! their choice without ever overwriting one that is already there.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::policy_source::{BUILT_IN_POLICY, DEFAULT_POLICY_PATH};

/// Where the example upstream policy goes, relative to the target directory.
pub const UPSTREAM_EXAMPLE_PATH: &str = "policies/upstreams.example.json";
/// The example upstream policy: the documented shape of a policy over MCP servers.
pub const UPSTREAM_EXAMPLE: &str = include_str!("../policies/upstreams.example.json");

/// Why the starter files were not written.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// A file `init` would write exists already; nothing was written.
    #[error(
        "{0} already exists; proxi init never overwrites a file (move it away or pick another directory)"
    )]
    Exists(PathBuf),
    /// The directory or a file could not be created.
    #[error("cannot write {path}: {error}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
}

/// One file `init` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StarterFile {
    /// Path relative to the target directory.
    pub path: &'static str,
    /// The file's content.
    pub content: &'static str,
    /// What the file is for, for `init`'s output.
    pub purpose: &'static str,
}

/// The files `init` writes, in order.
pub const STARTER_FILES: [StarterFile; 2] = [
    StarterFile {
        path: DEFAULT_POLICY_PATH,
        content: BUILT_IN_POLICY,
        purpose: "the starter policy (the built-in default); `proxi serve` run in this directory uses it",
    },
    StarterFile {
        path: UPSTREAM_EXAMPLE_PATH,
        content: UPSTREAM_EXAMPLE,
        purpose: "an example policy for upstream MCP servers; `proxi policy check --connect` checks it, but this Proxi version does not forward calls to upstreams yet",
    },
];

/// Writes [`STARTER_FILES`] under `dir` (created if missing) and returns their paths.
///
/// If any of them exists, nothing is written. Each file is created with
/// `create_new`, so one that appears meanwhile is not overwritten either.
pub fn write_starter_files(dir: &Path) -> Result<Vec<PathBuf>, InitError> {
    let targets: Vec<PathBuf> = STARTER_FILES
        .iter()
        .map(|file| dir.join(file.path))
        .collect();
    if let Some(existing) = targets.iter().find(|path| path.symlink_metadata().is_ok()) {
        return Err(InitError::Exists(existing.clone()));
    }
    for (file, path) in STARTER_FILES.iter().zip(&targets) {
        let io_error = |error| InitError::Io {
            path: path.clone(),
            error,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io_error)?;
        }
        let mut out = std::fs::File::options()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|error| match error.kind() {
                std::io::ErrorKind::AlreadyExists => InitError::Exists(path.clone()),
                _ => io_error(error),
            })?;
        out.write_all(file.content.as_bytes()).map_err(io_error)?;
    }
    Ok(targets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PolicyEngine;
    use serde_json::Value;

    #[test]
    fn writes_a_loadable_policy_and_the_upstream_example() {
        let dir = tempfile::tempdir().expect("temp dir");
        let target = dir.path().join("new");
        let written = write_starter_files(&target).expect("init writes");
        assert_eq!(written.len(), 2);
        PolicyEngine::load(&written[0]).expect("the starter policy loads");
        PolicyEngine::load(&written[1]).expect("the upstream example loads");
        let example: Value =
            serde_json::from_str(&std::fs::read_to_string(&written[1]).expect("read"))
                .expect("the example is JSON");
        assert!(example["upstreams"]["fs"]["command"].is_string());
        assert!(example["upstreams"]["ops"]["url"].is_string());
        assert!(
            example["description"]
                .as_str()
                .is_some_and(|text| text.contains("EXAMPLE ONLY"))
        );
    }

    #[test]
    fn refuses_to_overwrite_and_writes_nothing_then() {
        let dir = tempfile::tempdir().expect("temp dir");
        let example = dir.path().join(UPSTREAM_EXAMPLE_PATH);
        std::fs::create_dir_all(example.parent().expect("parent")).expect("mkdir");
        std::fs::write(&example, "mine").expect("write");
        let error = write_starter_files(dir.path()).expect_err("must refuse");
        assert!(matches!(&error, InitError::Exists(path) if *path == example));
        assert!(error.to_string().contains("never overwrites"));
        assert_eq!(std::fs::read_to_string(&example).expect("read"), "mine");
        assert!(!dir.path().join(DEFAULT_POLICY_PATH).exists());
    }
}
