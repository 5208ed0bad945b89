//! `/readyz` tells the balancer readiness and load in one answer: the
//! `x-fleet-connections` header counts the worker's connected sockets, ready or not.

use std::time::Duration;

use shared::metrics::READYZ_CONNECTIONS_HEADER;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use worker::{RoomsApp, WorkerSettings};

/// One HTTP/1.1 exchange on a fresh connection; the raw answer, head and body.
async fn request(addr: std::net::SocketAddr, method: &str, target: &str, body: &str) -> String {
    let mut conn = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "{method} {target} HTTP/1.1\r\nhost: w\r\nconnection: close\r\n\
         content-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).await.unwrap();
    answer
}

/// The status line of `/readyz`, and the connection count it reports.
async fn readyz(addr: std::net::SocketAddr) -> (String, u64) {
    let answer = request(addr, "GET", "/readyz", "").await;
    let status = answer.lines().next().unwrap_or_default().to_owned();
    let prefix = format!("{READYZ_CONNECTIONS_HEADER}: ");
    let count = answer
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix(&prefix)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| panic!("no {READYZ_CONNECTIONS_HEADER} in:\n{answer}"));
    (status, count.trim().parse().expect("a number"))
}

/// Opens a long-polling session; the target of its later requests.
async fn open_polling_session(addr: std::net::SocketAddr) -> String {
    let open = request(addr, "GET", "/socket.io/?EIO=4&transport=polling", "").await;
    let sid = open
        .split("\"sid\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("no sid in:\n{open}"))
        .to_owned();
    format!("/socket.io/?EIO=4&transport=polling&sid={sid}")
}

/// Waits until `/readyz` counts `n` sockets (the caller bounds the wait).
async fn until_counted(addr: std::net::SocketAddr, n: u64) {
    while readyz(addr).await.1 != n {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Not ready (Redis unreachable), the worker still reports its load: 0, then 1 once a
/// client's socket is connected.
#[tokio::test]
async fn readyz_counts_connected_sockets_ready_or_not() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Port 1 refuses: the worker serves, but is not ready.
    let settings = WorkerSettings::standalone("w9".into(), addr, "redis://127.0.0.1:1".into());
    tokio::spawn(worker::run(
        listener,
        settings,
        RoomsApp,
        std::future::pending(),
    ));
    tokio::time::timeout(Duration::from_secs(10), async {
        let (status, count) = readyz(addr).await;
        assert!(status.contains(" 503 "), "{status}");
        assert_eq!(count, 0);

        // A long-polling session, then a Socket.IO connect on the main namespace.
        let target = open_polling_session(addr).await;
        let posted = request(addr, "POST", &target, "40").await;
        assert!(posted.starts_with("HTTP/1.1 200"), "{posted}");
        until_counted(addr, 1).await;
    })
    .await
    .expect("the worker answered within 10 s");
}

/// An app need not serve `/`: a worker with only `/chat` answers `/readyz` and counts a socket
/// connected to `/chat` (counting only `/` used to panic).
#[tokio::test]
async fn an_app_without_the_main_namespace_is_counted_too() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let settings = WorkerSettings::standalone("w8".into(), addr, "redis://127.0.0.1:1".into());
    let app = worker::Namespaces::new().on("/chat", |_: worker::Socket, _: &worker::Fleet| {});
    tokio::spawn(worker::run(listener, settings, app, std::future::pending()));
    tokio::time::timeout(Duration::from_secs(10), async {
        assert_eq!(readyz(addr).await.1, 0);
        let target = open_polling_session(addr).await;
        let posted = request(addr, "POST", &target, "40/chat,").await;
        assert!(posted.starts_with("HTTP/1.1 200"), "{posted}");
        until_counted(addr, 1).await;
        let metrics = request(addr, "GET", "/metrics", "").await;
        assert!(
            metrics.contains("fleet_worker_connections{worker=\"w8\"} 1"),
            "{metrics}"
        );
    })
    .await
    .expect("the worker answered within 10 s");
}
