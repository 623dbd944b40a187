//! Attack: hold connections open with half-sent requests (slowloris).
//!
//! Before the fix there was no header-read timeout and no connection cap: a
//! plain build held all 300 half-open connections of this test (1,100 made it
//! run out of file descriptors, with no token needed). Now connections are
//! capped, the longest-idle one makes room for a new one at the cap, headers
//! must arrive within the header timeout, and idle keep-alive connections close.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{Api, OPERATOR_TOKEN, ServerProcess, wait_until};
use reqwest::StatusCode;

const HALF_OPEN: usize = 300;
const CAP: &str = "32";

fn address(server: &ServerProcess) -> String {
    server.url.trim_start_matches("http://").to_owned()
}

fn half_open(address: &str) -> TcpStream {
    let mut stream = TcpStream::connect(address).expect("connect");
    stream
        .write_all(format!("POST /tools/execute HTTP/1.1\r\nHost: {address}\r\n").as_bytes())
        .expect("partial headers are sent");
    stream
}

/// Whether the server has closed this connection (EOF or reset), without blocking.
fn closed_by_server(stream: &mut TcpStream) -> bool {
    stream.set_nonblocking(true).expect("nonblocking");
    let mut byte = [0u8; 1];
    let closed = match stream.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(error) if error.kind() == ErrorKind::WouldBlock => false,
        Err(_) => true,
    };
    stream.set_nonblocking(false).expect("blocking");
    closed
}

/// Blocks until the server closes `stream`; panics after `limit`.
fn wait_for_close(stream: &mut TcpStream, limit: Duration) -> Duration {
    let started = Instant::now();
    stream.set_read_timeout(Some(limit)).expect("timeout");
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return started.elapsed(),
            Ok(_) => continue,
            Err(error)
                if error.kind() == ErrorKind::WouldBlock || error.kind() == ErrorKind::TimedOut =>
            {
                panic!("the server still holds the connection after {limit:?}")
            }
            Err(_) => return started.elapsed(),
        }
    }
}

#[tokio::test]
async fn more_half_open_connections_than_the_cap_do_not_lock_out_the_operator() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = ServerProcess::start(
        dir.path(),
        &[
            "--max-connections",
            CAP,
            "--header-timeout",
            "30s",
            "--durability",
            "process",
        ],
    );
    let address = address(&server);
    let mut attackers: Vec<TcpStream> = (0..HALF_OPEN).map(|_| half_open(&address)).collect();

    // The operator still gets an answer while the flood holds the server.
    let api = Api::new(&server.url);
    let (status, body) = tokio::time::timeout(
        Duration::from_secs(10),
        api.get("/policy/status", Some(OPERATOR_TOKEN)),
    )
    .await
    .expect("the operator is answered in time");
    assert_eq!(status, StatusCode::OK, "{body}");

    // The server holds at most its cap of the half-open connections.
    let cap: usize = CAP.parse().expect("number");
    let held = wait_until(
        "the server to shed connections",
        Duration::from_secs(20),
        || {
            let held = attackers
                .iter_mut()
                .filter_map(|stream| (!closed_by_server(stream)).then_some(()))
                .count();
            (held <= cap).then_some(held)
        },
    );
    eprintln!("{HALF_OPEN} half-open connections, cap {cap}: the server holds {held}");
}

#[tokio::test]
async fn headers_must_arrive_in_time_and_idle_keep_alive_ends() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = ServerProcess::start(
        dir.path(),
        &["--header-timeout", "1s", "--durability", "process"],
    );
    let address = address(&server);

    let mut slow = half_open(&address);
    let waited = wait_for_close(&mut slow, Duration::from_secs(15));
    eprintln!("a half-sent request was dropped after {waited:?}");

    // A complete request is answered; the idle keep-alive connection then closes.
    let mut idle = TcpStream::connect(&address).expect("connect");
    idle.write_all(format!("GET / HTTP/1.1\r\nHost: {address}\r\n\r\n").as_bytes())
        .expect("request is sent");
    let mut response = [0u8; 12];
    idle.read_exact(&mut response).expect("a response");
    assert_eq!(&response, b"HTTP/1.1 200");
    let waited = wait_for_close(&mut idle, Duration::from_secs(15));
    eprintln!("an idle keep-alive connection was closed after {waited:?}");
}

#[tokio::test]
async fn agent_requests_cannot_take_the_connections_kept_for_operators() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = ServerProcess::start(
        dir.path(),
        &["--max-connections", "16", "--durability", "process"],
    );
    let address = address(&server);
    // Each connection sends complete headers with the agent token, then drips a
    // body it never finishes: a request in progress, which is never evicted.
    let mut dripping = Vec::new();
    for _ in 0..24 {
        let mut stream = TcpStream::connect(&address).expect("connect");
        stream
            .write_all(
                format!(
                    "POST /tools/execute HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {}\r\n\
                     Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{\"tool_name\"",
                    common::AGENT_TOKEN
                )
                .as_bytes(),
            )
            .expect("headers and a first byte of body are sent");
        dripping.push(stream);
    }
    let api = Api::new(&server.url);
    let (status, body) = tokio::time::timeout(
        Duration::from_secs(10),
        api.get("/policy/status", Some(OPERATOR_TOKEN)),
    )
    .await
    .expect("the operator is answered in time");
    assert_eq!(status, StatusCode::OK, "{body}");
}
