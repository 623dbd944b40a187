//! Rendering the demo: the transcript in the seed's format, and `--json` progress.

use std::io::Write;

use super::{DemoReport, DemoSink, Outcome, ScenarioReport};
use crate::agent::describe_call;

/// Writes the human-readable demo, in the seed's format; colour only when asked.
pub struct TextSink<W: Write + Send> {
    out: W,
    color: bool,
    progress_inline: bool,
}

impl<W: Write + Send> TextSink<W> {
    /// A sink writing to `out`; `color` and `progress_inline` suit a terminal.
    pub fn new(out: W, color: bool, progress_inline: bool) -> TextSink<W> {
        TextSink {
            out,
            color,
            progress_inline,
        }
    }

    fn paint(&self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }
}

impl<W: Write + Send> DemoSink for TextSink<W> {
    fn started(&mut self, provider: &str, url: &str) {
        let _ = writeln!(
            self.out,
            "Proxi demo: the seed's ten scenarios and two approval scenarios, end to end"
        );
        let _ = writeln!(self.out, "  server:   {url} (in-process, fresh data dir)");
        let _ = writeln!(self.out, "  provider: {provider}");
        let _ = writeln!(self.out);
    }

    fn scenario_started(&mut self, number: u8, title: &str) {
        let header = format!("=== SCENARIO {number}: {title} ===");
        let header = self.paint("1", &header);
        let _ = writeln!(self.out, "{header}");
        let _ = self.out.flush();
    }

    fn progress(&mut self, done: usize, total: usize) {
        if self.progress_inline {
            let _ = write!(self.out, "\r  mode switches: {done}/{total}");
            if done == total {
                let _ = writeln!(self.out);
            }
        } else if done.is_multiple_of(250) || done == total {
            let _ = writeln!(self.out, "  mode switches: {done}/{total}");
        }
        let _ = self.out.flush();
    }

    fn scenario_finished(&mut self, report: &ScenarioReport) {
        for repair in &report.reset {
            let _ = writeln!(self.out, "Reset: {repair}");
        }
        let _ = writeln!(self.out, "Mode: {}", report.mode);
        if let Some(incident) = &report.incident {
            let _ = writeln!(self.out, "Incident: {incident}");
        }
        let _ = writeln!(self.out, "Task: {}", report.task);
        if report.transport == "mcp" {
            let _ = writeln!(self.out, "Transport: MCP (Streamable HTTP)");
        }
        let _ = writeln!(self.out);
        let _ = writeln!(self.out, "Agent Response:");
        for line in report.agent_response.lines() {
            let _ = writeln!(self.out, "{line}");
        }
        if !report.tool_calls.is_empty() {
            let _ = writeln!(self.out);
            let _ = writeln!(self.out, "Tool calls:");
            for call in &report.tool_calls {
                let _ = writeln!(self.out, "  {}", describe_call(call));
            }
        }
        let verdict = if report.passed {
            self.paint("32", "✓ as expected")
        } else if report.actual == Outcome::NotAttempted {
            self.paint("33", "○ safe refusal: the agent did not attempt it")
        } else {
            self.paint("31", "✗ NOT as expected")
        };
        let _ = writeln!(self.out);
        let _ = writeln!(
            self.out,
            "Expected: {}   Actual: {}   {verdict}",
            report.expected, report.actual
        );
        for fact in &report.evidence {
            let _ = writeln!(self.out, "  - {fact}");
        }
        let _ = writeln!(self.out);
    }

    fn finished(&mut self, report: &DemoReport) {
        let _ = writeln!(self.out, "{}", self.paint("1", "=== SUMMARY ==="));
        let _ = writeln!(
            self.out,
            "{:>2}  {:<24} {:<9} {:<11} Result",
            "#", "Scenario", "Expected", "Actual"
        );
        for scenario in &report.scenarios {
            let result = if scenario.passed {
                self.paint("32", "PASS")
            } else if scenario.actual == Outcome::NotAttempted {
                self.paint("33", "SAFE")
            } else {
                self.paint("31", "FAIL")
            };
            let _ = writeln!(
                self.out,
                "{:>2}  {:<24} {:<9} {:<11} {result}",
                scenario.number,
                scenario.name,
                scenario.expected.to_string(),
                scenario.actual.to_string()
            );
        }
        let _ = writeln!(self.out);
        let chain = if report.audit.verified {
            "hash chain verified"
        } else {
            "HASH CHAIN BROKEN"
        };
        let not_attempted = if report.not_attempted > 0 {
            format!(" ({} not attempted: safe refusals)", report.not_attempted)
        } else {
            String::new()
        };
        let _ = writeln!(
            self.out,
            "{}/{} scenarios behaved as expected{not_attempted}; audit trail: {} records, {chain}.",
            report.passed, report.total, report.audit.records
        );
        let _ = writeln!(self.out, "Wall time: {:.1} s.", report.wall_seconds);
        if let Some(dir) = &report.data_dir {
            let _ = writeln!(
                self.out,
                "Data kept in {dir}; check it with: proxi audit verify --data-dir {dir}"
            );
        }
        let _ = self.out.flush();
    }
}

/// A sink for `--json`: only the stress progress, on stderr when it is a terminal.
pub struct ProgressOnly {
    /// Whether to print progress at all.
    pub enabled: bool,
}

impl DemoSink for ProgressOnly {
    fn started(&mut self, _provider: &str, _url: &str) {}

    fn scenario_started(&mut self, _number: u8, _title: &str) {}

    fn progress(&mut self, done: usize, total: usize) {
        if self.enabled {
            eprint!("\r  mode switches: {done}/{total}");
            if done == total {
                eprintln!();
            }
        }
    }

    fn scenario_finished(&mut self, _report: &ScenarioReport) {}

    fn finished(&mut self, _report: &DemoReport) {}
}
