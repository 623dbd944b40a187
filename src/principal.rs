//! Who is asking: the identity every audit record and authority check uses.

use std::fmt;
use std::sync::Arc;

/// What a caller may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

    /// An MCP client known by the name it gave in `initialize`.
    pub fn mcp_client(client_name: &str) -> Principal {
        // Client names are untrusted: keep them short and printable.
        let cleaned: String = client_name
            .chars()
            .filter(|c| !c.is_control())
            .take(64)
            .collect();
        let cleaned = if cleaned.is_empty() {
            "unnamed".to_owned()
        } else {
            cleaned
        };
        Principal {
            role: Role::Agent,
            name: Arc::from(format!("mcp:{cleaned}")),
        }
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
        let client = Principal::mcp_client(client_name);
        Principal {
            role: Role::Agent,
            name: Arc::from(format!("{} ({})", self.name, client.name)),
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
    fn mcp_client_names_are_sanitized() {
        assert_eq!(
            Principal::mcp_client("claude\n\u{7}desktop")
                .name()
                .as_ref(),
            "mcp:claudedesktop"
        );
        assert_eq!(Principal::mcp_client("").name().as_ref(), "mcp:unnamed");
        assert_eq!(
            Principal::mcp_client(&"x".repeat(500)).name().len(),
            "mcp:".len() + 64
        );
        assert_eq!(
            Principal::agent().via_mcp("inspector").name().as_ref(),
            "agent (mcp:inspector)"
        );
        assert_eq!(Principal::agent().via_mcp("x").role(), Role::Agent);
        assert_eq!(Principal::operator().via_mcp("x").role(), Role::Agent);
    }
}
