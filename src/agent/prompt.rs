//! What the model is told: the system prompt and each tool result.
//!
//! The system prompt puts what never changes during a deployment first (who the
//! agent is, the tools, the rules, the modes) and the mode in force last, so a
//! model server's prefix cache keeps everything but the last lines across mode
//! changes. A mode change used to invalidate about 1,150 tokens of a 1.5B
//! model's cache (70–90 s on a 2-core machine, against 5–17 s warm).

use serde_json::{Map, Value, json};

use super::backend::{Decision, UNKNOWN_TOOL};
use super::provider::ToolSpec;
use super::{ALREADY_DENIED, ALREADY_DONE, ALREADY_FAILED, TOO_MANY_CALLS, ToolCallRecord};
use crate::api::PolicyStatus;

/// The heading of the prompt's last, mode-dependent part.
pub const MODE_SECTION: &str = "Policy at the start of this run:";

/// The system prompt: who the agent is, the tools, the rules, then the mode.
pub fn system_prompt(status: &PolicyStatus, tools: &[ToolSpec]) -> String {
    let list = |names: &[String]| {
        if names.is_empty() {
            "none".to_owned()
        } else {
            names.join(", ")
        }
    };
    let mut prompt = String::new();
    prompt.push_str(
        "You are Proxi's SRE agent. You operate cloud infrastructure only through the tools provided. \
         Every call passes Proxi's policy engine and is recorded in a tamper-evident audit trail.\n\n",
    );
    prompt.push_str("Tools:\n");
    for tool in tools {
        let mut notes = Vec::new();
        if let Some(category) = &tool.category {
            notes.push(category.replace('_', "-"));
        }
        if let Some(modes) = &tool.allowed_modes {
            notes.push(if modes.is_empty() {
                "never allowed".to_owned()
            } else {
                format!("allowed in {}", modes.join(", "))
            });
        }
        let notes = if notes.is_empty() {
            String::new()
        } else {
            format!(" [{}]", notes.join("; "))
        };
        prompt.push_str(&format!("- {}{}: {}\n", tool.name, notes, tool.description));
    }
    // "Start each line about a completed action with ✓" used to be rule 4. Small
    // models read it as a format to fill in and wrote "✅ restart_service(...)"
    // without calling anything; the rules now tie every claim to a tool result.
    prompt.push_str(
        "\nRules:\n\
         1. Act only by calling the tools above through the tool-calling interface. A tool call written \
            as text is not a call. Never invent tool names.\n\
         2. If the policy blocks a call, do not retry it and do not look for a way around the policy. \
            Tell the user it was blocked, why (the mode and the policy's reason), and suggest alternatives: \
            read-only diagnosis, or asking an operator to switch to a mode that allows the action.\n\
         3. If arguments are rejected, explain the constraint; retry only with valid arguments that still do what the user asked.\n\
         4. Do only what the user asked. Never call an active tool the user did not ask for.\n\
         5. Report only what the tool results in this conversation show. Say an action was done only if its \
            call came back with decision \"allowed\"; say plainly what was refused or failed, and why. Answer briefly.\n\n",
    );
    prompt.push_str(&format!(
        "Modes: {} (default {}). Only a human operator can change the mode; it may change during this run, \
         and the server's answer to each call is authoritative.\n",
        list(&status.available_modes),
        status.default_mode
    ));
    prompt.push_str(&format!(
        "Tools blocked in every mode: {}\n\n",
        list(&status.always_blocked)
    ));
    prompt.push_str(MODE_SECTION);
    prompt.push('\n');
    prompt.push_str(&format!(
        "- Current mode: {} ({})\n",
        status.mode, status.description
    ));
    prompt.push_str(&format!(
        "- Tools allowed in {} mode: {}\n",
        status.mode,
        list(&status.allowed_tools)
    ));
    prompt
}

/// What the model is told about one call: JSON, with an instruction for refusals.
pub fn render_for_model(record: &ToolCallRecord) -> String {
    let mut body = Map::new();
    body.insert("tool".into(), json!(record.tool));
    body.insert("decision".into(), json!(record.decision));
    if let Some(mode) = &record.mode {
        body.insert("mode".into(), json!(mode));
    }
    if let Some(reason) = &record.reason_code {
        body.insert("reason_code".into(), json!(reason));
    }
    if let Some(message) = &record.message {
        body.insert("message".into(), json!(message));
    }
    if let Some(next) = &record.how_to_proceed {
        body.insert("how_to_proceed".into(), json!(next));
    }
    if let Some(known) = &record.known_tools {
        body.insert("known_tools".into(), json!(known));
    }
    if let Some(result) = &record.result {
        body.insert("result".into(), result.clone());
    }
    let reason = record.reason_code.as_deref();
    let instruction = match record.decision {
        Decision::Allowed if reason == Some(ALREADY_DONE) => Some(
            "Already done: this exact call succeeded earlier in this run. Do not repeat it. Answer the user.",
        ),
        Decision::Allowed => None,
        _ if reason == Some(TOO_MANY_CALLS) => {
            Some("Not run: this turn asked for too many tool calls. Make fewer calls per turn.")
        }
        _ if reason == Some(ALREADY_DENIED) || reason == Some(ALREADY_FAILED) => Some(
            "Not sent again: the same call gets the same answer. Do not retry it. Explain the earlier answer to the user.",
        ),
        Decision::Denied if reason == Some(UNKNOWN_TOOL) => {
            Some("This tool does not exist. Use only the tools in known_tools.")
        }
        Decision::Denied => Some(
            "Blocked by policy. Do not retry this call. Explain to the user why it was blocked and suggest alternatives.",
        ),
        Decision::Rejected => {
            Some("The arguments were invalid and nothing ran. Explain the constraint to the user.")
        }
        Decision::Failed => {
            Some("The tool ran and failed; nothing changed. Do not retry the same call.")
        }
    };
    if let Some(instruction) = instruction {
        body.insert("instruction".into(), json!(instruction));
    }
    Value::Object(body).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(mode: &str, allowed: &[&str]) -> PolicyStatus {
        PolicyStatus {
            mode: mode.into(),
            description: "Read-only.".into(),
            allowed_tools: allowed.iter().map(|tool| (*tool).to_owned()).collect(),
            blocked_tools: vec!["restart_service".into()],
            always_blocked: vec!["delete_database".into()],
            emergency_expires_at: None,
            default_mode: "NORMAL".into(),
            available_modes: vec!["NORMAL".into(), "EMERGENCY".into()],
            reason: None,
            changed_by: "system".into(),
            changed_at: "now".into(),
            policy_hash: String::new(),
        }
    }

    fn tools() -> Vec<ToolSpec> {
        vec![ToolSpec {
            name: "restart_service".into(),
            description: "Restart a service.".into(),
            input_schema: json!({"type": "object"}),
            category: Some("active".into()),
            allowed_modes: Some(vec!["EMERGENCY".into()]),
        }]
    }

    #[test]
    fn the_system_prompt_carries_the_policy_and_the_rules() {
        let prompt = system_prompt(&status("NORMAL", &["list_services"]), &tools());
        assert!(prompt.contains("Current mode: NORMAL (Read-only.)"));
        assert!(prompt.contains("Tools allowed in NORMAL mode: list_services"));
        assert!(prompt.contains("Tools blocked in every mode: delete_database"));
        assert!(
            prompt.contains("- restart_service [active; allowed in EMERGENCY]: Restart a service.")
        );
        assert!(prompt.contains("do not retry it"));
        assert!(prompt.contains("suggest alternatives"));
        // The format rule that invited claims without calls is gone.
        assert!(!prompt.contains("start each line about a completed action with ✓"));
    }

    #[test]
    fn a_mode_change_changes_only_the_end_of_the_prompt() {
        let normal = system_prompt(&status("NORMAL", &["list_services"]), &tools());
        let emergency = system_prompt(
            &status("EMERGENCY", &["list_services", "restart_service"]),
            &tools(),
        );
        let common = normal
            .bytes()
            .zip(emergency.bytes())
            .take_while(|(a, b)| a == b)
            .count();
        let stable = normal.find(MODE_SECTION).unwrap() + MODE_SECTION.len();
        assert!(
            common >= stable,
            "the prompts differ before the mode section"
        );
        assert!(normal[stable..].lines().count() <= 3);
    }

    #[test]
    fn refusals_tell_the_model_not_to_retry() {
        let record = ToolCallRecord {
            step: 1,
            call_id: "c1".into(),
            tool: "restart_service".into(),
            arguments: json!({"service_name": "web-server"}),
            forwarded: true,
            from_text: false,
            decision: Decision::Denied,
            reason_code: Some(crate::api::Reason::BlockedInMode.as_str().into()),
            message: Some("Tool 'restart_service' is blocked in NORMAL mode".into()),
            how_to_proceed: Some("Ask an operator".into()),
            known_tools: None,
            mode: Some("NORMAL".into()),
            audit_seq: Some(3),
            result: None,
            approval: None,
        };
        let rendered: Value = serde_json::from_str(&render_for_model(&record)).unwrap();
        assert_eq!(rendered["decision"], "denied");
        assert_eq!(rendered["mode"], "NORMAL");
        assert!(
            rendered["instruction"]
                .as_str()
                .unwrap()
                .contains("Do not retry")
        );
    }
}
