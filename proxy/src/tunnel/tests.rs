//! Relay tests on loopback: data integrity both ways in both modes,
//! half-close, cancellation, idle timeout, which side failed; and the
//! splice-vs-copy measurement (ignored by default, run it with
//! `cargo test -p tollgate-proxy --release -- --ignored --nocapture tunnel_throughput`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use super::*;

/// Every test step is bounded by this.
const BOUND: Duration = Duration::from_secs(20);

async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(BOUND, f)
        .await
        .expect("test step timed out")
}

/// A connected pair (client end, server end) on loopback.
async fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
    (c.unwrap(), s.unwrap().0)
}

/// client ⇄ [down | relay | up] ⇄ server: returns (client, down, up, server).
async fn chain() -> (TcpStream, TcpStream, TcpStream, TcpStream) {
    let (client, down) = pair().await;
    let (up, server) = pair().await;
    (client, down, up, server)
}

/// Deterministic, non-repeating-looking bytes.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x & 0xff) as u8
        })
        .collect()
}

fn opts(mode: CopyMode) -> RelayOptions {
    RelayOptions {
        idle_timeout: Duration::from_secs(30),
        mode,
    }
}

async fn both_ways(mode: CopyMode) {
    let (mut client, down, up, mut server) = chain().await;
    let relay =
        tokio::spawn(async move { relay(&down, &up, &opts(mode), std::future::pending()).await });
    let a = pattern(4 << 20, 1);
    let b = pattern(3 << 20, 2);
    let (a2, b2) = (a.clone(), b.clone());
    let (c_res, s_res) = bounded(async {
        tokio::join!(
            async move {
                let (mut r, mut w) = client.split();
                let send = async {
                    w.write_all(&a2).await.unwrap();
                    w.shutdown().await.unwrap();
                };
                let mut got = Vec::new();
                let recv = r.read_to_end(&mut got);
                let ((), n) = tokio::join!(send, recv);
                n.unwrap();
                got
            },
            async move {
                let (mut r, mut w) = server.split();
                let send = async {
                    w.write_all(&b2).await.unwrap();
                    w.shutdown().await.unwrap();
                };
                let mut got = Vec::new();
                let recv = r.read_to_end(&mut got);
                let ((), n) = tokio::join!(send, recv);
                n.unwrap();
                got
            }
        )
    })
    .await;
    assert!(
        c_res == b,
        "client did not receive the server's bytes intact"
    );
    assert!(
        s_res == a,
        "server did not receive the client's bytes intact"
    );
    let stats = bounded(relay).await.unwrap().unwrap();
    assert_eq!(stats.end, RelayEnd::Closed);
    assert_eq!(stats.to_upstream, a.len() as u64);
    assert_eq!(stats.to_downstream, b.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn splice_moves_bytes_both_ways_intact() {
    both_ways(CopyMode::Splice).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userspace_moves_bytes_both_ways_intact() {
    both_ways(CopyMode::Userspace).await;
}

async fn half_close(mode: CopyMode) {
    let (mut client, down, up, mut server) = chain().await;
    let relay =
        tokio::spawn(async move { relay(&down, &up, &opts(mode), std::future::pending()).await });
    // The client is done sending; the server must see EOF, and can still
    // answer afterwards.
    client.write_all(b"request").await.unwrap();
    client.shutdown().await.unwrap();
    let mut got = Vec::new();
    bounded(server.read_to_end(&mut got)).await.unwrap();
    assert_eq!(got, b"request");
    let reply = pattern(1 << 20, 3);
    server.write_all(&reply).await.unwrap();
    server.shutdown().await.unwrap();
    let mut back = Vec::new();
    bounded(client.read_to_end(&mut back)).await.unwrap();
    assert!(
        back == reply,
        "reply after half-close was not delivered intact"
    );
    let stats = bounded(relay).await.unwrap().unwrap();
    assert_eq!(stats.end, RelayEnd::Closed);
}

#[tokio::test]
async fn splice_half_close_keeps_other_direction() {
    half_close(CopyMode::Splice).await;
}

#[tokio::test]
async fn userspace_half_close_keeps_other_direction() {
    half_close(CopyMode::Userspace).await;
}

#[tokio::test]
async fn cancel_ends_relay_promptly() {
    let (_client, down, up, _server) = chain().await;
    let (tx, rx) = oneshot::channel::<()>();
    let relay = tokio::spawn(async move {
        let cancel = async {
            let _ = rx.await;
        };
        relay(&down, &up, &opts(CopyMode::Splice), cancel).await
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!relay.is_finished(), "relay ended before cancellation");
    let t = std::time::Instant::now();
    tx.send(()).unwrap();
    let stats = bounded(relay).await.unwrap().unwrap();
    assert_eq!(stats.end, RelayEnd::Cancelled);
    assert!(t.elapsed() < Duration::from_millis(500));
}

#[tokio::test]
async fn idle_timeout_ends_relay_and_activity_postpones_it() {
    let (mut client, down, up, mut server) = chain().await;
    let relay = tokio::spawn(async move {
        let o = RelayOptions {
            idle_timeout: Duration::from_millis(300),
            mode: CopyMode::Splice,
        };
        relay(&down, &up, &o, std::future::pending()).await
    });
    // Traffic every 100 ms for 600 ms keeps it alive past one idle period.
    let start = std::time::Instant::now();
    for _ in 0..6 {
        client.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        bounded(server.read_exact(&mut b)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!relay.is_finished(), "relay idled out despite traffic");
    let stats = bounded(relay).await.unwrap().unwrap();
    assert_eq!(stats.end, RelayEnd::Idle);
    assert!(start.elapsed() >= Duration::from_millis(800));
}

#[tokio::test]
async fn upstream_reset_is_reported_as_upstream() {
    let (_client, down, up, server) = chain().await;
    let relay = tokio::spawn(async move {
        relay(&down, &up, &opts(CopyMode::Splice), std::future::pending()).await
    });
    server.set_zero_linger().unwrap();
    drop(server);
    match bounded(relay).await.unwrap() {
        Err(TunnelError::Upstream(_)) => {}
        other => panic!("expected an upstream error, got {other:?}"),
    }
}

/// Sets its flag when dropped.
struct DropFlag(Arc<std::sync::atomic::AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn serve_until_returns_what_the_server_returns() {
    let out = bounded(serve_until(async { 7 }, std::future::pending())).await;
    assert_eq!(out, Some(7));
}

/// A server that never ends, and the flag set when it is dropped.
fn endless_server() -> (
    Arc<std::sync::atomic::AtomicBool>,
    impl Future<Output = ()> + Send + 'static,
) {
    let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = DropFlag(Arc::clone(&dropped));
    let serve = async move {
        let _flag = flag;
        std::future::pending::<()>().await;
    };
    (dropped, serve)
}

#[tokio::test]
async fn serve_until_stops_the_server_before_it_returns() {
    let (dropped, serve) = endless_server();
    let stop = tokio::time::sleep(Duration::from_millis(20));
    assert_eq!(bounded(serve_until(serve, stop)).await, None);
    // Aborted and awaited: nothing of the server is left running.
    assert!(dropped.load(Ordering::SeqCst));
}

#[tokio::test]
async fn dropping_serve_until_aborts_the_server() {
    let (dropped, serve) = endless_server();
    let waited = tokio::time::timeout(
        Duration::from_millis(20),
        serve_until(serve, std::future::pending()),
    )
    .await;
    assert!(waited.is_err());
    bounded(async {
        while !dropped.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
}
