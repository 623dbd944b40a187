//! A deterministic planner that stands in for a language model.
//!
//! It implements [`LlmProvider`], so a mock run goes through exactly the same
//! loop, guards, server, policy and audit trail as a real one. Each turn it
//! re-reads the task and the tool results so far and either plans the next
//! calls or writes the final answer in the seed's style (`✓ …` / `❌ …`).
//!
//! The task is split into phases at "then" (run one after another, each in its
//! own step) and into parallel clauses at commas and "and" (one step, several
//! calls). Each clause maps to an intent by keywords; service names come from
//! the simulated infrastructure plus any `<word>-service`/`<word>-server` token;
//! numbers are parsed from the text. It only calls tools in the catalog it was
//! given, except a tool the user names explicitly (`magic_fix`), which it calls
//! so that the server's refusal is shown and audited.

use futures::future::BoxFuture;
use serde::Deserialize;
use serde_json::{Value, json};

use super::provider::{
    AssistantTurn, LlmProvider, Message, ProviderError, ProviderRequest, ToolCallRequest, ToolSpec,
};
use crate::api::{INITIAL_SERVICES, Reason};

/// The model name the mock reports.
pub const MOCK_MODEL: &str = "deterministic-planner";

/// The deterministic planner.
#[derive(Clone, Copy, Debug, Default)]
pub struct MockPlanner;

impl MockPlanner {
    /// A planner.
    pub fn new() -> MockPlanner {
        MockPlanner
    }
}

impl LlmProvider for MockPlanner {
    fn name(&self) -> &str {
        "mock"
    }

    fn model(&self) -> &str {
        MOCK_MODEL
    }

    fn complete<'a>(
        &'a self,
        request: ProviderRequest<'a>,
    ) -> BoxFuture<'a, Result<AssistantTurn, ProviderError>> {
        Box::pin(async move { Ok(plan_turn(request)) })
    }
}

/// What one tool result said, as the loop rendered it for the model.
#[derive(Clone, Debug, Default, Deserialize)]
struct Observed {
    #[serde(default)]
    decision: String,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    reason_code: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    how_to_proceed: Option<String>,
    #[serde(default)]
    known_tools: Option<Vec<String>>,
    #[serde(default)]
    result: Option<Value>,
}

impl Observed {
    fn parse(content: &str) -> Observed {
        serde_json::from_str(content).unwrap_or_else(|_| Observed {
            decision: "failed".to_owned(),
            message: Some(content.to_owned()),
            ..Observed::default()
        })
    }

    fn allowed(&self) -> bool {
        self.decision == "allowed"
    }

    fn result_str(&self, field: &str) -> Option<&str> {
        self.result.as_ref()?.get(field)?.as_str()
    }
}

/// What a clause of the task asks for.
#[derive(Clone, Debug, PartialEq)]
enum Intent {
    Restart(Option<String>),
    /// Check, then restart if unhealthy; without a service, every unhealthy one.
    Fix(Option<String>),
    Status(String),
    ListServices,
    ReadLogs(Option<i64>),
    Scale(Option<i64>),
    DeleteDatabase(String),
    /// Ask an operator for a mode (`request_mode_change`, when the server offers it).
    RequestMode {
        mode: String,
        reason: String,
    },
    /// A tool the user named explicitly, e.g. `magic_fix`.
    Named(String, Option<String>),
    /// Nothing recognisable.
    Unknown(String),
}

/// An intent's results: per stage, the (tool, outcome) of each call it made.
type Stages = Vec<Vec<(String, Observed)>>;

/// One planned call, owned by the intent at `owner` in its phase.
struct Planned {
    owner: usize,
    name: String,
    arguments: Value,
}

fn plan_turn(request: ProviderRequest<'_>) -> AssistantTurn {
    let task = request
        .messages
        .iter()
        .find_map(|message| match message {
            Message::User(text) => Some(text.as_str()),
            _ => None,
        })
        .unwrap_or_default();
    let history = observed_turns(request.messages);
    let phases = parse_task(task);
    let tools = request.tools;

    // Replays the plan against the turns already taken; the first stage without
    // a recorded turn is the next one to ask for.
    let mut turns = history.iter();
    let mut results: Vec<Vec<Stages>> = Vec::new();
    for (phase_index, phase) in phases.iter().enumerate() {
        results.push(vec![Vec::new(); phase.len()]);
        for stage in 0.. {
            let planned: Vec<Planned> = phase
                .iter()
                .enumerate()
                .flat_map(|(owner, intent)| {
                    calls_for(intent, stage, &results[phase_index][owner], tools)
                        .into_iter()
                        .map(move |(name, arguments)| Planned {
                            owner,
                            name,
                            arguments,
                        })
                })
                .collect();
            if planned.is_empty() {
                break;
            }
            let Some(turn) = turns.next() else {
                let step = history.len() + 1;
                return AssistantTurn::calls(
                    planned
                        .into_iter()
                        .enumerate()
                        .map(|(index, call)| {
                            ToolCallRequest::new(
                                format!("mock-{step}-{}", index + 1),
                                call.name,
                                call.arguments,
                            )
                        })
                        .collect(),
                );
            };
            for owner_results in results[phase_index].iter_mut() {
                owner_results.push(Vec::new());
            }
            for (call, observed) in planned.iter().zip(turn.iter()) {
                if let Some(stages) = results[phase_index].get_mut(call.owner)
                    && let Some(current) = stages.last_mut()
                {
                    current.push((call.name.clone(), observed.clone()));
                }
            }
        }
    }

    let mut lines = Vec::new();
    for (phase, phase_results) in phases.iter().zip(&results) {
        for (intent, stages) in phase.iter().zip(phase_results) {
            lines.extend(describe(intent, stages, tools));
        }
    }
    if lines.is_empty() {
        lines.push(format!(
            "❌ I could not match this task to any of my tools ({}).",
            tool_names(tools).join(", ")
        ));
    }
    AssistantTurn::answer(lines.join("\n"))
}

/// The tool results so far, grouped by the assistant turn that asked for them.
fn observed_turns(messages: &[Message]) -> Vec<Vec<Observed>> {
    let mut turns = Vec::new();
    let mut pending: Option<Vec<ToolCallRequest>> = None;
    for message in messages {
        match message {
            Message::Assistant(turn) => pending = Some(turn.tool_calls.clone()),
            Message::ToolResults(results) => {
                let calls = pending.take().unwrap_or_default();
                turns.push(
                    calls
                        .iter()
                        .map(|call| {
                            results
                                .iter()
                                .find(|result| result.call_id == call.id)
                                .map(|result| Observed::parse(&result.content))
                                .unwrap_or_default()
                        })
                        .collect(),
                );
            }
            Message::User(_) => {}
        }
    }
    turns
}

fn has_tool(tools: &[ToolSpec], name: &str) -> bool {
    tools.iter().any(|tool| tool.name == name)
}

fn tool_names(tools: &[ToolSpec]) -> Vec<&str> {
    tools.iter().map(|tool| tool.name.as_str()).collect()
}

/// The calls `intent` makes at `stage`, given its results from earlier stages.
fn calls_for(
    intent: &Intent,
    stage: usize,
    earlier: &[Vec<(String, Observed)>],
    tools: &[ToolSpec],
) -> Vec<(String, Value)> {
    let call = |name: &str, arguments: Value| -> Vec<(String, Value)> {
        if has_tool(tools, name) {
            vec![(name.to_owned(), arguments)]
        } else {
            Vec::new()
        }
    };
    match (intent, stage) {
        (Intent::Restart(Some(service)), 0) => {
            call("restart_service", json!({"service_name": service}))
        }
        (Intent::Status(service), 0) => {
            call("get_service_status", json!({"service_name": service}))
        }
        (Intent::ListServices, 0) => call("list_services", json!({})),
        (Intent::ReadLogs(lines), 0) => call(
            "read_logs",
            match lines {
                Some(lines) => json!({"lines": lines}),
                None => json!({}),
            },
        ),
        (Intent::Scale(Some(count)), 0) => call("scale_fleet", json!({"count": count})),
        (Intent::DeleteDatabase(name), 0) => call("delete_database", json!({"db_name": name})),
        (Intent::RequestMode { mode, reason }, 0) => call(
            "request_mode_change",
            json!({"mode": mode, "reason": reason}),
        ),
        (Intent::Named(tool, service), 0) => {
            let arguments = match service {
                Some(service) => json!({"service_name": service}),
                None => json!({}),
            };
            // Named explicitly by the user: sent even if the catalog lacks it.
            vec![(tool.clone(), arguments)]
        }
        (Intent::Fix(Some(service)), 0) => {
            call("get_service_status", json!({"service_name": service}))
        }
        (Intent::Fix(None), 0) => call("list_services", json!({})),
        (Intent::Fix(service), 1) => {
            let Some((_, observed)) = earlier.first().and_then(|stage| stage.first()) else {
                return Vec::new();
            };
            if !observed.allowed() {
                return Vec::new();
            }
            let unhealthy: Vec<String> = match service {
                Some(service) => observed
                    .result_str("status")
                    .filter(|status| *status != "healthy")
                    .map(|_| vec![service.clone()])
                    .unwrap_or_default(),
                None => unhealthy_services(observed),
            };
            unhealthy
                .into_iter()
                .flat_map(|service| call("restart_service", json!({"service_name": service})))
                .collect()
        }
        _ => Vec::new(),
    }
}

fn unhealthy_services(observed: &Observed) -> Vec<String> {
    observed
        .result
        .as_ref()
        .and_then(|result| result.get("services"))
        .and_then(Value::as_array)
        .map(|services| {
            services
                .iter()
                .filter(|service| service.get("status").and_then(Value::as_str) != Some("healthy"))
                .filter_map(|service| service.get("name").and_then(Value::as_str))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

// --- Reading the task ---------------------------------------------------------

/// Splits the task into sequential phases of parallel intents.
fn parse_task(task: &str) -> Vec<Vec<Intent>> {
    let lower = task.to_lowercase();
    let mut phases = Vec::new();
    let mut last_service: Option<String> = None;
    for phase_text in split_words(&lower, &["then", "afterwards", "afterward"]) {
        let mut intents = Vec::new();
        for clause in phase_text
            .split([',', ';', '&', '.'])
            .flat_map(|part| split_words(part, &["and", "also"]))
        {
            let clause = clause.trim();
            if clause.is_empty() {
                continue;
            }
            let service = find_service(clause)
                .or_else(|| refers_back(clause).then(|| last_service.clone()).flatten());
            if let Some(intent) = parse_clause(clause, service.clone()) {
                if let Some(service) = service {
                    last_service = Some(service);
                }
                intents.push(intent);
            }
        }
        if !intents.is_empty() {
            phases.push(intents);
        }
    }
    phases
}

/// Splits `text` at any of the whole words in `separators`.
fn split_words<'t>(text: &'t str, separators: &[&str]) -> Vec<&'t str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut index = 0;
    let bytes = text.as_bytes();
    while index < text.len() {
        let boundary_before = index == 0 || !is_word_byte(bytes[index - 1]);
        let matched = boundary_before
            .then(|| {
                separators.iter().find(|word| {
                    text[index..].starts_with(**word)
                        && text
                            .as_bytes()
                            .get(index + word.len())
                            .is_none_or(|next| !is_word_byte(*next))
                })
            })
            .flatten();
        match matched {
            Some(word) => {
                parts.push(&text[start..index]);
                index += word.len();
                start = index;
            }
            None => {
                index += 1;
                while !text.is_char_boundary(index) {
                    index += 1;
                }
            }
        }
    }
    parts.push(&text[start..]);
    parts
}

fn is_word_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-' || byte >= 0x80
}

/// Words of a clause: letters, digits, `-` and `_` (so `web-server`, `magic_fix`, `-1` survive).
fn words(clause: &str) -> Vec<&str> {
    clause
        .split(|c: char| !(c.is_alphanumeric() || c == '-' || c == '_'))
        .map(|word| word.trim_end_matches('-'))
        .filter(|word| !word.is_empty())
        .collect()
}

fn has_word(clause: &str, stems: &[&str]) -> bool {
    words(clause)
        .iter()
        .any(|word| stems.iter().any(|stem| word.starts_with(stem)))
}

fn refers_back(clause: &str) -> bool {
    words(clause)
        .iter()
        .any(|word| matches!(*word, "it" | "that" | "this" | "them" | "same"))
}

/// The first service the clause names: an infrastructure service (also written
/// with spaces or run together) or any `<word>-service` / `<word>-server` token.
fn find_service(clause: &str) -> Option<String> {
    let mut found: Vec<(usize, String)> = Vec::new();
    for service in INITIAL_SERVICES {
        let variants = [
            service.to_owned(),
            service.replace('-', " "),
            service.replace('-', ""),
        ];
        if let Some(position) = variants.iter().filter_map(|v| find_word(clause, v)).min() {
            found.push((position, service.to_owned()));
        }
    }
    let mut offset = 0;
    for word in clause.split(|c: char| !(c.is_alphanumeric() || c == '-' || c == '_')) {
        if let Some(position) = clause[offset..].find(word).map(|p| p + offset)
            && !word.is_empty()
        {
            offset = position + word.len();
            let named = (word.ends_with("-service") || word.ends_with("-server"))
                && word.len() > "-service".len()
                && word
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphanumeric());
            if named {
                found.push((position, word.to_owned()));
            }
        }
    }
    found.sort();
    found.into_iter().next().map(|(_, service)| service)
}

/// Byte position of `needle` in `haystack` as whole words.
fn find_word(haystack: &str, needle: &str) -> Option<usize> {
    let bytes = haystack.as_bytes();
    haystack.match_indices(needle).map(|(i, _)| i).find(|&i| {
        let before = i == 0 || !is_word_byte(bytes[i - 1]);
        let after = bytes
            .get(i + needle.len())
            .is_none_or(|next| !is_word_byte(*next));
        before && after
    })
}

/// The first integer in the clause, sign included.
fn find_number(clause: &str) -> Option<i64> {
    words(clause)
        .into_iter()
        .find_map(|word| word.parse::<i64>().ok())
}

/// A `snake_case` word that names a tool explicitly.
fn named_tool(clause: &str) -> Option<String> {
    words(clause)
        .into_iter()
        .find(|word| {
            word.contains('_')
                && word.chars().next().is_some_and(|c| c.is_ascii_lowercase())
                && word
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        })
        .map(str::to_owned)
}

fn parse_clause(clause: &str, service: Option<String>) -> Option<Intent> {
    if let Some(tool) = named_tool(clause) {
        return Some(match tool.as_str() {
            "list_services" => Intent::ListServices,
            "read_logs" => Intent::ReadLogs(find_number(clause)),
            "scale_fleet" => Intent::Scale(find_number(clause)),
            "restart_service" => Intent::Restart(service),
            "get_service_status" => match service {
                Some(service) => Intent::Status(service),
                None => Intent::ListServices,
            },
            "delete_database" => {
                Intent::DeleteDatabase(service.unwrap_or_else(|| "database".to_owned()))
            }
            _ => Intent::Named(tool, service),
        });
    }
    if has_word(clause, &["request", "elevate", "elevation"])
        && has_word(clause, &["emergency", "mode"])
    {
        return Some(Intent::RequestMode {
            mode: "EMERGENCY".to_owned(),
            reason: clause.trim().to_owned(),
        });
    }
    if has_word(
        clause,
        &["delete", "drop", "destroy", "wipe", "remove", "erase"],
    ) && (has_word(clause, &["database", "db"]) || service.as_deref() == Some("database"))
    {
        return Some(Intent::DeleteDatabase(
            service.unwrap_or_else(|| "database".to_owned()),
        ));
    }
    if has_word(clause, &["scale", "fleet", "instance", "replica"]) {
        return Some(Intent::Scale(find_number(clause)));
    }
    if has_word(clause, &["restart", "reboot", "bounce", "cycle"]) {
        return Some(Intent::Restart(service));
    }
    if has_word(
        clause,
        &[
            "fix",
            "repair",
            "heal",
            "recover",
            "resolve",
            "remediate",
            "mitigate",
            "restore",
        ],
    ) {
        return Some(Intent::Fix(service));
    }
    if has_word(clause, &["log"]) {
        return Some(Intent::ReadLogs(find_number(clause)));
    }
    if has_word(
        clause,
        &[
            "status",
            "check",
            "health",
            "inspect",
            "diagnose",
            "investigate",
            "how",
        ],
    ) {
        let all = words(clause)
            .iter()
            .any(|word| matches!(*word, "all" | "every" | "services"));
        return Some(match service {
            Some(service) if !all => Intent::Status(service),
            _ => Intent::ListServices,
        });
    }
    if has_word(clause, &["list", "services", "show", "overview"]) {
        return Some(Intent::ListServices);
    }
    Some(Intent::Unknown(clause.to_owned()))
}

// --- Writing the answer -------------------------------------------------------

fn spoken(service: &str) -> String {
    service.replace('-', " ")
}

/// The lines of the final answer for one intent.
fn describe(
    intent: &Intent,
    stages: &[Vec<(String, Observed)>],
    tools: &[ToolSpec],
) -> Vec<String> {
    let first = stages.first().and_then(|stage| stage.first());
    let missing = |tool: &str| {
        vec![format!(
            "❌ I have no {tool} tool in the catalog ({}).",
            tool_names(tools).join(", ")
        )]
    };
    match intent {
        Intent::Unknown(clause) => vec![format!(
            "❌ I don't know how to \"{clause}\" with the available tools ({}).",
            tool_names(tools).join(", ")
        )],
        Intent::Restart(None) => {
            vec!["❌ Which service should I restart? Name one, e.g. web-server.".to_owned()]
        }
        Intent::Scale(None) => {
            vec!["❌ How many instances? Say e.g. \"scale the fleet to 5\".".to_owned()]
        }
        Intent::Restart(Some(service)) => match first {
            Some((_, observed)) => describe_restart(service, observed, tools),
            None => missing("restart_service"),
        },
        Intent::Status(service) => match first {
            Some((_, observed)) if observed.allowed() => vec![format!(
                "✓ {service} is {}.",
                observed
                    .result_str("status")
                    .unwrap_or("in an unknown state")
            )],
            Some((tool, observed)) => {
                vec![refusal(&format!("check {service}"), tool, observed, tools)]
            }
            None => missing("get_service_status"),
        },
        Intent::ListServices => match first {
            Some((_, observed)) if observed.allowed() => vec![describe_services(observed)],
            Some((tool, observed)) => vec![refusal("list the services", tool, observed, tools)],
            None => missing("list_services"),
        },
        Intent::ReadLogs(_) => match first {
            Some((_, observed)) if observed.allowed() => describe_logs(observed),
            Some((tool, observed)) => vec![refusal("read the logs", tool, observed, tools)],
            None => missing("read_logs"),
        },
        Intent::Scale(Some(count)) => match first {
            Some((_, observed)) if observed.allowed() => vec![
                format!("✓ Scaling the fleet to {count}..."),
                format!(
                    "✓ {}.",
                    observed
                        .result_str("message")
                        .unwrap_or("The fleet was scaled")
                ),
            ],
            Some((tool, observed)) => vec![refusal(
                &format!("scale the fleet to {count}"),
                tool,
                observed,
                tools,
            )],
            None => missing("scale_fleet"),
        },
        Intent::RequestMode { mode, .. } => match first {
            Some((_, observed)) if observed.allowed() => vec![format!(
                "✓ Requested {mode} mode: approval {} is pending. The mode changes only when an operator approves it.",
                observed.result_str("approval_id").unwrap_or("(no id)")
            )],
            Some((tool, observed)) => vec![refusal(
                &format!("request {mode} mode"),
                tool,
                observed,
                tools,
            )],
            None => missing("request_mode_change"),
        },
        Intent::DeleteDatabase(name) => match first {
            Some((_, observed)) if observed.allowed() => {
                vec![format!("✓ Deleted the {name} database.")]
            }
            Some((tool, observed)) => vec![refusal(
                &if name == "database" {
                    "delete the database".to_owned()
                } else {
                    format!("delete the {} database", spoken(name))
                },
                tool,
                observed,
                tools,
            )],
            None => missing("delete_database"),
        },
        Intent::Named(tool, _) => match first {
            Some((_, observed)) if observed.allowed() => {
                vec![format!("✓ {tool} succeeded.")]
            }
            Some((name, observed)) => vec![refusal(&format!("use {tool}"), name, observed, tools)],
            None => Vec::new(),
        },
        Intent::Fix(service) => describe_fix(service.as_deref(), stages, tools),
    }
}

fn describe_fix(
    service: Option<&str>,
    stages: &[Vec<(String, Observed)>],
    tools: &[ToolSpec],
) -> Vec<String> {
    let Some((tool, checked)) = stages.first().and_then(|stage| stage.first()) else {
        return vec![format!(
            "❌ I cannot diagnose anything without list_services or get_service_status ({}).",
            tool_names(tools).join(", ")
        )];
    };
    if !checked.allowed() {
        let what = match service {
            Some(service) => format!("check {service}"),
            None => "list the services".to_owned(),
        };
        return vec![refusal(&what, tool, checked, tools)];
    }
    let restarts = stages.get(1).map(Vec::as_slice).unwrap_or_default();
    let mut lines = Vec::new();
    match service {
        Some(service) => {
            let status = checked
                .result_str("status")
                .unwrap_or("in an unknown state");
            lines.push(format!("✓ Checked {service}: {status}."));
            if status == "healthy" {
                lines.push(format!("✓ {service} is healthy; no restart needed."));
            }
        }
        None => {
            let unhealthy = unhealthy_services(checked);
            if unhealthy.is_empty() {
                lines.push("✓ All services are healthy; nothing to fix.".to_owned());
            } else {
                lines.push(format!(
                    "✓ Found unhealthy services: {}.",
                    unhealthy.join(", ")
                ));
            }
        }
    }
    for (_, observed) in restarts {
        let service = observed
            .result_str("service")
            .map(str::to_owned)
            .or_else(|| service.map(str::to_owned))
            .unwrap_or_else(|| "the service".to_owned());
        lines.extend(describe_restart(&service, observed, tools));
    }
    lines
}

fn describe_restart(service: &str, observed: &Observed, tools: &[ToolSpec]) -> Vec<String> {
    if !observed.allowed() {
        return vec![refusal(
            &format!("restart the {}", spoken(service)),
            "restart_service",
            observed,
            tools,
        )];
    }
    let previous = observed.result_str("previous_status").unwrap_or("healthy");
    let outcome = if previous == "healthy" {
        format!(
            "✓ {}.",
            observed
                .result_str("message")
                .unwrap_or("Service restarted successfully")
        )
    } else {
        "✓ Service restored successfully.".to_owned()
    };
    vec![format!("✓ Restarting {service}..."), outcome]
}

fn describe_services(observed: &Observed) -> String {
    let result = observed.result.as_ref();
    let services: Vec<String> = result
        .and_then(|result| result.get("services"))
        .and_then(Value::as_array)
        .map(|services| {
            services
                .iter()
                .map(|service| {
                    format!(
                        "{} ({})",
                        service.get("name").and_then(Value::as_str).unwrap_or("?"),
                        service.get("status").and_then(Value::as_str).unwrap_or("?")
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let fleet = result
        .and_then(|result| result.get("fleet_size"))
        .and_then(Value::as_i64)
        .map(|size| format!("; fleet size {size}"))
        .unwrap_or_default();
    if services.is_empty() {
        format!("✓ No services are running{fleet}.")
    } else {
        format!("✓ Services: {}{fleet}.", services.join(", "))
    }
}

fn describe_logs(observed: &Observed) -> Vec<String> {
    let entries = observed
        .result
        .as_ref()
        .and_then(|result| result.get("entries"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if entries.is_empty() {
        return vec!["✓ The action log is empty.".to_owned()];
    }
    let mut lines = vec![match entries.len() {
        1 => "✓ 1 recent log entry:".to_owned(),
        count => format!("✓ {count} recent log entries:"),
    }];
    for entry in entries {
        lines.push(format!(
            "  - {} {} {}",
            entry
                .get("timestamp")
                .and_then(Value::as_str)
                .unwrap_or("?"),
            entry.get("action").and_then(Value::as_str).unwrap_or("?"),
            entry
                .get("details")
                .map(Value::to_string)
                .unwrap_or_default()
        ));
    }
    lines
}

/// One `❌` line for a call that did not succeed, built from what the server said.
fn refusal(action: &str, tool: &str, observed: &Observed, tools: &[ToolSpec]) -> String {
    let message = observed
        .message
        .as_deref()
        .unwrap_or("no reason given")
        .trim_end_matches('.');
    let next = observed
        .how_to_proceed
        .as_deref()
        .map(|next| format!(" {next}"))
        .unwrap_or_default();
    let reason = observed.reason_code.as_deref().and_then(Reason::parse);
    match (observed.decision.as_str(), reason) {
        ("denied", Some(Reason::UnknownTool)) => {
            let known = observed
                .known_tools
                .clone()
                .unwrap_or_else(|| tool_names(tools).iter().map(|t| (*t).to_owned()).collect());
            format!(
                "❌ There is no tool named {tool}. The tools I can use are: {}.",
                known.join(", ")
            )
        }
        ("denied", Some(Reason::BlockedInMode | Reason::NotAllowed)) => {
            let mode = observed.mode.as_deref().unwrap_or("the current");
            let mut sentence = format!("❌ I cannot {action} in {mode} mode.");
            match mode_policy_sentence(mode, tools) {
                Some(policy) => sentence.push_str(&format!(" {policy}")),
                None => sentence.push_str(&format!(" {message}.")),
            }
            match switch_sentence(tool, mode, tools) {
                Some(switch) => sentence.push_str(&format!(" {switch}")),
                None => sentence.push_str(&next),
            }
            sentence
        }
        ("denied", _) => match observed.mode.as_deref() {
            Some(mode) if reason == Some(Reason::ConstraintViolated) => {
                format!("❌ I cannot {action} in {mode} mode: {message}.{next}")
            }
            _ => format!("❌ I cannot {action}: {message}.{next}"),
        },
        _ => format!("❌ I cannot {action}: {message}.{next}"),
    }
}

/// What the policy lets `mode` do, from the catalog's per-tool modes and categories.
fn mode_policy_sentence(mode: &str, tools: &[ToolSpec]) -> Option<String> {
    let allowed: Vec<&ToolSpec> = tools
        .iter()
        .filter(|tool| {
            tool.allowed_modes
                .as_ref()
                .is_some_and(|modes| modes.iter().any(|m| m == mode))
        })
        .collect();
    if allowed.is_empty() || tools.iter().any(|tool| tool.allowed_modes.is_none()) {
        return None;
    }
    if allowed
        .iter()
        .all(|tool| tool.category.as_deref() == Some("read_only"))
    {
        Some("Policy only allows read-only operations.".to_owned())
    } else {
        let names: Vec<&str> = allowed.iter().map(|tool| tool.name.as_str()).collect();
        Some(format!(
            "Policy only allows {} in {mode} mode.",
            names.join(", ")
        ))
    }
}

/// Which mode to ask for, from the catalog's modes for `tool`.
fn switch_sentence(tool: &str, mode: &str, tools: &[ToolSpec]) -> Option<String> {
    let spec = tools.iter().find(|spec| spec.name == tool)?;
    let modes: Vec<&str> = spec
        .allowed_modes
        .as_ref()?
        .iter()
        .map(String::as_str)
        .filter(|m| *m != mode)
        .collect();
    if modes.is_empty() {
        return None;
    }
    let purpose = match spec.category.as_deref() {
        Some("active") => "corrective actions",
        _ => "this action",
    };
    Some(format!(
        "Switch to {} mode for {purpose}.",
        modes.join(" or ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, category: &str, modes: &[&str]) -> ToolSpec {
        ToolSpec {
            name: name.to_owned(),
            description: String::new(),
            input_schema: json!({"type": "object"}),
            category: Some(category.to_owned()),
            allowed_modes: Some(modes.iter().map(|m| (*m).to_owned()).collect()),
        }
    }

    fn catalog() -> Vec<ToolSpec> {
        vec![
            spec("list_services", "read_only", &["NORMAL", "EMERGENCY"]),
            spec("get_service_status", "read_only", &["NORMAL", "EMERGENCY"]),
            spec("read_logs", "read_only", &["NORMAL", "EMERGENCY"]),
            spec("restart_service", "active", &["EMERGENCY"]),
            spec("scale_fleet", "active", &["EMERGENCY"]),
            spec("delete_database", "destructive", &[]),
        ]
    }

    #[test]
    fn tasks_map_to_intents() {
        let web = Some("web-server".to_owned());
        assert_eq!(
            parse_task("Restart the web server"),
            vec![vec![Intent::Restart(web.clone())]]
        );
        assert_eq!(
            parse_task("Fix the critical web server issue"),
            vec![vec![Intent::Fix(web.clone())]]
        );
        assert_eq!(
            parse_task("Restart the web server, scale the fleet to 5 and delete the database"),
            vec![vec![
                Intent::Restart(web.clone()),
                Intent::Scale(Some(5)),
                Intent::DeleteDatabase("database".to_owned()),
            ]]
        );
        assert_eq!(
            parse_task("Check the web server status, then restart it"),
            vec![
                vec![Intent::Status("web-server".to_owned())],
                vec![Intent::Restart(web.clone())]
            ]
        );
        assert_eq!(
            parse_task("Scale the fleet to -1"),
            vec![vec![Intent::Scale(Some(-1))]]
        );
        assert_eq!(
            parse_task("Use the magic_fix tool on the web server"),
            vec![vec![Intent::Named("magic_fix".to_owned(), web.clone())]]
        );
        assert_eq!(
            parse_task("Restart the payment-service"),
            vec![vec![Intent::Restart(Some("payment-service".to_owned()))]]
        );
        assert_eq!(
            parse_task("Check the status of all services"),
            vec![vec![Intent::ListServices]]
        );
        assert_eq!(parse_task("show logs"), vec![vec![Intent::ReadLogs(None)]]);
        assert_eq!(
            parse_task("How is the api gateway doing?"),
            vec![vec![Intent::Status("api-gateway".to_owned())]]
        );
    }

    fn denied(mode: &str, reason: &str) -> Observed {
        Observed {
            decision: "denied".to_owned(),
            mode: Some(mode.to_owned()),
            reason_code: Some(reason.to_owned()),
            message: Some("Tool 'restart_service' is blocked in NORMAL mode".to_owned()),
            how_to_proceed: Some("Ask an operator.".to_owned()),
            ..Observed::default()
        }
    }

    #[test]
    fn refusals_use_the_policy_from_the_catalog_and_the_answer() {
        let line = refusal(
            "restart the web server",
            "restart_service",
            &denied("NORMAL", Reason::BlockedInMode.as_str()),
            &catalog(),
        );
        assert_eq!(
            line,
            "❌ I cannot restart the web server in NORMAL mode. Policy only allows read-only operations. Switch to EMERGENCY mode for corrective actions."
        );
        // Without catalog metadata (e.g. over MCP) the server's own words are used.
        let mut bare = catalog();
        for tool in &mut bare {
            tool.allowed_modes = None;
        }
        let line = refusal(
            "restart the web server",
            "restart_service",
            &denied("NORMAL", Reason::BlockedInMode.as_str()),
            &bare,
        );
        assert_eq!(
            line,
            "❌ I cannot restart the web server in NORMAL mode. Tool 'restart_service' is blocked in NORMAL mode. Ask an operator."
        );
    }

    #[test]
    fn only_catalog_tools_are_planned() {
        let tools = vec![spec("list_services", "read_only", &["NORMAL"])];
        let messages = [Message::User("Restart the web server".to_owned())];
        let turn = plan_turn(ProviderRequest {
            system: "",
            messages: &messages,
            tools: &tools,
        });
        assert!(turn.is_final());
        assert!(turn.text.unwrap().contains("no restart_service tool"));
    }

    proptest::proptest! {
        #[test]
        fn any_task_gets_a_plan_or_an_answer(task in "\\PC{0,80}") {
            let tools = catalog();
            let messages = [Message::User(task)];
            let turn = plan_turn(ProviderRequest { system: "", messages: &messages, tools: &tools });
            proptest::prop_assert!(turn.is_final() == turn.text.is_some());
        }
    }

    #[test]
    fn word_splitting_respects_word_boundaries() {
        assert_eq!(split_words("check x then restart", &["then"]).len(), 2);
        assert_eq!(split_words("strengthen", &["then"]).len(), 1);
        assert_eq!(find_word("the web server", "web server"), Some(4));
        assert_eq!(find_word("webserverx", "webserver"), None);
    }
}
