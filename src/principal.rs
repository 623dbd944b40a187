//! Who is asking: the identity every audit record and authority check uses.

use std::fmt;
use std::sync::Arc;

/// Longest MCP client name kept in a principal's label, in characters.
pub const MAX_CLIENT_NAME_CHARS: usize = 64;

/// What a caller may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// A human operator: may change the mode, simulate incidents and read the audit.
    Operator,
    /// An AI agent: may execute tools and read status.
    Agent,
    /// Proxi itself, e.g. when an emergency lapses.
    System,
    /// A caller that failed authentication; only ever appears in audit records.
    Anonymous,
}

/// An authenticated (or refused) caller and the name the audit trail shows for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    role: Role,
    name: Arc<str>,
}

impl Principal {
    /// The operator token's holder.
    pub fn operator() -> Principal {
        Principal {
            role: Role::Operator,
            name: Arc::from("operator"),
        }
    }

    /// The agent token's holder.
    pub fn agent() -> Principal {
        Principal {
            role: Role::Agent,
            name: Arc::from("agent"),
        }
    }

    /// The name an MCP client gave in `initialize`, made safe to show: `mcp:<name>`.
    ///
    /// Client names are untrusted (the agent picks its own): at most
    /// [`MAX_CLIENT_NAME_CHARS`] characters are kept, and every control, bidi,
    /// zero-width or separator character is escaped (see [`crate::text::escape`]),
    /// so the name can neither hide nor reorder anything in a terminal or a log.
    /// This is a label only: who is asking is the token holder the label is
    /// attached to, see [`Principal::via_mcp`].
    fn mcp_label(client_name: &str) -> String {
        let kept: String = client_name.chars().take(MAX_CLIENT_NAME_CHARS).collect();
        let escaped = crate::text::escape(&kept);
        if crate::text::has_visible_text(&escaped) {
            format!("mcp:{escaped}")
        } else {
            "mcp:unnamed".to_owned()
        }
    }

    /// The agent speaking through the MCP stdio transport, which has no token: the
    /// process that launched `proxi mcp` is the agent. Named `agent (mcp:<client>)`
    /// like an HTTP MCP session, so a client called `operator` reads as
    /// `agent (mcp:operator)`, never as a principal of its own.
    pub fn mcp_stdio_agent(client_name: &str) -> Principal {
        Principal::agent().via_mcp(client_name)
    }

    /// Proxi acting on its own.
    pub fn system() -> Principal {
        Principal {
            role: Role::System,
            name: Arc::from("system"),
        }
    }

    /// A caller whose credentials were refused.
    pub fn anonymous() -> Principal {
        Principal {
            role: Role::Anonymous,
            name: Arc::from("anonymous"),
        }
    }

    /// The same holder, labelled with the MCP client it speaks through. MCP callers
    /// always have the agent role, whichever token they hold.
    pub fn via_mcp(&self, client_name: &str) -> Principal {
        Principal {
            role: Role::Agent,
            name: Arc::from(format!(
                "{} ({})",
                self.name,
                Principal::mcp_label(client_name)
            )),
        }
    }

    /// The caller's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The name audit records show.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mcp_client_names_are_escaped_not_trusted() {
        let name = |client: &str| Principal::mcp_stdio_agent(client).name().to_string();
        assert_eq!(
            name("claude\n\u{7}desktop"),
            "agent (mcp:claude\\n\\u{0007}desktop)"
        );
        assert_eq!(
            name("op\u{202e}rotarepo"),
            "agent (mcp:op\\u{202e}rotarepo)"
        );
        assert_eq!(name("oper\u{200b}ator"), "agent (mcp:oper\\u{200b}ator)");
        assert_eq!(name("a\u{2028}b"), "agent (mcp:a\\u{2028}b)");
        assert_eq!(name(""), "agent (mcp:unnamed)");
        assert_eq!(name("\u{200b}\u{200b}"), "agent (mcp:\\u{200b}\\u{200b})");
        assert_eq!(name("   "), "agent (mcp:unnamed)");
        assert_eq!(
            name(&"x".repeat(500)),
            format!("agent (mcp:{})", "x".repeat(MAX_CLIENT_NAME_CHARS))
        );
        assert_eq!(name("operator"), "agent (mcp:operator)");
        assert_eq!(Principal::mcp_stdio_agent("operator").role(), Role::Agent);
        assert_eq!(
            Principal::agent().via_mcp("inspector").name().as_ref(),
            "agent (mcp:inspector)"
        );
        assert_eq!(Principal::agent().via_mcp("x").role(), Role::Agent);
        assert_eq!(Principal::operator().via_mcp("x").role(), Role::Agent);
    }
}
