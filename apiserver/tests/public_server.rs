//! The public server's socket: a client that sends half a header, or nothing, is cut off
//! after the header read timeout, and a complete request still gets its answer.

use std::time::{Duration, Instant};

use axum::{Router, routing::get};
use hookrun_apiserver::serve_public;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

const TIMEOUT: Duration = Duration::from_millis(300);

async fn start() -> (std::net::SocketAddr, watch::Sender<bool>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let addr = listener.local_addr().expect("an address");
    let app = Router::new().route("/", get(|| async { "hello" }));
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(serve_public(listener, app, TIMEOUT, stopped));
    (addr, stop)
}

/// Reads until the server closes the connection, and how long that took.
async fn read_until_closed(stream: &mut TcpStream) -> (String, Duration) {
    let started = Instant::now();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("the server closes the connection within 5 s")
        .ok();
    (
        String::from_utf8_lossy(&answer).into_owned(),
        started.elapsed(),
    )
}

#[tokio::test]
async fn half_a_header_is_cut_off() {
    let (addr, _stop) = start().await;
    let mut stream = TcpStream::connect(addr).await.expect("connects");
    stream
        .write_all(b"POST /webhooks/a/b/c HTTP/1.1\r\nHost: x\r\nContent-")
        .await
        .expect("writes");
    let (answer, elapsed) = read_until_closed(&mut stream).await;
    assert!(!answer.contains("200 OK"), "{answer}");
    assert!(elapsed >= TIMEOUT / 2, "closed too early: {elapsed:?}");
}

#[tokio::test]
async fn a_silent_client_is_cut_off() {
    let (addr, _stop) = start().await;
    let mut stream = TcpStream::connect(addr).await.expect("connects");
    let (answer, _) = read_until_closed(&mut stream).await;
    assert!(answer.is_empty() || answer.contains("408"), "{answer}");
}

#[tokio::test]
async fn complete_requests_are_answered_and_shutdown_stops_accepting() {
    let (addr, stop) = start().await;
    let mut stream = TcpStream::connect(addr).await.expect("connects");
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("writes");
    let (answer, _) = read_until_closed(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("hello"), "{answer}");

    stop.send(true).expect("the server listens");
    let refused = async {
        loop {
            if TcpStream::connect(addr).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), refused)
        .await
        .expect("the listener closes after shutdown");
}
