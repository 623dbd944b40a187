//! Reading a model's text: tool calls written as JSON, calls merely described,
//! and claims of actions that no call performed.
//!
//! Small models often write a tool call into their reply instead of using the
//! tool interface (`{"name": "restart_service", "arguments": {...}}`, fenced or
//! not), or announce "✅ restart_service(web-server)" without calling anything.
//! The first is executed through the same path as a native call (policy, audit);
//! the second gets one re-prompt; a final answer that still claims an action no
//! allowed call performed is marked unverified.

use serde_json::Value;

use super::ToolCallRecord;
use super::backend::Decision;
use super::provider::ToolCallRequest;

/// Only this much of a reply is searched for calls (models do not write calls in essays).
const MAX_SCANNED_BYTES: usize = 32 * 1024;
/// Most calls taken from one reply's text.
const MAX_TEXT_CALLS: usize = 16;

/// Tool calls written as JSON in `text`: objects with a `name` (or `tool`,
/// `tool_name`, `function`) and `arguments` (or `parameters`, `args`, `input`),
/// also inside `{"function": {...}}`, `{"tool_calls": [...]}` or an array. An
/// object without an arguments key counts only if its name is a known tool, so
/// ordinary JSON such as `{"name": "web-server", "status": "ok"}` is not a call.
pub fn calls_in_text(text: &str, known: &[String], step: usize) -> Vec<ToolCallRequest> {
    let mut end = text.len().min(MAX_SCANNED_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let text = &text[..end];
    let mut calls = Vec::new();
    let mut position = 0;
    while position < text.len() && calls.len() < MAX_TEXT_CALLS {
        let Some(offset) = text[position..].find(['{', '[']) else {
            break;
        };
        let start = position + offset;
        let mut values = serde_json::Deserializer::from_str(&text[start..]).into_iter::<Value>();
        match values.next() {
            Some(Ok(value)) => {
                let before = calls.len();
                collect_calls(&value, known, &mut calls);
                position = if calls.len() > before {
                    start + values.byte_offset()
                } else {
                    start + 1
                };
            }
            _ => position = start + 1,
        }
    }
    calls.truncate(MAX_TEXT_CALLS);
    calls
        .into_iter()
        .enumerate()
        .map(|(index, (name, arguments))| {
            ToolCallRequest::from_wire(format!("text-{step}-{}", index + 1), name, arguments)
        })
        .collect()
}

fn collect_calls(value: &Value, known: &[String], calls: &mut Vec<(String, Value)>) {
    match value {
        Value::Array(items) => {
            for item in items {
                collect_calls(item, known, calls);
            }
        }
        Value::Object(object) => {
            if let Some(Value::Array(items)) = object.get("tool_calls") {
                for item in items {
                    collect_calls(item, known, calls);
                }
                return;
            }
            if let Some(function @ Value::Object(_)) = object.get("function") {
                collect_calls(function, known, calls);
                return;
            }
            let name = ["name", "tool", "tool_name", "function"]
                .iter()
                .find_map(|key| object.get(*key).and_then(Value::as_str));
            let arguments = ["arguments", "parameters", "args", "input"]
                .iter()
                .find_map(|key| object.get(*key));
            let Some(name) = name.filter(|name| is_tool_name(name)) else {
                return;
            };
            if arguments.is_some() || known.iter().any(|tool| tool == name) {
                calls.push((name.to_owned(), arguments.cloned().unwrap_or(Value::Null)));
            }
        }
        _ => {}
    }
}

/// Whether `name` could be a tool name: an identifier, not a sentence.
fn is_tool_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 64
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// Whether `text` describes a call instead of making one: `<tool_call>` tags,
/// JSON-looking text that names a tool, or `tool(` for a tool the run never sent.
pub fn looks_like_a_written_call(text: &str, known: &[String], sent: &[&ToolCallRecord]) -> bool {
    if text.contains("<tool_call>") {
        return true;
    }
    known.iter().any(|tool| {
        let never_sent = !sent.iter().any(|call| call.forwarded && &call.tool == tool);
        let named = text.contains(tool.as_str());
        let json_like = text.contains("\"name\"") || text.contains("\"arguments\"");
        named && (json_like || (never_sent && text.contains(&format!("{tool}("))))
    })
}

/// Markers of a completed action.
const DONE_MARKS: [&str; 4] = ["✓", "✅", "✔", "☑"];
/// Words that make a line about something that did not happen.
const NEGATIONS: [&str; 16] = [
    "not ", "n't", "cannot", "unable", "blocked", "denied", "refused", "rejected", "failed",
    "won't", "no ", "nothing", "never", "❌", "would ", "could ",
];

/// The lines of `answer` that claim an action no allowed call of the run performed.
///
/// A line claims an action if it carries a done mark (✓, ✅) or a completion
/// verb ("restarted", "scaled", "deleted", "restored", "fixed"), and is not
/// negated. A restart needs an allowed `restart_service`, scaling an allowed
/// `scale_fleet`, deletion an allowed `delete_database`, a fix either of the
/// first two; a bare done mark needs at least one allowed call.
pub fn unverified_claims(answer: &str, calls: &[&ToolCallRecord]) -> Vec<String> {
    let ran = |tools: &[&str]| {
        calls.iter().any(|call| {
            call.forwarded
                && call.decision == Decision::Allowed
                && tools.contains(&call.tool.as_str())
        })
    };
    let anything_ran = calls
        .iter()
        .any(|call| call.forwarded && call.decision == Decision::Allowed);
    let mut claims = Vec::new();
    for line in answer.lines() {
        let lower = line.to_lowercase();
        if NEGATIONS.iter().any(|word| lower.contains(word)) {
            continue;
        }
        let marked = DONE_MARKS.iter().any(|mark| line.contains(mark));
        let says = |stems: &[&str], done: &[&str]| {
            (marked && stems.iter().any(|stem| lower.contains(stem)))
                || done.iter().any(|word| lower.contains(word))
        };
        let verified = if says(&["restart", "reboot"], &["restarted", "rebooted"]) {
            ran(&["restart_service"])
        } else if says(&["scal"], &["scaled"]) {
            ran(&["scale_fleet"])
        } else if says(&["delet", "drop"], &["deleted", "dropped"]) {
            ran(&["delete_database"])
        } else if says(
            &["fix", "restor", "resolv"],
            &["fixed", "restored", "resolved"],
        ) {
            ran(&["restart_service", "scale_fleet"])
        } else if marked {
            anything_ran
        } else {
            true
        };
        if !verified {
            claims.push(line.trim().to_owned());
        }
    }
    claims
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn known() -> Vec<String> {
        ["list_services", "restart_service", "scale_fleet"]
            .iter()
            .map(|tool| (*tool).to_owned())
            .collect()
    }

    #[test]
    fn json_calls_in_text_are_found_in_every_usual_shape() {
        let text = "I will restart it.\n```json\n{\"name\": \"restart_service\", \"arguments\": {\"service_name\": \"web-server\"}}\n```";
        let calls = calls_in_text(text, &known(), 2);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].name, "restart_service");
        assert_eq!(calls[0].arguments, json!({"service_name": "web-server"}));
        assert_eq!(calls[0].id, "text-2-1");

        let text = r#"[{"function": {"name": "scale_fleet", "arguments": "{\"count\": 5}"}}, {"name": "list_services"}]"#;
        let calls = calls_in_text(text, &known(), 1);
        let names: Vec<&str> = calls.iter().map(|call| call.name.as_str()).collect();
        assert_eq!(names, ["scale_fleet", "list_services"]);
        assert_eq!(calls[0].arguments, json!({"count": 5}));
        assert_eq!(calls[1].arguments, json!({}));

        // An unknown name with arguments is still a call: the server audits and refuses it.
        let calls = calls_in_text(r#"{"tool": "magic_fix", "parameters": {}}"#, &known(), 1);
        assert_eq!(calls[0].name, "magic_fix");
    }

    #[test]
    fn ordinary_json_and_prose_are_not_calls() {
        assert!(
            calls_in_text(
                r#"{"name": "web-server", "status": "healthy"}"#,
                &known(),
                1
            )
            .is_empty()
        );
        assert!(
            calls_in_text(
                r#"{"name": "a sentence here", "arguments": {}}"#,
                &known(),
                1
            )
            .is_empty()
        );
        assert!(calls_in_text("All good {not json", &known(), 1).is_empty());
        assert!(calls_in_text("", &known(), 1).is_empty());
    }

    #[test]
    fn described_calls_are_recognised() {
        assert!(looks_like_a_written_call(
            "✅ restart_service(web-server)",
            &known(),
            &[]
        ));
        assert!(looks_like_a_written_call(
            "<tool_call>x</tool_call>",
            &known(),
            &[]
        ));
        assert!(!looks_like_a_written_call(
            "All services are healthy.",
            &known(),
            &[]
        ));
    }

    fn record(tool: &str, decision: Decision) -> ToolCallRecord {
        ToolCallRecord {
            step: 1,
            call_id: "c".into(),
            tool: tool.into(),
            arguments: json!({}),
            forwarded: true,
            from_text: false,
            decision,
            reason_code: None,
            message: None,
            how_to_proceed: None,
            known_tools: None,
            mode: None,
            audit_seq: None,
            result: None,
            approval: None,
        }
    }

    #[test]
    fn claims_need_an_allowed_call_that_performed_them() {
        let none: Vec<&ToolCallRecord> = Vec::new();
        assert_eq!(
            unverified_claims("✅ restart_service(web-server)\nDone.", &none),
            ["✅ restart_service(web-server)"]
        );
        assert_eq!(
            unverified_claims("The web server was restarted.", &none).len(),
            1
        );
        let denied = record("restart_service", Decision::Denied);
        assert_eq!(
            unverified_claims("✓ Restarted web-server.", &[&denied]).len(),
            1
        );
        let allowed = record("restart_service", Decision::Allowed);
        assert!(
            unverified_claims(
                "✓ Restarting web-server...\n✓ Service restored successfully.",
                &[&allowed]
            )
            .is_empty()
        );
        // Refusals and negations claim nothing.
        assert!(
            unverified_claims("❌ I cannot restart the web server in NORMAL mode.", &none)
                .is_empty()
        );
        assert!(unverified_claims("The service was not restarted.", &none).is_empty());
        let read = record("list_services", Decision::Allowed);
        assert!(
            unverified_claims("✓ web-server is healthy; no restart needed.", &[&read]).is_empty()
        );
        assert_eq!(
            unverified_claims("✓ Scaled the fleet to 5.", &[&allowed]).len(),
            1
        );
    }
}
