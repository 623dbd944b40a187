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

impl Role {
    /// The lowercase name records, the registry and the CLI use.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Operator => "operator",
            Role::Agent => "agent",
            Role::System => "system",
            Role::Anonymous => "anonymous",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who holds a token, independent of the front end it speaks through: the holder's
/// name and the role its token grants.
///
/// Two principals with equal identities are the same holder: `alice` over REST and
/// `alice (mcp:claude-code)` share one. Names are unique in the registry (see
/// [`crate::identities`]) and the built-in names (`operator`, `agent`, `system`,
/// `anonymous`) are reserved there, so equal names mean one holder. This is what
/// "an operator cannot approve a call that it made itself" compares, never the label.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    name: Arc<str>,
    role: Role,
}

impl Identity {
    /// The holder's name: `operator`, `agent`, or a registered name such as `alice`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The role the holder's token grants (over MCP a principal acts as an agent
    /// whatever this says).
    pub fn role(&self) -> Role {
        self.role
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name, self.role)
    }
}

/// An authenticated (or refused) caller and the name the audit trail shows for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    role: Role,
    name: Arc<str>,
    identity: Identity,
}

impl Principal {
    /// The holder `name` acting in `role` under its own name (no front-end label).
    /// Registered principals are built this way; `name` is trusted to be valid
    /// (the registry checks it, see [`crate::identities::check_name`]).
    pub fn named(name: &str, role: Role) -> Principal {
        let name: Arc<str> = Arc::from(name);
        Principal {
            role,
            name: name.clone(),
            identity: Identity { name, role },
        }
    }

    /// The operator token's holder.
    pub fn operator() -> Principal {
        Principal::named("operator", Role::Operator)
    }

    /// The agent token's holder.
    pub fn agent() -> Principal {
        Principal::named("agent", Role::Agent)
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
        Principal::named("system", Role::System)
    }

    /// A caller whose credentials were refused.
    pub fn anonymous() -> Principal {
        Principal::named("anonymous", Role::Anonymous)
    }

    /// The same holder, labelled with the MCP client it speaks through. MCP callers
    /// always have the agent role, whichever token they hold.
    pub fn via_mcp(&self, client_name: &str) -> Principal {
        Principal {
            role: Role::Agent,
            name: Arc::from(format!(
                "{} ({})",
                self.identity.name,
                Principal::mcp_label(client_name)
            )),
            identity: self.identity.clone(),
        }
    }

    /// The token holder behind this principal, whatever front end it speaks through.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Whether `self` and `other` are the same token holder (same name and token
    /// role), e.g. the requester and the would-be approver of a call.
    pub fn is_same_holder(&self, other: &Principal) -> bool {
        self.identity == other.identity
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

    #[test]
    fn named_principals_keep_their_holder_through_mcp() {
        let bot = Principal::named("deploy-bot", Role::Agent);
        assert_eq!(bot.to_string(), "deploy-bot");
        let over_mcp = bot.via_mcp("claude-code");
        assert_eq!(over_mcp.to_string(), "deploy-bot (mcp:claude-code)");
        assert_eq!(over_mcp.identity().name(), "deploy-bot");
        assert!(over_mcp.is_same_holder(&bot));
        // Labelling twice never nests the label.
        assert_eq!(
            over_mcp.via_mcp("other").to_string(),
            "deploy-bot (mcp:other)"
        );
        let alice = Principal::named("alice", Role::Operator);
        let alice_over_mcp = alice.via_mcp("inspector");
        assert_eq!(alice_over_mcp.role(), Role::Agent);
        assert_eq!(alice_over_mcp.identity().role(), Role::Operator);
        assert!(alice.is_same_holder(&alice_over_mcp));
        assert!(!alice.is_same_holder(&Principal::operator()));
        assert!(!alice.is_same_holder(&Principal::named("alice", Role::Agent)));
        assert!(!alice.is_same_holder(&Principal::named("bob", Role::Operator)));
        assert_eq!(alice.identity().to_string(), "alice (operator)");
    }
}
