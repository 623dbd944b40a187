//! How an upstream's tools are named to agents: `<upstream>__<tool>`.
//!
//! LLM providers accept function names matching `^[A-Za-z0-9_-]{1,64}$`; a tool
//! whose exposed name would break that rule is left out and reported, never renamed
//! (a renamed tool could collide with, or pass for, another one).

use std::fmt;

/// Separator between the upstream's name and the tool's own name.
pub const SEPARATOR: &str = "__";

/// Longest exposed name the providers accept.
pub const MAX_EXPOSED_NAME_LEN: usize = 64;

/// Why a tool was left out of the catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// The exposed name would be longer than [`MAX_EXPOSED_NAME_LEN`] bytes.
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// The tool's name contains a character outside `[A-Za-z0-9_-]`.
    InvalidCharacter,
    /// The tool's name is empty.
    Empty,
    /// Another tool of the same upstream already maps to this exposed name.
    Duplicate,
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkipReason::TooLong { len } => write!(
                f,
                "the exposed name would be {len} characters, more than {MAX_EXPOSED_NAME_LEN}"
            ),
            SkipReason::InvalidCharacter => {
                f.write_str("the name has characters outside A-Z, a-z, 0-9, '_' and '-'")
            }
            SkipReason::Empty => f.write_str("the name is empty"),
            SkipReason::Duplicate => f.write_str("another tool has the same name"),
        }
    }
}

/// A tool left out of the catalog, for the log and `policy check --connect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedTool {
    /// The upstream that offered it.
    pub upstream: String,
    /// The tool's name as the upstream gave it (escaped with `{:?}` when shown).
    pub tool: String,
    /// Why it was left out.
    pub reason: SkipReason,
}

/// The name agents see for `tool` of `upstream`, or why it cannot have one.
/// `upstream` is assumed valid (see [`super::config::is_valid_upstream_name`]).
pub fn exposed_name(upstream: &str, tool: &str) -> Result<String, SkipReason> {
    if tool.is_empty() {
        return Err(SkipReason::Empty);
    }
    if !tool
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(SkipReason::InvalidCharacter);
    }
    let name = format!("{upstream}{SEPARATOR}{tool}");
    if name.len() > MAX_EXPOSED_NAME_LEN {
        return Err(SkipReason::TooLong { len: name.len() });
    }
    Ok(name)
}

/// Maps `items` (each with its upstream tool name) to exposed names. Returns the
/// kept items with their exposed names, in order, and the skipped ones; each
/// skipped tool is also logged at `warn`.
pub fn expose_all<T>(
    upstream: &str,
    items: Vec<T>,
    tool_name: impl Fn(&T) -> &str,
) -> (Vec<(String, T)>, Vec<SkippedTool>) {
    let mut kept: Vec<(String, T)> = Vec::with_capacity(items.len());
    let mut skipped = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for item in items {
        let tool = tool_name(&item).to_owned();
        let outcome = exposed_name(upstream, &tool).and_then(|name| {
            if seen.insert(name.clone()) {
                Ok(name)
            } else {
                Err(SkipReason::Duplicate)
            }
        });
        match outcome {
            Ok(name) => kept.push((name, item)),
            Err(reason) => {
                tracing::warn!(upstream, tool = ?tool, %reason, "upstream tool left out of the catalog");
                skipped.push(SkippedTool {
                    upstream: upstream.to_owned(),
                    tool,
                    reason,
                });
            }
        }
    }
    (kept, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_use_a_double_underscore() {
        assert_eq!(
            exposed_name("fs", "read_text_file").unwrap(),
            "fs__read_text_file"
        );
        assert_eq!(exposed_name("ev", "get-sum").unwrap(), "ev__get-sum");
    }

    #[test]
    fn the_64_character_limit_counts_the_prefix() {
        let fits = "t".repeat(64 - "fs__".len());
        assert_eq!(exposed_name("fs", &fits).unwrap().len(), 64);
        let too_long = format!("{fits}x");
        assert_eq!(
            exposed_name("fs", &too_long),
            Err(SkipReason::TooLong { len: 65 })
        );
    }

    #[test]
    fn odd_characters_and_empty_names_are_left_out() {
        for bad in [
            "read file",
            "read.file",
            "fs/read",
            "lé",
            "a\u{202e}b",
            "x\n",
        ] {
            assert_eq!(
                exposed_name("fs", bad),
                Err(SkipReason::InvalidCharacter),
                "{bad:?}"
            );
        }
        assert_eq!(exposed_name("fs", ""), Err(SkipReason::Empty));
    }

    #[test]
    fn expose_all_keeps_order_and_reports_every_skip() {
        let long = "z".repeat(70);
        let tools = vec!["a", "bad name", "b", "a", &*long];
        let (kept, skipped) = expose_all("up", tools, |t| t);
        let kept_names: Vec<_> = kept.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(kept_names, ["up__a", "up__b"]);
        let reasons: Vec<_> = skipped
            .iter()
            .map(|s| (s.tool.as_str(), s.reason.clone()))
            .collect();
        assert_eq!(
            reasons,
            [
                ("bad name", SkipReason::InvalidCharacter),
                ("a", SkipReason::Duplicate),
                (&*long, SkipReason::TooLong { len: 74 }),
            ]
        );
        assert!(skipped.iter().all(|s| s.upstream == "up"));
        assert!(skipped[0].reason.to_string().contains("characters outside"));
    }
}
