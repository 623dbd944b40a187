//! A fast upstream MCP server for `scripts/bench-upstream.sh`: one tool, `echo`,
//! that answers its `message` at once, on rmcp's server side.
//!
//! The Python fixture (tests/fixtures/fixture_upstream.py) saturates at a few
//! hundred calls a second on the development machine, so a benchmark against it
//! measures Python, and its queueing inflates the median Proxi seems to add. This
//! server costs little enough per call that the figures are Proxi's.
//!
//!   echo_upstream --http [--port N]   Streamable HTTP at http://127.0.0.1:N/mcp
//!                                     (port 0, the default, picks a free one);
//!                                     prints `listening on http://ADDR/mcp`
//!   echo_upstream                     stdio

use axum::serve::ListenerExt;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{ServerCapabilities, ServerConfig};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ServerHandler, ServiceExt, schemars, tool, tool_handler, tool_router};

// Same allocator as the proxi binary, so both sides of the comparison get it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The arguments of `echo`, as the Python fixture's `echo` takes them.
#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
struct EchoRequest {
    /// Returned unchanged.
    message: String,
}

#[derive(Debug, Clone)]
struct EchoServer {
    tool_router: ToolRouter<Self>,
}

#[tool_router]
impl EchoServer {
    fn new() -> Self {
        Self {
            tool_router: Self::tool_router(),
        }
    }

    #[tool(description = "Returns its message at once.")]
    fn echo(&self, Parameters(EchoRequest { message }): Parameters<EchoRequest>) -> String {
        message
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for EchoServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args.iter().any(|arg| arg == "--http") {
        let running = EchoServer::new().serve(rmcp::transport::stdio()).await?;
        running.waiting().await?;
        return Ok(());
    }
    let port = match args.iter().position(|arg| arg == "--port") {
        Some(index) => args.get(index + 1).ok_or("--port needs a value")?.parse()?,
        None => 0u16,
    };
    let service: StreamableHttpService<EchoServer, LocalSessionManager> =
        StreamableHttpService::new(
            || Ok(EchoServer::new()),
            Default::default(),
            StreamableHttpServerConfig::default().with_sse_keep_alive(None),
        );
    let app = axum::Router::new().nest_service("/mcp", service);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("listening on http://{}/mcp", listener.local_addr()?);
    // An SSE answer goes out in several writes; with Nagle's algorithm the later
    // ones wait for the client's delayed ACK (~40 ms per call).
    let listener = listener.tap_io(|stream| {
        if let Err(error) = stream.set_nodelay(true) {
            eprintln!("cannot set TCP_NODELAY: {error}");
        }
    });
    axum::serve(listener, app).await?;
    Ok(())
}
