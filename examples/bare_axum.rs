//! The baseline for `scripts/load.sh`: a bare axum handler that parses the same
//! JSON body as `/tools/execute` and answers a fixed JSON result, with no policy,
//! no audit and no auth. Prints `listening on http://ADDR` once bound.

use axum::Json;
use axum::Router;
use axum::routing::post;
use serde_json::{Value, json};

// Same allocator as the proxi binary, so the ratio compares handlers, not allocators.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

async fn execute(Json(request): Json<Value>) -> Json<Value> {
    Json(json!({
        "success": true,
        "result": {"service": request["arguments"]["service_name"], "status": "healthy"},
        "error": null,
        "policy_violation": false,
        "blocked_reason": null,
        "reason_code": null,
    }))
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let address = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".to_owned());
    let listener = tokio::net::TcpListener::bind(&address).await?;
    println!("listening on http://{}", listener.local_addr()?);
    let app = Router::new().route("/tools/execute", post(execute));
    axum::serve(listener, app).await
}
