//! Policy decision latency on the shipped policy (target: median under 1 µs).
//!
//! Run: `cargo bench --bench policy`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use proxi::policy::PolicyEngine;
use proxi::tools::{ToolCall, ToolName};
use serde_json::json;

fn decisions(c: &mut Criterion) {
    let engine = PolicyEngine::from_json(
        include_str!("../policies/ops_policy.json"),
        "ops_policy.json",
    )
    .expect("the shipped policy is valid");
    let normal = engine.mode_id("NORMAL").expect("NORMAL exists");
    let emergency = engine.mode_id("EMERGENCY").expect("EMERGENCY exists");
    let restart = ToolCall::RestartService {
        service_name: "web-server".to_owned(),
    };
    let scale = ToolCall::ScaleFleet { count: 5 };
    let delete = ToolCall::DeleteDatabase {
        db_name: "database".to_owned(),
    };

    let mut group = c.benchmark_group("decide");
    group.bench_function("allowed_read_only_in_normal", |b| {
        b.iter(|| engine.decide_builtin(black_box(normal), black_box(&ToolCall::ListServices)))
    });
    group.bench_function("blocked_in_normal", |b| {
        b.iter(|| engine.decide_builtin(black_box(normal), black_box(&restart)))
    });
    group.bench_function("constrained_allowed_in_emergency", |b| {
        b.iter(|| engine.decide_builtin(black_box(emergency), black_box(&scale)))
    });
    group.bench_function("always_blocked", |b| {
        b.iter(|| engine.decide_builtin(black_box(emergency), black_box(&delete)))
    });
    group.finish();

    // Argument validation runs before every decision, so it is part of the hot path.
    let arguments = json!({"service_name": "web-server"});
    c.bench_function("parse_and_decide_restart", |b| {
        b.iter(|| {
            let call = ToolCall::parse(ToolName::RestartService, black_box(&arguments))
                .expect("valid arguments");
            engine.decide_builtin(emergency, &call)
        })
    });
}

criterion_group!(benches, decisions);
criterion_main!(benches);
