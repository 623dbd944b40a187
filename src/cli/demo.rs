//! `proxi demo`: the twelve scenarios end to end against an in-process server.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

use proxi::agent::DEFAULT_MAX_STEPS;

use super::logging::no_color;
use super::model::{ModelArgs, provider_choice};
use super::parse_max_steps;

#[derive(Args)]
pub(crate) struct DemoArgs {
    /// Run only this scenario (1-12; 11 and 12 run under the demo's approval policy variant).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=proxi::demo::SCENARIO_COUNT as i64))]
    scenario: Option<u8>,
    /// Write machine-readable results to stdout instead of the transcript.
    #[arg(long)]
    json: bool,
    /// Keep the data dir here (new or empty) so `proxi audit verify --data-dir DIR` can check it.
    #[arg(long, value_name = "DIR")]
    keep_data: Option<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    /// Policy file (default: policies/ops_policy.json if it exists, else the built-in policy).
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Mode switches in the stress scenario (at least 1000 for the seed's test).
    #[arg(long, default_value_t = proxi::demo::DEFAULT_STRESS_SWITCHES)]
    stress_switches: usize,
    /// Most model turns per agent run.
    #[arg(long, default_value_t = DEFAULT_MAX_STEPS, value_parser = parse_max_steps)]
    max_steps: usize,
}

/// Runs `proxi demo`; exits 1 when a scenario fails.
pub(crate) async fn run(args: DemoArgs) -> Result<ExitCode> {
    use std::io::IsTerminal;
    let _ = dotenvy::dotenv();
    let mut model = args.model.options();
    model.temperature = model.temperature.or(Some(proxi::demo::DEFAULT_TEMPERATURE));
    model.seed = model.seed.or(Some(proxi::demo::DEFAULT_SEED));
    let options = proxi::demo::DemoOptions {
        scenario: args.scenario,
        provider: args.model.provider.map(provider_choice),
        model,
        max_steps: args.max_steps,
        keep_data: args.keep_data,
        policy: args.policy,
        stress_switches: args.stress_switches,
    };
    let report = if args.json {
        let mut sink = proxi::demo::ProgressOnly {
            enabled: std::io::stderr().is_terminal(),
        };
        let report = proxi::demo::run(options, &mut sink).await?;
        println!("{}", serde_json::to_string_pretty(&report)?);
        report
    } else {
        let terminal = std::io::stdout().is_terminal();
        let mut sink =
            proxi::demo::TextSink::new(std::io::stdout(), terminal && !no_color(), terminal);
        proxi::demo::run(options, &mut sink).await?
    };
    Ok(if report.succeeded() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
