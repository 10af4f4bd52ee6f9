//! Connection hygiene of net::serve on real sockets with real mutual TLS (the finding "a
//! domain manager opened 1,024 TLS connections and sent nothing; every other party's
//! handshake timed out"): the first-request deadline and the idle timeout, the per-identity
//! connection cap, the per-address handshake cap and the per-identity request rate — each
//! while another identity is served normally. The timeouts are shrunk through ServeOptions.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::get;
use axum::{Extension, Json, Router};
use net::{Client, Error, HandshakeFailure, RateLimit, ServeOptions};
use protocol::pki::{self, Identity, Role};
use skydd_ca::{CertificateAuthority, IssuedIdentity, Validity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;

/// The CA, the server's identity and the parties of one test.
struct Pki {
    ca_cert: String,
    ca_key: String,
    server: IssuedIdentity,
}

impl Pki {
    fn new() -> Pki {
        let (ca_cert, key) = CertificateAuthority::generate("Cloud A CA").unwrap();
        let ca_key = key.to_string();
        let server = CertificateAuthority::issue(&ca_cert, &ca_key, Role::Ttp, "ttp-1", Validity::Days(1)).unwrap();
        Pki { ca_cert, ca_key, server }
    }
    fn party(&self, role: Role, name: &str) -> Party {
        let id = CertificateAuthority::issue(&self.ca_cert, &self.ca_key, role, name, Validity::Days(1)).unwrap();
        let mut tls =
            pki::client_config(std::slice::from_ref(&self.ca_cert), &[], &id.cert_pem, &id.key_pem, Role::Ttp).unwrap();
        // HTTP/1.1 spoken by hand below.
        tls.alpn_protocols.clear();
        Party { id, tls: Arc::new(tls), ca: self.ca_cert.clone() }
    }
}

struct Party {
    id: IssuedIdentity,
    tls: Arc<rustls::ClientConfig>,
    ca: String,
}

impl Party {
    fn client(&self, server: &Server) -> Client {
        let cfg =
            pki::client_config(std::slice::from_ref(&self.ca), &[], &self.id.cert_pem, &self.id.key_pem, Role::Ttp)
                .unwrap();
        Client::new(&format!("https://localhost:{}", server.addr.port()), cfg).unwrap()
    }
    /// A TCP connection from `from` (any 127/8 address is loopback) with a finished TLS
    /// handshake.
    async fn connect(&self, server: &Server, from: IpAddr) -> std::io::Result<TlsStream<TcpStream>> {
        let socket = TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(from, 0))?;
        let tcp = socket.connect(server.addr).await?;
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        tokio_rustls::TlsConnector::from(self.tls.clone()).connect(name, tcp).await
    }
}

const HERE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1));
/// Another loopback address: a party on another machine, for the per-address cap.
const ELSEWHERE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

struct Server {
    addr: SocketAddr,
    failures: mpsc::UnboundedReceiver<HandshakeFailure>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<net::Result<()>>,
}

impl Server {
    async fn start(pki: &Pki, options: ServeOptions) -> Server {
        let tls = Arc::new(
            pki::server_config(
                std::slice::from_ref(&pki.ca_cert),
                &[],
                &pki.server.cert_pem,
                &pki.server.key_pem,
                &[Role::DomainManager, Role::SecureComponent],
            )
            .unwrap(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, failures) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let options = ServeOptions { failures: Some(tx), drain_timeout: Duration::from_secs(2), ..options };
        let task = tokio::spawn(net::serve_with(listener, tls, router(), options, stop.clone()));
        Server { addr, failures, stop, task }
    }
    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.task).await.expect("drained in time").unwrap().unwrap();
    }
}

fn router() -> Router {
    Router::new().route("/whoami", get(|Extension(id): Extension<Identity>| async move { Json(id) })).route(
        "/slow",
        get(|| async {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            "done"
        }),
    )
}

/// One HTTP/1.1 answer read by hand.
#[derive(Debug)]
struct Answer {
    status: u16,
    /// Header lines, lower-cased.
    headers: String,
    body: String,
}

/// Sends `GET path` on `stream` and reads the answer (Content-Length bodies only).
async fn get_raw(stream: &mut TlsStream<TcpStream>, path: &str) -> Result<Answer, String> {
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match stream.read(&mut chunk).await {
            Ok(0) => return Err("connection closed without an answer".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("read: {e}")),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
    let status =
        head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or(format!("bad status line: {head}"))?;
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or(format!("no content-length: {head}"))?;
    while buf.len() < head_end + length {
        match stream.read(&mut chunk).await {
            Ok(0) => return Err("connection closed in the body".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    Ok(Answer { status, headers: head, body: String::from_utf8_lossy(&buf[head_end..head_end + length]).into_owned() })
}

/// How long until the server closes `stream` (end of file or an error), reading and
/// discarding anything it sends; panics after `limit`.
async fn closed_within(stream: &mut TlsStream<TcpStream>, limit: Duration) -> Duration {
    let started = Instant::now();
    let mut chunk = [0u8; 1024];
    loop {
        match tokio::time::timeout(limit.saturating_sub(started.elapsed()), stream.read(&mut chunk)).await {
            Err(_) => panic!("the server did not close the connection within {limit:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => continue,
        }
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// A fresh connection (handshake included) and one `GET /whoami` by `party` from `from`:
/// the answer's identity name and the time it took.
async fn whoami_fresh(party: &Party, server: &Server, from: IpAddr) -> Result<(String, Duration), String> {
    let started = Instant::now();
    let mut s = party.connect(server, from).await.map_err(|e| format!("connect: {e}"))?;
    let a = get_raw(&mut s, "/whoami").await?;
    if a.status != 200 {
        return Err(format!("HTTP {}: {}", a.status, a.body));
    }
    let id: Identity = serde_json::from_str(&a.body).map_err(|e| e.to_string())?;
    Ok((id.name, started.elapsed()))
}

#[tokio::test]
async fn a_connection_that_sends_nothing_after_its_handshake_is_closed_by_the_deadline() {
    let pki = Pki::new();
    let mallory = pki.party(Role::DomainManager, "mallory");
    let alice = pki.party(Role::DomainManager, "alice");
    let options = ServeOptions {
        first_request_timeout: Duration::from_millis(600),
        idle_timeout: Duration::from_millis(1000),
        close_grace: Duration::from_millis(500),
        ..ServeOptions::default()
    };
    let server = Server::start(&pki, options).await;

    // The finding: handshake, then silence. Closed at the first-request deadline (counted
    // from the accept), not held open.
    let started = Instant::now();
    let mut silent = mallory.connect(&server, HERE).await.unwrap();
    let handshake = started.elapsed();
    let closed = closed_within(&mut silent, Duration::from_secs(5)).await + handshake;
    println!(
        "silent connection: handshake {}, closed {} after connecting (deadline 600 ms)",
        ms(handshake),
        ms(closed)
    );
    assert!(closed >= Duration::from_millis(550), "closed before the deadline: {closed:?}");
    assert!(closed < Duration::from_millis(1500), "closed too late: {closed:?}");

    // Headers begun but never finished: closed at the deadline plus the grace period.
    let started = Instant::now();
    let mut partial = mallory.connect(&server, HERE).await.unwrap();
    partial.write_all(b"GET /whoami HTTP/1.1\r\nHost: loc").await.unwrap();
    closed_within(&mut partial, Duration::from_secs(5)).await;
    let closed = started.elapsed();
    println!("unfinished request headers: closed {} after connecting (deadline 600 ms + grace 500 ms)", ms(closed));
    assert!(closed >= Duration::from_millis(550) && closed < Duration::from_millis(2500), "{closed:?}");

    // A keep-alive connection is closed once idle for idle_timeout ...
    let mut idle = alice.connect(&server, HERE).await.unwrap();
    assert_eq!(get_raw(&mut idle, "/whoami").await.unwrap().status, 200);
    let closed = closed_within(&mut idle, Duration::from_secs(5)).await;
    println!("keep-alive connection idle after one request: closed after {} (idle timeout 1000 ms)", ms(closed));
    assert!(closed >= Duration::from_millis(900) && closed < Duration::from_millis(2000), "{closed:?}");

    // ... but not while it is used (requests every 300 ms for 2.4 s, one connection), nor
    // during a request that takes longer than idle_timeout.
    let mut busy = alice.connect(&server, HERE).await.unwrap();
    for _ in 0..8 {
        assert_eq!(get_raw(&mut busy, "/whoami").await.unwrap().status, 200);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let a = get_raw(&mut busy, "/slow").await.unwrap();
    assert_eq!((a.status, a.body.as_str()), (200, "done"));
    // The ordinary client is unaffected.
    let id: Identity = alice.client(&server).get_json("/whoami").await.unwrap();
    assert_eq!(id.name, "alice");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_holding_its_maximum_of_connections_gets_no_more_while_another_is_served() {
    let pki = Pki::new();
    let mallory = Arc::new(pki.party(Role::DomainManager, "mallory"));
    let alice = pki.party(Role::SecureComponent, "alice");
    const CAP: usize = 8;
    let options = ServeOptions {
        // Small enough that the old loop would have been full: mallory tries 8 + 48 at once.
        max_connections: 32,
        max_connections_per_identity: CAP,
        max_handshakes_per_ip: 8,
        request_rate: None,
        first_request_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
        ..ServeOptions::default()
    };
    let server = Arc::new(Server::start(&pki, options).await);

    // Alone: alice's latency with a fresh connection per request (handshake included).
    let mut alone = Vec::new();
    for _ in 0..10 {
        alone.push(whoami_fresh(&alice, &server, ELSEWHERE).await.unwrap().1);
    }

    // Mallory takes her maximum and keeps it (each connection served once, kept alive).
    let mut held = Vec::new();
    for _ in 0..CAP {
        let mut s = mallory.connect(&server, HERE).await.unwrap();
        assert_eq!(get_raw(&mut s, "/whoami").await.unwrap().status, 200);
        held.push(s);
    }
    // One more: refused in words, then closed.
    let mut extra = mallory.connect(&server, HERE).await.unwrap();
    let a = get_raw(&mut extra, "/whoami").await.unwrap();
    println!("mallory's connection {}: HTTP {} {}", CAP + 1, a.status, a.body);
    assert_eq!(a.status, 429);
    let body: net::ErrorBody = serde_json::from_str(&a.body).unwrap();
    assert_eq!(body.code, "too_many_connections");
    assert!(body.message.contains("mallory") && body.message.contains("8 connections"), "{}", body.message);
    assert!(a.headers.contains("connection: close") && a.headers.contains("retry-after: 1"), "{}", a.headers);
    closed_within(&mut extra, Duration::from_secs(3)).await;

    // Then she floods: 48 workers reconnecting as fast as they are closed, each sending a
    // request (half of them) or nothing (the other half: the finding's silent connections).
    let stop = Arc::new(AtomicBool::new(false));
    let (served, refused, closed) =
        (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut workers = Vec::new();
    for w in 0..48 {
        let (mallory, server, stop) = (mallory.clone(), server.clone(), stop.clone());
        let (served, refused, closed) = (served.clone(), refused.clone(), closed.clone());
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match mallory.connect(&server, HERE).await {
                    Err(_) => {
                        closed.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(mut s) if w % 2 == 0 => match get_raw(&mut s, "/whoami").await {
                        Ok(a) if a.status == 200 => {
                            served.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(a) => {
                            assert_eq!(a.status, 429, "{}", a.body);
                            assert!(a.body.contains("too_many_connections"), "{}", a.body);
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => {
                            closed.fetch_add(1, Ordering::Relaxed);
                        }
                    },
                    Ok(mut s) => {
                        // Silent: held until the server closes it.
                        let _ = tokio::time::timeout(Duration::from_secs(15), s.read(&mut [0u8; 64])).await;
                        closed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Meanwhile alice: fresh connections (a full handshake each) from her own address, and
    // one kept-alive connection.
    let flood_started = Instant::now();
    let mut during = Vec::new();
    for _ in 0..30 {
        let (name, took) = whoami_fresh(&alice, &server, ELSEWHERE).await.expect("alice is served during the flood");
        assert_eq!(name, "alice");
        during.push(took);
    }
    let mut kept = alice.connect(&server, ELSEWHERE).await.unwrap();
    let mut reused = Vec::new();
    for _ in 0..30 {
        let t = Instant::now();
        let a = get_raw(&mut kept, "/whoami").await.expect("alice's kept-alive connection is served during the flood");
        assert_eq!(a.status, 200, "{}", a.body);
        reused.push(t.elapsed());
    }
    let flood_for = flood_started.elapsed() + Duration::from_millis(500);
    stop.store(true, Ordering::Relaxed);
    // Mallory's held connections are still hers and still served.
    for s in held.iter_mut() {
        assert_eq!(get_raw(s, "/whoami").await.unwrap().status, 200);
    }
    for w in workers {
        w.await.unwrap();
    }

    let stats = |v: &mut Vec<Duration>| {
        v.sort();
        (v[v.len() / 2], v[v.len() - 1])
    };
    let (alone_p50, alone_max) = stats(&mut alone);
    let (during_p50, during_max) = stats(&mut during);
    let (reused_p50, reused_max) = stats(&mut reused);
    let (served, refused, closed) =
        (served.load(Ordering::Relaxed), refused.load(Ordering::Relaxed), closed.load(Ordering::Relaxed));
    println!(
        "mallory holds {CAP} connections (her cap) with max_connections 32; her flood of 48 workers over {:.1} s:",
        flood_for.as_secs_f64()
    );
    println!("  {} connection attempts: {served} served, {refused} answered 429 too_many_connections, {closed} closed (before or after the handshake)", served + refused + closed);
    println!(
        "alice, fresh connection + GET /whoami: alone p50 {} max {}; during the flood p50 {} max {} (30 requests)",
        ms(alone_p50),
        ms(alone_max),
        ms(during_p50),
        ms(during_max)
    );
    println!(
        "alice, kept-alive connection during the flood: p50 {} max {} (30 requests)",
        ms(reused_p50),
        ms(reused_max)
    );
    assert_eq!(served, 0, "mallory got more than her {CAP} connections");
    assert!(refused + closed > 0, "the flood did not run");
    // Generous bounds for a loaded 2-core machine (mallory's 48 workers do their handshakes
    // in this same process); without the cap alice would not be served at all: mallory's
    // silent connections would hold all 32 slots.
    assert!(during_max < Duration::from_secs(5), "alice waited {during_max:?} during the flood");
    assert!(reused_max < Duration::from_secs(5), "alice waited {reused_max:?} on her kept-alive connection");
    drop(held);
    Arc::into_inner(server).expect("workers are done").stop().await;
}

#[tokio::test]
async fn sockets_in_their_handshake_are_capped_per_address_and_other_addresses_are_served() {
    let pki = Pki::new();
    let alice = pki.party(Role::SecureComponent, "alice");
    let options = ServeOptions {
        max_connections: 16,
        max_handshakes_per_ip: 4,
        first_request_timeout: Duration::from_millis(800),
        ..ServeOptions::default()
    };
    let mut server = Server::start(&pki, options).await;

    // Four sockets from 127.0.0.1 that never start TLS: they take that address's share.
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(TcpStream::connect(server.addr).await.unwrap());
    }
    // The fifth from the same address is closed before its handshake, and reported.
    let mut fifth = TcpStream::connect(server.addr).await.unwrap();
    let f = tokio::time::timeout(Duration::from_secs(5), server.failures.recv()).await.unwrap().unwrap();
    assert_eq!(f.reason, "too many TLS handshakes in progress from 127.0.0.1 (limit 4)");
    let t = Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(2), fifth.read(&mut [0u8; 16])).await.expect("closed at once");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    println!("fifth silent socket from 127.0.0.1 closed {} after the refusal was reported", ms(t.elapsed()));

    // A party at another address is served meanwhile.
    let (name, took) = whoami_fresh(&alice, &server, ELSEWHERE).await.unwrap();
    assert_eq!(name, "alice");
    println!("alice from 127.0.0.2 while 127.0.0.1 is at its cap: {}", ms(took));

    // The silent sockets run out of time (handshake bounded by the first-request deadline)
    // and 127.0.0.1 is served again.
    for _ in 0..4 {
        let f = tokio::time::timeout(Duration::from_secs(5), server.failures.recv()).await.unwrap().unwrap();
        assert_eq!(f.reason, "no TLS handshake within 800ms");
    }
    let (name, _) = whoami_fresh(&alice, &server, HERE).await.unwrap();
    assert_eq!(name, "alice");
    drop(silent);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_over_its_request_rate_is_answered_429_rate_limited_while_another_is_served() {
    let pki = Pki::new();
    let mallory = pki.party(Role::DomainManager, "mallory");
    let alice = pki.party(Role::SecureComponent, "alice");
    let rate = RateLimit { per_second: 20.0, burst: 40 };
    let options = ServeOptions { request_rate: Some(rate), ..ServeOptions::default() };
    let server = Server::start(&pki, options).await;

    let flooder = mallory.client(&server);
    let flood = async {
        let started = Instant::now();
        let (mut ok, mut limited) = (0usize, 0usize);
        for _ in 0..600 {
            match flooder.get_json::<Identity>("/whoami").await {
                Ok(_) => ok += 1,
                Err(e) => {
                    match &e {
                        Error::Api { status: 429, code, message } if code == "rate_limited" => {
                            assert!(message.contains("mallory") && message.contains("retry in 1 s"), "{message}")
                        }
                        other => panic!("expected 429 rate_limited, got {other:?}"),
                    }
                    assert!(e.never_reached_peer(), "a rate refusal is answered before the handler");
                    limited += 1;
                }
            }
        }
        (ok, limited, started.elapsed())
    };
    let victim = alice.client(&server);
    let served = async {
        let mut latencies = Vec::new();
        for _ in 0..20 {
            let t = Instant::now();
            let id: Identity = victim.get_json("/whoami").await.expect("alice is within her own rate");
            assert_eq!(id.name, "alice");
            latencies.push(t.elapsed());
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        latencies
    };
    let ((ok, limited, took), mut latencies) = tokio::join!(flood, served);
    latencies.sort();
    println!(
        "mallory: 600 requests in {}: {ok} served, {limited} answered 429 rate_limited (20/s, burst 40); alice: 20 of 20 served, p50 {} max {}",
        ms(took),
        ms(latencies[10]),
        ms(latencies[19])
    );
    let allowed = 40.0 + 20.0 * took.as_secs_f64() + 1.0;
    assert!(ok as f64 <= allowed, "{ok} served in {took:?}, at most {allowed} allowed");
    assert!(ok >= 40 && limited > 0, "ok {ok} limited {limited}");

    // The refusal carries Retry-After.
    let mut raw = mallory.connect(&server, HERE).await.unwrap();
    let a = loop {
        let a = get_raw(&mut raw, "/whoami").await.unwrap();
        if a.status == 429 {
            break a;
        }
    };
    assert!(a.headers.contains("retry-after: 1"), "{}", a.headers);
    assert!(a.body.contains("\"code\":\"rate_limited\""), "{}", a.body);
    // Tokens come back at the rate.
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(get_raw(&mut raw, "/whoami").await.unwrap().status, 200);
    server.stop().await;
}

#[tokio::test]
async fn limits_that_would_serve_nothing_are_refused() {
    let pki = Pki::new();
    let tls = Arc::new(
        pki::server_config(
            std::slice::from_ref(&pki.ca_cert),
            &[],
            &pki.server.cert_pem,
            &pki.server.key_pem,
            &[Role::DomainManager],
        )
        .unwrap(),
    );
    for (options, words) in [
        (
            ServeOptions { max_connections_per_identity: 0, ..ServeOptions::default() },
            "max_connections_per_identity is 0",
        ),
        (ServeOptions { max_handshakes_per_ip: 0, ..ServeOptions::default() }, "max_handshakes_per_ip is 0"),
        (ServeOptions { idle_timeout: Duration::ZERO, ..ServeOptions::default() }, "idle_timeout is 0"),
        (
            ServeOptions { request_rate: Some(RateLimit { per_second: 0.0, burst: 10 }), ..ServeOptions::default() },
            "request_rate of 0 per second",
        ),
    ] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let e = net::serve_with(listener, tls.clone(), router(), options, CancellationToken::new()).await.unwrap_err();
        assert!(matches!(e, Error::Config(_)), "{e:?}");
        assert!(e.to_string().contains(words), "{e}");
    }
}
