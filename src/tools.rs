//! The six governed tools: their names, categories, typed arguments and JSON Schemas.
//!
//! Arguments arrive as untrusted JSON. [`ToolCall::parse`] turns them into a typed
//! call or a clear [`ArgumentError`]; the JSON Schema published for each tool is
//! derived (schemars) from the same structs the parser deserializes into, so the
//! two cannot drift apart silently (a property test checks they agree).

use std::fmt;
use std::sync::{Arc, LazyLock};

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

/// Longest accepted service or database name, in bytes.
pub const MAX_IDENTIFIER_LEN: usize = 64;
/// Largest fleet size `scale_fleet` accepts, whatever the policy says.
pub const MAX_FLEET_SIZE: i64 = 100;
/// Largest number of log lines `read_logs` returns.
pub const MAX_LOG_LINES: i64 = 200;
/// Lines `read_logs` returns when the caller does not say.
pub const DEFAULT_LOG_LINES: i64 = 20;
/// Longest tool name a front end passes on; longer names are malformed requests.
pub const MAX_TOOL_NAME_LEN: usize = 128;

/// A tool Proxi knows how to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolName {
    /// List every service and its health.
    ListServices,
    /// Health of one service.
    GetServiceStatus,
    /// Recent infrastructure actions.
    ReadLogs,
    /// Restart one service, making it healthy.
    RestartService,
    /// Set the number of instances in the fleet.
    ScaleFleet,
    /// Drop one database of the simulated cloud (destructive: no mode allows it by default).
    DeleteDatabase,
}

/// How much harm a tool can do; drives MCP annotations and agent hints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolCategory {
    /// Observes state only.
    ReadOnly,
    /// Changes state in a recoverable way.
    Active,
    /// Destroys state.
    Destructive,
}

impl ToolCategory {
    /// The snake_case name used in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            ToolCategory::ReadOnly => "read_only",
            ToolCategory::Active => "active",
            ToolCategory::Destructive => "destructive",
        }
    }
}

impl ToolName {
    /// Every tool, in catalog order.
    pub const ALL: [ToolName; 6] = [
        ToolName::ListServices,
        ToolName::GetServiceStatus,
        ToolName::ReadLogs,
        ToolName::RestartService,
        ToolName::ScaleFleet,
        ToolName::DeleteDatabase,
    ];

    /// The wire name, e.g. `restart_service`.
    pub fn as_str(self) -> &'static str {
        match self {
            ToolName::ListServices => "list_services",
            ToolName::GetServiceStatus => "get_service_status",
            ToolName::ReadLogs => "read_logs",
            ToolName::RestartService => "restart_service",
            ToolName::ScaleFleet => "scale_fleet",
            ToolName::DeleteDatabase => "delete_database",
        }
    }

    /// Looks a wire name up; `None` for a tool Proxi does not have.
    pub fn parse(name: &str) -> Option<ToolName> {
        ToolName::ALL.into_iter().find(|tool| tool.as_str() == name)
    }

    /// Position in [`ToolName::ALL`], used for compact per-tool tables.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The tool's harm category.
    pub fn category(self) -> ToolCategory {
        match self {
            ToolName::ListServices | ToolName::GetServiceStatus | ToolName::ReadLogs => {
                ToolCategory::ReadOnly
            }
            ToolName::RestartService | ToolName::ScaleFleet => ToolCategory::Active,
            ToolName::DeleteDatabase => ToolCategory::Destructive,
        }
    }

    /// What the tool does, for catalogs and LLM tool definitions.
    pub fn description(self) -> &'static str {
        match self {
            ToolName::ListServices => "List every cloud service and its health status.",
            ToolName::GetServiceStatus => "Get the health status of one cloud service.",
            ToolName::ReadLogs => "Read the most recent infrastructure actions from the log.",
            ToolName::RestartService => {
                "Restart a cloud service; a restarted service comes back healthy."
            }
            ToolName::ScaleFleet => "Scale the server fleet to the given number of instances.",
            ToolName::DeleteDatabase => "Permanently delete a database and all of its data.",
        }
    }

    /// The names of the tool's arguments, in schema order.
    pub fn argument_names(self) -> &'static [&'static str] {
        match self {
            ToolName::ListServices => &[],
            ToolName::GetServiceStatus | ToolName::RestartService => &["service_name"],
            ToolName::ReadLogs => &["lines"],
            ToolName::ScaleFleet => &["count"],
            ToolName::DeleteDatabase => &["db_name"],
        }
    }

    /// The kind of value an argument holds, or `None` if the tool has no such argument.
    pub fn argument_kind(self, argument: &str) -> Option<ArgumentKind> {
        if !self.argument_names().contains(&argument) {
            return None;
        }
        Some(match argument {
            "lines" | "count" => ArgumentKind::Integer,
            _ => ArgumentKind::String,
        })
    }

    /// The JSON Schema of the tool's arguments (an object schema).
    pub fn input_schema(self) -> &'static Arc<Map<String, Value>> {
        &INPUT_SCHEMAS[self.index()]
    }
}

impl fmt::Display for ToolName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether an argument is a number or a string; constraints are typed by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgumentKind {
    /// A JSON integer.
    Integer,
    /// A JSON string.
    String,
}

/// A borrowed argument value, as policy constraints see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgumentValue<'a> {
    /// An integer argument.
    Integer(i64),
    /// A string argument.
    String(&'a str),
}

impl fmt::Display for ArgumentValue<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArgumentValue::Integer(value) => write!(f, "{value}"),
            ArgumentValue::String(value) => write!(f, "{value:?}"),
        }
    }
}

/// Arguments of a tool that takes none.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NoArguments {}

/// Arguments naming one service.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceArguments {
    /// Name of the service, e.g. "web-server".
    #[schemars(length(min = 1, max = 64), pattern(IDENTIFIER_PATTERN))]
    pub service_name: String,
}

/// Arguments of `read_logs`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadLogsArguments {
    /// How many recent entries to return (default 20).
    // Published as a plain optional integer, not `["integer", "null"]`: single-type
    // schemas are what every client's schema dialect (Gemini's OpenAPI subset
    // included) accepts. So `null` is refused here too; leave the field out instead.
    #[serde(default, deserialize_with = "present_integer")]
    #[schemars(with = "i64", range(min = 1, max = 200))]
    pub lines: Option<i64>,
}

/// Arguments of `scale_fleet`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ScaleFleetArguments {
    /// The fleet size to scale to.
    #[serde(deserialize_with = "integer")]
    #[schemars(range(min = 1, max = 100))]
    pub count: i64,
}

/// Arguments of `delete_database`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeleteDatabaseArguments {
    /// Name of the database to delete.
    #[schemars(length(min = 1, max = 64), pattern(IDENTIFIER_PATTERN))]
    pub db_name: String,
}

/// Service and database names: lowercase, digits, `-` and `_`, starting alphanumeric.
pub const IDENTIFIER_PATTERN: &str = "^[a-z0-9][a-z0-9_-]*$";

/// A validated request to run one tool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolCall {
    /// `list_services`.
    ListServices,
    /// `get_service_status`.
    GetServiceStatus {
        /// The service asked about.
        service_name: String,
    },
    /// `read_logs`, with the default already applied.
    ReadLogs {
        /// Number of entries.
        lines: i64,
    },
    /// `restart_service`.
    RestartService {
        /// The service to restart.
        service_name: String,
    },
    /// `scale_fleet`.
    ScaleFleet {
        /// The new fleet size.
        count: i64,
    },
    /// `delete_database`.
    DeleteDatabase {
        /// The database to delete.
        db_name: String,
    },
}

/// Why arguments were refused before any policy decision.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid arguments for {tool}: {message}")]
pub struct ArgumentError {
    /// The tool the arguments were for.
    pub tool: ToolName,
    /// What is wrong, for the caller.
    pub message: String,
}

impl ToolCall {
    /// Checks `arguments` against `tool`'s schema and builds the typed call.
    ///
    /// `null` is read as "no arguments", so clients that omit them for
    /// argument-less tools are accepted.
    pub fn parse(tool: ToolName, arguments: &Value) -> Result<ToolCall, ArgumentError> {
        let empty = Value::Object(Map::new());
        let arguments = if arguments.is_null() {
            &empty
        } else {
            arguments
        };
        if !arguments.is_object() {
            return Err(ArgumentError {
                tool,
                message: format!(
                    "arguments must be a JSON object, not {}",
                    json_type_name(arguments)
                ),
            });
        }
        let invalid = |error: serde_path_to_error::Error<serde_json::Error>| {
            // Name the offending field; errors about the object itself have no path.
            let path = error.path().to_string();
            let inner = error.into_inner();
            ArgumentError {
                tool,
                message: if path == "." {
                    inner.to_string()
                } else {
                    format!("`{path}`: {inner}")
                },
            }
        };
        let call = match tool {
            ToolName::ListServices => {
                serde_path_to_error::deserialize::<_, NoArguments>(arguments).map_err(invalid)?;
                ToolCall::ListServices
            }
            ToolName::GetServiceStatus => {
                let args = serde_path_to_error::deserialize::<_, ServiceArguments>(arguments)
                    .map_err(invalid)?;
                check_identifier(tool, "service_name", &args.service_name)?;
                ToolCall::GetServiceStatus {
                    service_name: args.service_name,
                }
            }
            ToolName::ReadLogs => {
                let args = serde_path_to_error::deserialize::<_, ReadLogsArguments>(arguments)
                    .map_err(invalid)?;
                let lines = args.lines.unwrap_or(DEFAULT_LOG_LINES);
                check_range(tool, "lines", lines, 1, MAX_LOG_LINES)?;
                ToolCall::ReadLogs { lines }
            }
            ToolName::RestartService => {
                let args = serde_path_to_error::deserialize::<_, ServiceArguments>(arguments)
                    .map_err(invalid)?;
                check_identifier(tool, "service_name", &args.service_name)?;
                ToolCall::RestartService {
                    service_name: args.service_name,
                }
            }
            ToolName::ScaleFleet => {
                let args = serde_path_to_error::deserialize::<_, ScaleFleetArguments>(arguments)
                    .map_err(invalid)?;
                check_range(tool, "count", args.count, 1, MAX_FLEET_SIZE)?;
                ToolCall::ScaleFleet { count: args.count }
            }
            ToolName::DeleteDatabase => {
                let args =
                    serde_path_to_error::deserialize::<_, DeleteDatabaseArguments>(arguments)
                        .map_err(invalid)?;
                check_identifier(tool, "db_name", &args.db_name)?;
                ToolCall::DeleteDatabase {
                    db_name: args.db_name,
                }
            }
        };
        Ok(call)
    }

    /// The tool this call runs.
    pub fn tool(&self) -> ToolName {
        match self {
            ToolCall::ListServices => ToolName::ListServices,
            ToolCall::GetServiceStatus { .. } => ToolName::GetServiceStatus,
            ToolCall::ReadLogs { .. } => ToolName::ReadLogs,
            ToolCall::RestartService { .. } => ToolName::RestartService,
            ToolCall::ScaleFleet { .. } => ToolName::ScaleFleet,
            ToolCall::DeleteDatabase { .. } => ToolName::DeleteDatabase,
        }
    }

    /// The value of one argument, for policy constraints.
    pub fn argument(&self, name: &str) -> Option<ArgumentValue<'_>> {
        match (self, name) {
            (ToolCall::GetServiceStatus { service_name }, "service_name")
            | (ToolCall::RestartService { service_name }, "service_name") => {
                Some(ArgumentValue::String(service_name))
            }
            (ToolCall::ReadLogs { lines }, "lines") => Some(ArgumentValue::Integer(*lines)),
            (ToolCall::ScaleFleet { count }, "count") => Some(ArgumentValue::Integer(*count)),
            (ToolCall::DeleteDatabase { db_name }, "db_name") => {
                Some(ArgumentValue::String(db_name))
            }
            _ => None,
        }
    }
}

fn check_range(
    tool: ToolName,
    argument: &str,
    value: i64,
    min: i64,
    max: i64,
) -> Result<(), ArgumentError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(ArgumentError {
            tool,
            message: format!("`{argument}` must be between {min} and {max}, got {value}"),
        })
    }
}

fn check_identifier(tool: ToolName, argument: &str, value: &str) -> Result<(), ArgumentError> {
    let fail = |why: &str| {
        Err(ArgumentError {
            tool,
            message: format!("`{argument}` {why}"),
        })
    };
    if value.is_empty() {
        return fail("must not be empty");
    }
    if value.chars().count() > MAX_IDENTIFIER_LEN {
        return fail("must be at most 64 characters long");
    }
    let valid_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_';
    let starts_alphanumeric = value
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !starts_alphanumeric || !value.chars().all(valid_char) {
        return fail(
            "may contain only lowercase letters, digits, '-' and '_', and must start with a letter or digit",
        );
    }
    Ok(())
}

/// A short human name for a JSON value's type, for error messages.
pub fn json_type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

struct IntegerVisitor;

impl serde::de::Visitor<'_> for IntegerVisitor {
    type Value = i64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an integer")
    }

    fn visit_i64<E: serde::de::Error>(self, value: i64) -> Result<i64, E> {
        Ok(value)
    }

    fn visit_u64<E: serde::de::Error>(self, value: u64) -> Result<i64, E> {
        i64::try_from(value).map_err(|_| E::custom(format!("integer {value} is out of range")))
    }
}

/// Deserializes an integer with a message that does not mention Rust types.
fn integer<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    deserializer.deserialize_i64(IntegerVisitor)
}

/// An optional integer argument that is present: it must be an integer, not `null`.
fn present_integer<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<i64>, D::Error> {
    integer(deserializer).map(Some)
}

fn object_schema<T: JsonSchema>() -> Arc<Map<String, Value>> {
    let mut schema = schemars::schema_for!(T).to_value();
    let Some(object) = schema.as_object_mut() else {
        unreachable!("schemars always renders a struct as a JSON object")
    };
    // The draft URI and title are noise to LLMs and MCP clients.
    object.remove("$schema");
    object.remove("title");
    if !object.contains_key("properties") {
        object.insert("properties".into(), Value::Object(Map::new()));
    }
    Arc::new(std::mem::take(object))
}

static INPUT_SCHEMAS: LazyLock<[Arc<Map<String, Value>>; 6]> = LazyLock::new(|| {
    [
        object_schema::<NoArguments>(),
        object_schema::<ServiceArguments>(),
        object_schema::<ReadLogsArguments>(),
        object_schema::<ServiceArguments>(),
        object_schema::<ScaleFleetArguments>(),
        object_schema::<DeleteDatabaseArguments>(),
    ]
});

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_tool_round_trips_its_wire_name() {
        for tool in ToolName::ALL {
            assert_eq!(ToolName::parse(tool.as_str()), Some(tool));
            assert_eq!(ToolName::ALL[tool.index()], tool);
        }
        assert_eq!(ToolName::parse("drop_tables"), None);
    }

    #[test]
    fn schemas_are_closed_objects_with_limits() {
        let scale = ToolName::ScaleFleet.input_schema();
        assert_eq!(scale["type"], "object");
        assert_eq!(scale["additionalProperties"], false);
        assert_eq!(scale["properties"]["count"]["minimum"], 1);
        assert_eq!(scale["properties"]["count"]["maximum"], 100);
        assert_eq!(scale["required"], json!(["count"]));
        let restart = ToolName::RestartService.input_schema();
        assert_eq!(restart["properties"]["service_name"]["maxLength"], 64);
        let list = ToolName::ListServices.input_schema();
        assert_eq!(list["properties"], json!({}));
    }

    /// Clients that map schemas onto a single-`type` dialect (the OpenAPI subset of
    /// Gemini function declarations) reject `"type": [..]`; the MCP Inspector's
    /// `--strict` check warns about it (tests/mcp_inspector.rs runs that check).
    #[test]
    fn every_published_type_is_a_single_type() {
        fn check(path: &str, value: &Value) {
            match value {
                Value::Object(map) => {
                    if let Some(kind) = map.get("type") {
                        assert!(kind.is_string(), "{path}: type is {kind}");
                    }
                    for (key, value) in map {
                        check(&format!("{path}.{key}"), value);
                    }
                }
                Value::Array(items) => {
                    for (index, item) in items.iter().enumerate() {
                        check(&format!("{path}[{index}]"), item);
                    }
                }
                _ => {}
            }
        }
        for tool in ToolName::ALL {
            check(
                tool.as_str(),
                &Value::Object(tool.input_schema().as_ref().clone()),
            );
        }
        let lines = &ToolName::ReadLogs.input_schema()["properties"]["lines"];
        assert_eq!(lines["type"], "integer");
        assert_eq!(lines["minimum"], 1);
        assert_eq!(lines["maximum"], 200);
        assert_eq!(ToolName::ReadLogs.input_schema().get("required"), None);
    }

    #[test]
    fn valid_arguments_build_typed_calls() {
        assert_eq!(
            ToolCall::parse(ToolName::ScaleFleet, &json!({"count": 5})),
            Ok(ToolCall::ScaleFleet { count: 5 })
        );
        assert_eq!(
            ToolCall::parse(ToolName::ReadLogs, &Value::Null),
            Ok(ToolCall::ReadLogs { lines: 20 })
        );
        assert_eq!(
            ToolCall::parse(ToolName::ListServices, &json!({})),
            Ok(ToolCall::ListServices)
        );
    }

    #[test]
    fn bad_arguments_get_clear_messages() {
        let message = |tool, args: Value| ToolCall::parse(tool, &args).unwrap_err().message;
        assert_eq!(
            message(ToolName::ScaleFleet, json!({"count": -1})),
            "`count` must be between 1 and 100, got -1"
        );
        assert_eq!(
            message(ToolName::ScaleFleet, json!({"count": 0})),
            "`count` must be between 1 and 100, got 0"
        );
        assert!(
            message(ToolName::ScaleFleet, json!({"count": "3"})).contains("expected an integer")
        );
        assert!(message(ToolName::ScaleFleet, json!({})).contains("missing field `count`"));
        assert!(
            message(ToolName::ScaleFleet, json!({"count": 2, "force": true}))
                .contains("unknown field `force`")
        );
        assert!(
            message(ToolName::RestartService, json!({"service_name": "../etc"}))
                .contains("lowercase letters")
        );
        assert!(message(ToolName::RestartService, json!([1])).contains("must be a JSON object"));
        assert!(message(ToolName::ListServices, json!({"x": 1})).contains("unknown field `x`"));
        assert!(
            message(ToolName::ReadLogs, json!({"lines": null})).contains("expected an integer")
        );
    }

    mod schema_agreement {
        use super::*;
        use proptest::prelude::*;

        /// Values that probe each rule: boundaries, wrong types, odd strings.
        fn any_value() -> impl Strategy<Value = Value> {
            let boundaries = [0, 1, 2, 10, 99, 100, 101, 199, 200, 201, -1]
                .into_iter()
                .map(Value::from)
                .chain(
                    ["a".repeat(64), "a".repeat(65)]
                        .into_iter()
                        .map(Value::from),
                )
                .collect::<Vec<_>>();
            let leaf = prop_oneof![
                3 => proptest::sample::select(boundaries),
                1 => Just(Value::Null),
                1 => any::<bool>().prop_map(Value::from),
                1 => (-5i64..=250).prop_map(Value::from),
                1 => any::<i64>().prop_map(Value::from),
                1 => any::<u64>().prop_map(Value::from),
                // Integral floats are left out: JSON Schema counts 3.0 as an integer, Proxi does not.
                1 => (-1000.0f64..1000.0)
                    .prop_filter("non-integral", |f| f.fract() != 0.0)
                    .prop_map(Value::from),
                1 => "[a-z0-9_-]{0,70}".prop_map(Value::from),
                1 => ".{0,20}".prop_map(Value::from),
                1 => prop_oneof![Just("web-server"), Just("-x"), Just("_x"), Just("Web"), Just("")]
                    .prop_map(Value::from),
            ];
            let leaf = leaf.boxed();
            prop_oneof![
                8 => leaf.clone(),
                1 => proptest::collection::vec(leaf.clone(), 0..3).prop_map(Value::Array),
                1 => proptest::collection::btree_map("[a-z]{1,3}", leaf, 0..3)
                    .prop_map(|map| Value::Object(map.into_iter().collect())),
            ]
        }

        /// Mostly the tool's own argument names (so value rules get exercised),
        /// sometimes a stray key, sometimes not an object at all.
        fn any_arguments(tool: ToolName) -> impl Strategy<Value = Value> {
            let own = proptest::collection::vec(
                (any::<bool>(), any_value()),
                tool.argument_names().len(),
            );
            let stray = proptest::option::weighted(0.15, ("[a-z_]{1,8}", any_value()));
            let object = (own, stray).prop_map(move |(own, stray)| {
                let mut map = Map::new();
                for (name, (present, value)) in tool.argument_names().iter().zip(own) {
                    if present || tool != ToolName::ReadLogs {
                        map.insert((*name).to_owned(), value);
                    }
                }
                if let Some((key, value)) = stray {
                    map.insert(key, value);
                }
                Value::Object(map)
            });
            prop_oneof![9 => object, 1 => any_value()]
        }

        fn any_call() -> impl Strategy<Value = (ToolName, Value)> {
            proptest::sample::select(ToolName::ALL.to_vec())
                .prop_flat_map(|tool| (Just(tool), any_arguments(tool)))
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            /// The published schema and the parser accept exactly the same arguments,
            /// so a client that validates against tools/list is never surprised.
            #[test]
            fn the_parser_agrees_with_the_published_schema(
                (tool, arguments) in any_call(),
            ) {
                let schema = Value::Object(tool.input_schema().as_ref().clone());
                let published = jsonschema::is_valid(&schema, &arguments);
                let parsed = ToolCall::parse(tool, &arguments);
                // `null` means "no arguments" to the parser, a convenience the schema does not spell out.
                if !arguments.is_null() {
                    prop_assert_eq!(parsed.is_ok(), published, "{} {}: {:?}", tool, arguments, parsed);
                }
                if let Ok(call) = parsed {
                    prop_assert_eq!(call.tool(), tool);
                }
            }
        }
    }
}
