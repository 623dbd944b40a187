//! Prometheus metrics (`GET /metrics`), in the OpenMetrics text format of `prometheus-client`.
//!
//! Recording is cheap and never happens under the mode lock: every label value is
//! a `&'static str` (built-in tool names, the catalog's upstream tool names
//! interned once and capped, decisions, reason codes), so looking a
//! series up hashes a few pointers and allocates nothing once the series exists,
//! and the series of the built-in tools are created up front. Values that are
//! state rather than events (the mode, pending approvals) are read when scraped.

use std::fmt::Write as _;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::gateway::Outcome;
use crate::reason::Reason;
use crate::tools::ToolName;

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The tool label of every call whose name is not a built-in tool: the label set
/// stays bounded whatever names an agent sends.
pub const OTHER_TOOL: &str = "other";

/// Most distinct upstream tool names that get a `tool` label of their own; past
/// it (a flood of tools listed by an upstream), further names count as `other`.
pub const MAX_UPSTREAM_TOOL_LABELS: usize = 256;

/// Labels of `proxi_tool_calls_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ToolCallLabels {
    tool: &'static str,
    decision: &'static str,
    reason_code: &'static str,
}

/// Labels of `proxi_tool_call_duration_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ToolDurationLabels {
    tool: &'static str,
    decision: &'static str,
}

/// Labels of `proxi_mode`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabels {
    mode: String,
}

/// Labels of `proxi_upstream_up`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    upstream: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Tool calls take microseconds to seconds: 50 µs doubling to about 1.6 s.
fn call_duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

/// The audit trail's share of the metrics, updated by its writer thread and its
/// queue; cheap clones of the same series.
#[derive(Clone, Debug)]
pub struct AuditMetrics {
    /// Records committed since the process started.
    pub records: Counter,
    /// Seconds each batch commit took (one SQLite transaction).
    pub commit_seconds: Histogram,
    /// Entries queued and not yet taken by the writer.
    pub queue_depth: Gauge,
}

impl Default for AuditMetrics {
    fn default() -> AuditMetrics {
        AuditMetrics {
            records: Counter::default(),
            // 100 µs doubling to about 3.3 s.
            commit_seconds: Histogram::new(exponential_buckets(0.000_1, 2.0, 16)),
            queue_depth: Gauge::default(),
        }
    }
}

/// Every metric Proxi exports, and the registry that renders them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    tool_calls: Family<ToolCallLabels, Counter>,
    tool_call_duration: HistogramFamily<ToolDurationLabels>,
    mode: Family<ModeLabels, Gauge>,
    mode_changes: Counter,
    upstream_up: Family<UpstreamLabels, Gauge>,
    approvals_pending: Gauge,
    shadow_disagreements: Counter,
    /// The label of each upstream tool seen so far: interned once (a leaked
    /// string, at most [`MAX_UPSTREAM_TOOL_LABELS`] of them per process) so that
    /// series keep `&'static str` labels and recording allocates nothing afterwards.
    upstream_tools: std::sync::Mutex<std::collections::HashMap<Box<str>, &'static str>>,
}

impl Metrics {
    /// Registers every metric; `audit` are the series the audit log updates.
    pub fn new(audit: &AuditMetrics) -> Metrics {
        let mut registry = Registry::default();
        let tool_calls = Family::<ToolCallLabels, Counter>::default();
        let tool_call_duration: HistogramFamily<ToolDurationLabels> =
            Family::new_with_constructor(call_duration_histogram);
        let mode = Family::<ModeLabels, Gauge>::default();
        let mode_changes = Counter::default();
        let upstream_up = Family::<UpstreamLabels, Gauge>::default();
        let approvals_pending = Gauge::default();
        let shadow_disagreements = Counter::default();
        registry.register(
            "proxi_shadow_disagreements",
            "Tool calls the shadow policy (serve --shadow-policy) decided differently",
            shadow_disagreements.clone(),
        );
        registry.register(
            "proxi_tool_calls",
            "Tool calls by tool, decision and reason code",
            tool_calls.clone(),
        );
        registry.register(
            "proxi_tool_call_duration_seconds",
            "Time from a tool call's arrival to its durable audit record",
            tool_call_duration.clone(),
        );
        registry.register("proxi_mode", "1 for the mode in force", mode.clone());
        registry.register(
            "proxi_mode_changes",
            "Mode changes and expiries",
            mode_changes.clone(),
        );
        registry.register(
            "proxi_audit_records",
            "Audit records committed by this process",
            audit.records.clone(),
        );
        registry.register(
            "proxi_audit_commit_seconds",
            "Time to commit one batch of audit records",
            audit.commit_seconds.clone(),
        );
        registry.register(
            "proxi_audit_queue_depth",
            "Audit entries waiting for the writer",
            audit.queue_depth.clone(),
        );
        registry.register(
            "proxi_upstream_up",
            "1 when the upstream MCP server is connected",
            upstream_up.clone(),
        );
        registry.register(
            "proxi_approvals_pending",
            "Tool calls waiting for an operator's approval",
            approvals_pending.clone(),
        );
        let metrics = Metrics {
            registry,
            tool_calls,
            tool_call_duration,
            mode,
            mode_changes,
            upstream_up,
            approvals_pending,
            shadow_disagreements,
            upstream_tools: Default::default(),
        };
        metrics.precreate();
        metrics
    }

    /// Sets `proxi_approvals_pending`: how many approvals wait for an operator now.
    pub fn set_approvals_pending(&self, pending: usize) {
        self.approvals_pending
            .set(i64::try_from(pending).unwrap_or(i64::MAX));
    }

    /// Creates the series of the built-in tools' usual outcomes, so that the hot
    /// path only ever reads the family's table.
    fn precreate(&self) {
        let tools = ToolName::ALL.map(ToolName::as_str);
        for tool in tools.into_iter().chain([OTHER_TOOL]) {
            for decision in ["allowed", "denied", "rejected"] {
                drop(
                    self.tool_call_duration
                        .get_or_create(&ToolDurationLabels { tool, decision }),
                );
            }
            drop(self.tool_calls.get_or_create(&ToolCallLabels {
                tool,
                decision: "allowed",
                reason_code: "",
            }));
        }
    }

    /// Counts one finished tool call and how long it took (arrival to durable record).
    ///
    /// Call it after the mode lock is released; it allocates nothing for a series
    /// that exists, and a series exists for every built-in tool's allowed calls.
    pub fn tool_call(&self, tool: Option<ToolName>, outcome: &Outcome, elapsed: Duration) {
        self.tool_call_labelled(tool.map_or(OTHER_TOOL, ToolName::as_str), outcome, elapsed);
    }

    /// The `tool` label of the catalog's upstream tool `name` (the caller checks
    /// that the catalog has it: a requested name is the agent's to choose, and
    /// would make the label set unbounded). Allocates only the first time a name is seen.
    pub fn upstream_tool_label(&self, name: &str) -> &'static str {
        let mut labels = self
            .upstream_tools
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(label) = labels.get(name) {
            return label;
        }
        if labels.len() >= MAX_UPSTREAM_TOOL_LABELS {
            return OTHER_TOOL;
        }
        let label: &'static str = Box::leak(Box::from(name));
        labels.insert(Box::from(name), label);
        label
    }

    /// [`Metrics::tool_call`] with the `tool` label given: a built-in's name,
    /// [`Metrics::upstream_tool_label`], or [`OTHER_TOOL`].
    pub fn tool_call_labelled(&self, tool: &'static str, outcome: &Outcome, elapsed: Duration) {
        let decision = decision_of(outcome);
        let reason_code = outcome.reason_code().map_or("", Reason::as_str);
        self.tool_calls
            .get_or_create(&ToolCallLabels {
                tool,
                decision,
                reason_code,
            })
            .inc();
        self.tool_call_duration
            .get_or_create(&ToolDurationLabels { tool, decision })
            .observe(elapsed.as_secs_f64());
    }

    /// Counts one call the shadow policy decided differently.
    pub fn shadow_disagreement(&self) {
        self.shadow_disagreements.inc();
    }

    /// Counts one mode change or expiry.
    pub fn mode_changed(&self) {
        self.mode_changes.inc();
    }

    /// Sets `proxi_upstream_up{upstream=name}`: 1 when connected. Upstreams are
    /// not wired into the gateway yet, so until they are the family has no series.
    pub fn set_upstream_up(&self, name: &str, up: bool) {
        self.upstream_up
            .get_or_create(&UpstreamLabels {
                upstream: name.to_owned(),
            })
            .set(i64::from(up));
    }

    /// Drops `proxi_upstream_up{upstream=name}`: a reload removed the upstream.
    pub fn forget_upstream(&self, name: &str) {
        self.upstream_up.remove(&UpstreamLabels {
            upstream: name.to_owned(),
        });
    }

    /// Renders every metric; `modes` are the policy's modes and `current` the one in force.
    pub fn render<'a>(&self, modes: impl IntoIterator<Item = &'a str>, current: &str) -> String {
        // A reload may have removed a mode: only the policy's modes in force are shown.
        self.mode.clear();
        for mode in modes {
            self.mode
                .get_or_create(&ModeLabels {
                    mode: mode.to_owned(),
                })
                .set(i64::from(mode == current));
        }
        let mut text = String::with_capacity(8 * 1024);
        if encode(&mut text, &self.registry).is_err() {
            // Writing into a String cannot fail; keep the output well-formed regardless.
            text.clear();
            let _ = writeln!(text, "# EOF");
        }
        text
    }
}

/// The decision label of an outcome, as its audit record states it.
pub fn decision_of(outcome: &Outcome) -> &'static str {
    match outcome {
        // An upstream call was allowed whatever became of it afterwards.
        Outcome::Executed(_)
        | Outcome::Failed { .. }
        | Outcome::Forwarded(_)
        | Outcome::UpstreamFailed { .. } => "allowed",
        Outcome::Denied { .. }
        | Outcome::RateLimited { .. }
        | Outcome::Guarded(_)
        | Outcome::Approval(_)
        | Outcome::ModeChanged { .. } => "denied",
        Outcome::UnknownTool { .. }
        | Outcome::InvalidArguments(_)
        | Outcome::InvalidToolName(_) => "rejected",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn upstream_tool_labels_are_interned_once_and_capped() {
        let metrics = Metrics::new(&AuditMetrics::default());
        let first = metrics.upstream_tool_label("fs__read_file");
        assert_eq!(first, "fs__read_file");
        assert!(std::ptr::eq(
            first,
            metrics.upstream_tool_label("fs__read_file")
        ));
        for n in 1..MAX_UPSTREAM_TOOL_LABELS {
            assert_eq!(
                metrics.upstream_tool_label(&format!("fs__tool_{n}")),
                format!("fs__tool_{n}")
            );
        }
        assert_eq!(metrics.upstream_tool_label("fs__one_too_many"), OTHER_TOOL);
        assert_eq!(
            metrics.upstream_tool_label("fs__read_file"),
            "fs__read_file"
        );
    }

    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
    }

    #[test]
    fn a_call_is_counted_by_tool_decision_and_reason() {
        let audit = AuditMetrics::default();
        let metrics = Metrics::new(&audit);
        metrics.tool_call(
            Some(ToolName::ListServices),
            &Outcome::Executed(json!([])),
            Duration::from_millis(2),
        );
        metrics.tool_call(
            None,
            &Outcome::UnknownTool {
                message: "no".to_owned(),
            },
            Duration::from_millis(1),
        );
        metrics.mode_changed();
        audit.records.inc_by(3);
        let text = metrics.render(["NORMAL", "EMERGENCY"], "EMERGENCY");
        assert_eq!(
            sample(
                &text,
                r#"proxi_tool_calls_total{tool="list_services",decision="allowed",reason_code=""}"#
            ),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                &format!(
                    r#"proxi_tool_calls_total{{tool="other",decision="rejected",reason_code="{}"}}"#,
                    crate::reason::Reason::UnknownTool
                )
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"proxi_tool_call_duration_seconds_count{tool="list_services",decision="allowed"}"#
            ),
            Some(1.0)
        );
        assert_eq!(sample(&text, r#"proxi_mode{mode="EMERGENCY"}"#), Some(1.0));
        assert_eq!(sample(&text, r#"proxi_mode{mode="NORMAL"}"#), Some(0.0));
        assert_eq!(sample(&text, "proxi_mode_changes_total"), Some(1.0));
        assert_eq!(sample(&text, "proxi_audit_records_total"), Some(3.0));
        assert_eq!(sample(&text, "proxi_approvals_pending"), Some(0.0));
        // No upstream is wired into the gateway yet: the family has no series.
        assert!(!text.contains("proxi_upstream_up{"), "{text}");
        assert!(text.contains("# TYPE proxi_audit_commit_seconds histogram"));
        assert!(text.contains("# TYPE proxi_audit_queue_depth gauge"));
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn decisions_match_the_audit_records() {
        assert_eq!(
            decision_of(&Outcome::RateLimited {
                retry_after: Duration::from_secs(1)
            }),
            "denied"
        );
        assert_eq!(
            decision_of(&Outcome::Failed {
                code: Reason::UnknownService,
                message: String::new()
            }),
            "allowed"
        );
        assert_eq!(
            decision_of(&Outcome::InvalidArguments(String::new())),
            "rejected"
        );
    }
}
