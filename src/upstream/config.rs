//! The declaration of one upstream MCP server, as the policy file writes it, and its
//! resolution against Proxi's environment at start.
//!
//! `${VAR}` references in `args`, `env`, `url` and `headers` are expanded from an
//! injected lookup (so tests never touch the process environment). Expanded values
//! may carry secrets, so they live in [`Secret`], whose `Debug` never shows them.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// The longest upstream name: the exposed tool name `<upstream>__<tool>` must stay
/// within the providers' 64-character limit with room for the tool's own name.
pub const MAX_UPSTREAM_NAME_LEN: usize = 32;

/// Per-call timeout when the declaration does not set `call_timeout_seconds`.
pub const DEFAULT_CALL_TIMEOUT_SECONDS: u64 = 60;

/// One entry of the policy file's `upstreams` object, exactly as written.
///
/// Either `command` (a stdio server Proxi spawns) or `url` (a Streamable HTTP
/// server) must be set, never both; [`UpstreamDeclaration::resolve`] checks that.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamDeclaration {
    /// Program to spawn for a stdio upstream.
    #[serde(default)]
    pub command: Option<String>,
    /// Arguments of `command`; may contain `${VAR}`.
    #[serde(default)]
    pub args: Vec<String>,
    /// Extra environment for `command`; values may contain `${VAR}`.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory of `command`.
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// Endpoint of a Streamable HTTP upstream; may contain `${VAR}`.
    #[serde(default)]
    pub url: Option<String>,
    /// HTTP headers sent to `url`; values may contain `${VAR}`.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Whether Proxi refuses to start when this upstream cannot be reached.
    #[serde(default)]
    pub required: bool,
    /// How long one `tools/call` may take before it fails with a timeout.
    #[serde(default = "default_call_timeout_seconds")]
    pub call_timeout_seconds: u64,
}

fn default_call_timeout_seconds() -> u64 {
    DEFAULT_CALL_TIMEOUT_SECONDS
}

// Written by hand: the raw text may already hold a secret pasted inline.
impl fmt::Debug for UpstreamDeclaration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamDeclaration")
            .field("command", &self.command)
            .field("args", &format_args!("[{} redacted]", self.args.len()))
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("cwd", &self.cwd)
            .field("url", &self.url.as_ref().map(|_| Secret::REDACTED))
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("required", &self.required)
            .field("call_timeout_seconds", &self.call_timeout_seconds)
            .finish()
    }
}

/// A string that may hold a secret (a token expanded from `${VAR}`). Its `Debug`
/// and `Display` print a placeholder; only [`Secret::expose`] gives the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    const REDACTED: &'static str = "<redacted>";

    /// Wraps a value so that formatting never shows it.
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

    /// The value itself, for the one place that must hand it to a process or a socket.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(Self::REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(Self::REDACTED)
    }
}

/// Why a declaration cannot be used. Messages name the upstream and the field,
/// never a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The name does not match `^[a-z][a-z0-9-]{0,31}$`.
    #[error(
        "upstream name {name:?} is invalid: it must start with a lowercase letter and contain only lowercase letters, digits and '-', at most {MAX_UPSTREAM_NAME_LEN} characters"
    )]
    InvalidName {
        /// The name as written (names are not secrets).
        name: String,
    },
    /// Both `command` and `url` are set.
    #[error("upstream {upstream:?} sets both \"command\" and \"url\"; set exactly one")]
    BothTransports {
        /// The upstream's name.
        upstream: String,
    },
    /// Neither `command` nor `url` is set.
    #[error("upstream {upstream:?} sets neither \"command\" nor \"url\"; set exactly one")]
    NoTransport {
        /// The upstream's name.
        upstream: String,
    },
    /// A stdio-only field (`args`, `env`, `cwd`) on an HTTP upstream, or `headers` on a stdio one.
    #[error("upstream {upstream:?} sets {field:?}, which only applies to the other transport")]
    FieldForOtherTransport {
        /// The upstream's name.
        upstream: String,
        /// The misplaced field.
        field: &'static str,
    },
    /// `call_timeout_seconds` is zero.
    #[error("upstream {upstream:?}: call_timeout_seconds must be at least 1")]
    ZeroTimeout {
        /// The upstream's name.
        upstream: String,
    },
    /// A `${VAR}` names a variable that is not set.
    #[error("upstream {upstream:?}: environment variable {variable} (used in {field}) is not set")]
    MissingVariable {
        /// The upstream's name.
        upstream: String,
        /// The variable's name.
        variable: String,
        /// Where it was used, e.g. `headers.Authorization`.
        field: String,
    },
    /// A `${` without its closing `}`, or an empty or odd variable name.
    #[error("upstream {upstream:?}: malformed ${{...}} reference in {field}")]
    MalformedReference {
        /// The upstream's name.
        upstream: String,
        /// Where it was found.
        field: String,
    },
}

/// How Proxi reaches a resolved upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// A child process speaking MCP over its stdin and stdout.
    Stdio(StdioTarget),
    /// A Streamable HTTP endpoint.
    Http(HttpTarget),
}

/// A stdio upstream with every `${VAR}` expanded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StdioTarget {
    /// The program (not expanded: it names a binary, not a secret).
    pub command: String,
    /// Arguments after expansion.
    pub args: Vec<Secret>,
    /// Extra environment after expansion; the child inherits only a few of Proxi's
    /// own variables besides (see `client::INHERITED_ENV`).
    pub env: BTreeMap<String, Secret>,
    /// Working directory, or Proxi's own when unset.
    pub cwd: Option<PathBuf>,
}

/// A Streamable HTTP upstream with every `${VAR}` expanded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpTarget {
    /// The endpoint after expansion.
    pub url: Secret,
    /// Headers after expansion.
    pub headers: BTreeMap<String, Secret>,
}

/// An upstream ready to connect: validated name, transport, and call settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUpstream {
    /// The validated upstream name, the prefix of its exposed tool names.
    pub name: String,
    /// How to reach it.
    pub transport: Transport,
    /// Whether a failure to connect at start stops Proxi.
    pub required: bool,
    /// Limit on one `tools/call`.
    pub call_timeout: Duration,
}

/// Whether `name` matches `^[a-z][a-z0-9-]{0,31}$`.
pub fn is_valid_upstream_name(name: &str) -> bool {
    let mut chars = name.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    name.len() <= MAX_UPSTREAM_NAME_LEN
        && first.is_ascii_lowercase()
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// Why [`expand`] could not expand a text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpandError {
    /// The named variable is not in the lookup.
    Missing(String),
    /// An unclosed `${`, or a name that is empty or not `[A-Za-z_][A-Za-z0-9_]*`.
    Malformed,
}

/// Replaces every `${NAME}` in `text` with `lookup(NAME)`. Text without `${` is
/// returned unchanged; a lone `$` is kept as written.
pub fn expand(text: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, ExpandError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or(ExpandError::Malformed)?;
        let name = &after[..end];
        if !is_variable_name(name) {
            return Err(ExpandError::Malformed);
        }
        let value = lookup(name).ok_or_else(|| ExpandError::Missing(name.to_owned()))?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn is_variable_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl UpstreamDeclaration {
    /// Validates the declaration of upstream `name` and expands its `${VAR}`
    /// references with `lookup` (Proxi passes `std::env::var`; tests pass a map).
    pub fn resolve(
        &self,
        name: &str,
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<ResolvedUpstream, ConfigError> {
        if !is_valid_upstream_name(name) {
            return Err(ConfigError::InvalidName {
                name: name.to_owned(),
            });
        }
        let upstream = || name.to_owned();
        if self.call_timeout_seconds == 0 {
            return Err(ConfigError::ZeroTimeout {
                upstream: upstream(),
            });
        }
        let expand_field = |text: &str, field: String| -> Result<Secret, ConfigError> {
            expand(text, lookup)
                .map(Secret::new)
                .map_err(|error| match error {
                    ExpandError::Missing(variable) => ConfigError::MissingVariable {
                        upstream: upstream(),
                        variable,
                        field,
                    },
                    ExpandError::Malformed => ConfigError::MalformedReference {
                        upstream: upstream(),
                        field,
                    },
                })
        };
        let misplaced = |field| ConfigError::FieldForOtherTransport {
            upstream: upstream(),
            field,
        };
        let transport = match (&self.command, &self.url) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::BothTransports {
                    upstream: upstream(),
                });
            }
            (None, None) => {
                return Err(ConfigError::NoTransport {
                    upstream: upstream(),
                });
            }
            (Some(command), None) => {
                if !self.headers.is_empty() {
                    return Err(misplaced("headers"));
                }
                let args = self
                    .args
                    .iter()
                    .enumerate()
                    .map(|(index, arg)| expand_field(arg, format!("args[{index}]")))
                    .collect::<Result<_, _>>()?;
                let env = self
                    .env
                    .iter()
                    .map(|(key, value)| {
                        Ok((key.clone(), expand_field(value, format!("env.{key}"))?))
                    })
                    .collect::<Result<_, ConfigError>>()?;
                Transport::Stdio(StdioTarget {
                    command: command.clone(),
                    args,
                    env,
                    cwd: self.cwd.clone(),
                })
            }
            (None, Some(url)) => {
                if !self.args.is_empty() {
                    return Err(misplaced("args"));
                }
                if !self.env.is_empty() {
                    return Err(misplaced("env"));
                }
                if self.cwd.is_some() {
                    return Err(misplaced("cwd"));
                }
                let headers = self
                    .headers
                    .iter()
                    .map(|(key, value)| {
                        Ok((key.clone(), expand_field(value, format!("headers.{key}"))?))
                    })
                    .collect::<Result<_, ConfigError>>()?;
                Transport::Http(HttpTarget {
                    url: expand_field(url, "url".to_owned())?,
                    headers,
                })
            }
        };
        Ok(ResolvedUpstream {
            name: name.to_owned(),
            transport,
            required: self.required,
            call_timeout: Duration::from_secs(self.call_timeout_seconds),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn lookup_from(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| map.get(name).cloned()
    }

    fn parse(json: &str) -> Result<UpstreamDeclaration, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn the_issues_example_resolves() {
        let upstreams: BTreeMap<String, UpstreamDeclaration> = serde_json::from_str(
            r#"{
              "fs":  {"command": "npx", "args": ["-y", "@modelcontextprotocol/server-filesystem", "/srv/runbooks"],
                      "env": {"NODE_OPTIONS": "--max-old-space-size=256"}, "cwd": "/srv"},
              "ops": {"url": "http://127.0.0.1:9000/mcp", "headers": {"Authorization": "Bearer ${OPS_TOKEN}"}}
            }"#,
        )
        .unwrap();
        let lookup = lookup_from(&[("OPS_TOKEN", "s3cret")]);
        let fs = upstreams["fs"].resolve("fs", &lookup).unwrap();
        assert!(!fs.required);
        assert_eq!(fs.call_timeout, Duration::from_secs(60));
        let Transport::Stdio(stdio) = &fs.transport else {
            panic!("fs is stdio")
        };
        assert_eq!(stdio.command, "npx");
        assert_eq!(stdio.args[2].expose(), "/srv/runbooks");
        assert_eq!(
            stdio.env["NODE_OPTIONS"].expose(),
            "--max-old-space-size=256"
        );
        assert_eq!(stdio.cwd.as_deref(), Some(std::path::Path::new("/srv")));

        let ops = upstreams["ops"].resolve("ops", &lookup).unwrap();
        let Transport::Http(http) = &ops.transport else {
            panic!("ops is http")
        };
        assert_eq!(http.url.expose(), "http://127.0.0.1:9000/mcp");
        assert_eq!(http.headers["Authorization"].expose(), "Bearer s3cret");
    }

    #[test]
    fn required_and_timeout_are_read() {
        let declaration =
            parse(r#"{"command": "x", "required": true, "call_timeout_seconds": 5}"#).unwrap();
        let resolved = declaration.resolve("x", &lookup_from(&[])).unwrap();
        assert!(resolved.required);
        assert_eq!(resolved.call_timeout, Duration::from_secs(5));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let error = parse(r#"{"command": "x", "argv": []}"#).unwrap_err();
        assert!(error.to_string().contains("argv"), "{error}");
    }

    #[test]
    fn exactly_one_transport() {
        let lookup = lookup_from(&[]);
        let both = parse(r#"{"command": "x", "url": "http://h/mcp"}"#).unwrap();
        assert!(matches!(
            both.resolve("a", &lookup),
            Err(ConfigError::BothTransports { .. })
        ));
        let neither = parse(r#"{"args": ["x"]}"#).unwrap();
        assert!(matches!(
            neither.resolve("a", &lookup),
            Err(ConfigError::NoTransport { .. })
        ));
        let headers_on_stdio = parse(r#"{"command": "x", "headers": {"A": "b"}}"#).unwrap();
        assert_eq!(
            headers_on_stdio.resolve("a", &lookup),
            Err(ConfigError::FieldForOtherTransport {
                upstream: "a".into(),
                field: "headers"
            })
        );
        let env_on_http = parse(r#"{"url": "http://h", "env": {"A": "b"}}"#).unwrap();
        assert!(matches!(
            env_on_http.resolve("a", &lookup),
            Err(ConfigError::FieldForOtherTransport { field: "env", .. })
        ));
    }

    #[test]
    fn zero_timeout_is_refused() {
        let declaration = parse(r#"{"command": "x", "call_timeout_seconds": 0}"#).unwrap();
        assert!(matches!(
            declaration.resolve("a", &lookup_from(&[])),
            Err(ConfigError::ZeroTimeout { .. })
        ));
    }

    #[test]
    fn upstream_names() {
        for good in ["a", "fs", "git-2", "a0-b1", &"a".repeat(32)] {
            assert!(is_valid_upstream_name(good), "{good}");
        }
        for bad in [
            "",
            "Fs",
            "1fs",
            "-a",
            "f_s",
            "fs.x",
            "fé",
            &"a".repeat(33),
            "a b",
        ] {
            assert!(!is_valid_upstream_name(bad), "{bad}");
        }
        let declaration = parse(r#"{"command": "x"}"#).unwrap();
        assert_eq!(
            declaration.resolve("Bad", &lookup_from(&[])),
            Err(ConfigError::InvalidName { name: "Bad".into() })
        );
    }

    #[test]
    fn a_missing_variable_is_named_with_its_field() {
        let declaration = parse(
            r#"{"url": "http://h/mcp", "headers": {"Authorization": "Bearer ${OPS_TOKEN}"}}"#,
        )
        .unwrap();
        let error = declaration.resolve("ops", &lookup_from(&[])).unwrap_err();
        assert_eq!(
            error,
            ConfigError::MissingVariable {
                upstream: "ops".into(),
                variable: "OPS_TOKEN".into(),
                field: "headers.Authorization".into()
            }
        );
        assert!(error.to_string().contains("OPS_TOKEN"), "{error}");

        let in_args = parse(r#"{"command": "x", "args": ["ok", "${ROOT}/x"]}"#).unwrap();
        assert!(matches!(
            in_args.resolve("a", &lookup_from(&[])),
            Err(ConfigError::MissingVariable { variable, field, .. }) if variable == "ROOT" && field == "args[1]"
        ));
        let in_url = parse(r#"{"url": "http://${HOST}/mcp"}"#).unwrap();
        assert!(matches!(
            in_url.resolve("a", &lookup_from(&[])),
            Err(ConfigError::MissingVariable { field, .. }) if field == "url"
        ));
    }

    #[test]
    fn malformed_references_are_refused() {
        let lookup = lookup_from(&[("A", "1")]);
        assert_eq!(expand("x${A", &lookup), Err(ExpandError::Malformed));
        assert_eq!(expand("${}", &lookup), Err(ExpandError::Malformed));
        assert_eq!(expand("${1A}", &lookup), Err(ExpandError::Malformed));
        assert_eq!(expand("$A and $ alone", &lookup).unwrap(), "$A and $ alone");
        assert_eq!(expand("${A}${A}-${A}", &lookup).unwrap(), "11-1");
    }

    #[test]
    fn expanded_values_never_show_in_debug_or_errors() {
        let declaration =
            parse(r#"{"command": "x", "args": ["--token=${T}"], "env": {"K": "${T}"}}"#).unwrap();
        let lookup = lookup_from(&[("T", "hunter2-secret")]);
        let resolved = declaration.resolve("a", &lookup).unwrap();
        let shown = format!("{resolved:?} {declaration:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
        let Transport::Stdio(stdio) = &resolved.transport else {
            panic!("stdio")
        };
        assert_eq!(format!("{}", stdio.env["K"]), "<redacted>");
        assert_eq!(stdio.env["K"].expose(), "hunter2-secret");

        let http = parse(r#"{"url": "http://h/${T}", "headers": {"A": "inline-secret"}}"#).unwrap();
        let shown = format!("{http:?} {:?}", http.resolve("a", &lookup).unwrap());
        assert!(
            !shown.contains("hunter2") && !shown.contains("inline-secret"),
            "{shown}"
        );
    }

    proptest! {
        #[test]
        fn text_without_references_is_unchanged(text in "\\PC*") {
            prop_assume!(!text.contains("${"));
            prop_assert_eq!(expand(&text, &|_| None).unwrap(), text);
        }

        #[test]
        fn every_known_reference_is_replaced(
            parts in proptest::collection::vec(("[^$]{0,8}", "[A-Z_][A-Z0-9_]{0,6}", "[^$]{0,8}"), 1..5)
        ) {
            let lookup = |name: &str| Some(format!("<{}>", name.to_lowercase()));
            let text: String = parts.iter().map(|(a, name, b)| format!("{a}${{{name}}}{b}")).collect();
            let expected: String = parts
                .iter()
                .map(|(a, name, b)| format!("{a}<{}>{b}", name.to_lowercase()))
                .collect();
            let expanded = expand(&text, &lookup).unwrap();
            prop_assert!(!expanded.contains("${"), "{}", expanded);
            prop_assert_eq!(expanded, expected);
        }
    }
}
