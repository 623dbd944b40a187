//! Where the policy comes from: a file the operator names, the repository's
//! `policies/ops_policy.json` in the working directory, or the copy of the shipped
//! policy built into the binary, so that `proxi serve` also runs outside the
//! repository and after `cargo install`.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::policy::{PolicyEngine, PolicyError};

/// The shipped `policies/ops_policy.json`, compiled into the binary.
pub const BUILT_IN_POLICY: &str = include_str!("../policies/ops_policy.json");
/// Where a policy is looked for, relative to the working directory, when no file is named.
pub const DEFAULT_POLICY_PATH: &str = "policies/ops_policy.json";
/// How the built-in policy is named in banners and error messages.
pub const BUILT_IN_NAME: &str = "built-in default";

/// The policy a command uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicySource {
    /// A policy file.
    File(PathBuf),
    /// [`BUILT_IN_POLICY`].
    BuiltIn,
}

impl PolicySource {
    /// The file given with `--policy`; else [`DEFAULT_POLICY_PATH`] under `working_dir`
    /// if it exists; else the built-in policy.
    ///
    /// A named file is used even if it is missing, so a typo is an error rather than
    /// a silent fallback to the built-in policy.
    pub fn resolve(flag: Option<&Path>, working_dir: &Path) -> PolicySource {
        if let Some(path) = flag {
            return PolicySource::File(path.to_owned());
        }
        let default = working_dir.join(DEFAULT_POLICY_PATH);
        if default.is_file() {
            PolicySource::File(default)
        } else {
            PolicySource::BuiltIn
        }
    }

    /// [`PolicySource::resolve`] against the process's working directory; the
    /// path stays relative, as the user would type it.
    pub fn from_flag(flag: Option<&Path>) -> PolicySource {
        PolicySource::resolve(flag, Path::new(""))
    }

    /// Reads and validates the policy.
    pub fn load(&self) -> Result<PolicyEngine, PolicyError> {
        match self {
            PolicySource::File(path) => PolicyEngine::load(path),
            PolicySource::BuiltIn => PolicyEngine::from_json(BUILT_IN_POLICY, BUILT_IN_NAME),
        }
    }
}

impl fmt::Display for PolicySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicySource::File(path) => write!(f, "{}", path.display()),
            PolicySource::BuiltIn => f.write_str(BUILT_IN_NAME),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_named_file_wins_even_when_missing() {
        let dir = tempfile::tempdir().expect("temp dir");
        let named = dir.path().join("no-such.json");
        assert_eq!(
            PolicySource::resolve(Some(&named), dir.path()),
            PolicySource::File(named.clone())
        );
        assert!(matches!(
            PolicySource::File(named).load(),
            Err(PolicyError::Read { .. })
        ));
    }

    #[test]
    fn the_working_directory_policy_comes_before_the_built_in_one() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert_eq!(
            PolicySource::resolve(None, dir.path()),
            PolicySource::BuiltIn
        );
        std::fs::create_dir_all(dir.path().join("policies")).expect("mkdir");
        std::fs::write(dir.path().join(DEFAULT_POLICY_PATH), BUILT_IN_POLICY).expect("write");
        assert_eq!(
            PolicySource::resolve(None, dir.path()),
            PolicySource::File(dir.path().join(DEFAULT_POLICY_PATH))
        );
        assert_eq!(
            PolicySource::resolve(None, Path::new("")),
            PolicySource::File(PathBuf::from(DEFAULT_POLICY_PATH)),
            "the tests run in the repository, which ships the policy"
        );
    }

    #[test]
    fn the_built_in_policy_loads_and_says_where_it_came_from() {
        let engine = PolicySource::BuiltIn
            .load()
            .expect("the shipped policy is valid");
        assert_eq!(engine.mode(engine.default_mode()).name(), "NORMAL");
        assert_eq!(PolicySource::BuiltIn.to_string(), "built-in default");
    }
}
