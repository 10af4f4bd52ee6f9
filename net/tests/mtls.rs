//! Real mutual-TLS servers and clients on loopback: every acceptance and refusal rule of
//! protocol::pki as seen through net::serve and net::Client.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use net::{error_response, ApiError, Client, Error, HandshakeFailure, ServeOptions, TlsFiles};
use protocol::pki::{self, Identity, Role};
use protocol::refusal::Refusal;
use serde_json::{json, Value};
use skydd_ca::{CertificateAuthority, IssuedIdentity, Validity};
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

struct Ca {
    cert: String,
    key: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let (cert, key) = CertificateAuthority::generate(name).unwrap();
        Ca { cert, key: key.to_string() }
    }
    fn issue(&self, role: Role, name: &str) -> IssuedIdentity {
        CertificateAuthority::issue(&self.cert, &self.key, role, name, Validity::Days(1)).unwrap()
    }
}

struct Server {
    port: u16,
    failures: mpsc::UnboundedReceiver<HandshakeFailure>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<net::Result<()>>,
}

impl Server {
    fn url(&self) -> String {
        format!("https://localhost:{}", self.port)
    }
    async fn next_failure(&mut self) -> HandshakeFailure {
        tokio::time::timeout(Duration::from_secs(10), self.failures.recv())
            .await
            .expect("a handshake failure is reported")
            .expect("channel open")
    }
}

fn router() -> Router {
    Router::new()
        .route(
            "/whoami",
            get(
                |Extension(id): Extension<Identity>,
                 axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<SocketAddr>| async move {
                    assert!(peer.ip().is_loopback());
                    Json(id)
                },
            ),
        )
        .route("/echo", post(|Json(v): Json<Value>| async move { Json(json!({ "echo": v })) }))
        .route(
            "/refuse",
            get(|| async {
                error_response(StatusCode::FORBIDDEN, "not-in-acl", "vm-7 is not in the ACL of domain 3f2a, version 4")
            }),
        )
        .route(
            "/missing",
            get(|| async {
                Err::<Json<Value>, _>(ApiError::refused(Refusal::DomainUnknown, "domain 9 does not exist"))
            }),
        )
        .route("/plain-error", get(|| async { (StatusCode::BAD_GATEWAY, "upstream down") }))
        .route("/not-json", get(|| async { "this is not json" }))
        .route("/big", get(|| async { Json(vec![7u8; 10_000]) }))
        .route("/empty", post(|| async { StatusCode::NO_CONTENT }))
}

async fn start(trusted: &[&Ca], own: &IssuedIdentity, allowed: &[Role]) -> Server {
    let cas: Vec<String> = trusted.iter().map(|c| c.cert.clone()).collect();
    start_with(Arc::new(pki::server_config(&cas, &[], &own.cert_pem, &own.key_pem, allowed).unwrap())).await
}

async fn start_with(tls: impl Into<net::ServerTls>) -> Server {
    let tls: net::ServerTls = tls.into();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, failures) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let opts = ServeOptions { failures: Some(tx), drain_timeout: Duration::from_secs(2), ..Default::default() };
    let task = tokio::spawn(net::serve_with(listener, tls, router(), opts, stop.clone()));
    Server { port, failures, stop, task }
}

fn client(server: &Server, trusted: &[&Ca], own: &IssuedIdentity, expect: Role) -> Client {
    let cas: Vec<String> = trusted.iter().map(|c| c.cert.clone()).collect();
    let cfg = pki::client_config(&cas, &[], &own.cert_pem, &own.key_pem, expect).unwrap();
    Client::new(&server.url(), cfg).unwrap()
}

/// The client side of a refused handshake: the server's alert, in words. (If the kernel
/// turned the close into a reset before the alert was read, we still get a connection error.)
fn assert_refused(e: &Error, alert_words: &str) {
    eprintln!("client saw: {e}");
    match e {
        Error::Tls { reason, .. } => {
            assert!(reason.contains(alert_words), "client error: {reason}")
        }
        Error::Connect { reason, .. } => {
            assert!(reason.contains("closed the connection"), "client error: {reason}")
        }
        other => panic!("expected a TLS refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn right_certificate_and_role_is_served_with_identity() {
    let ca = Ca::new("Cloud A CA");
    let ttp = ca.issue(Role::Ttp, "ttp-1");
    let sc = ca.issue(Role::SecureComponent, "sc-host-1");
    let server = start(&[&ca], &ttp, &[Role::SecureComponent, Role::CloudPlatform]).await;
    let c = client(&server, &[&ca], &sc, Role::Ttp);

    let id: Identity = c.get_json("/whoami").await.unwrap();
    assert_eq!(id, Identity { name: "sc-host-1".into(), role: Role::SecureComponent });
    // The same connection is reused for a second request.
    let v: Value = c.post_json("/echo", &json!({"a": 1})).await.unwrap();
    assert_eq!(v, json!({"echo": {"a": 1}}));
    // Empty 204 body reads as unit.
    let (): () = c.post_json("/empty", &json!({})).await.unwrap();
}

#[tokio::test]
async fn no_client_certificate_is_refused() {
    let ca = Ca::new("Cloud A CA");
    let ttp = ca.issue(Role::Ttp, "ttp-1");
    let mut server = start(&[&ca], &ttp, &[Role::SecureComponent]).await;
    let cfg = pki::client_config_without_certificate(std::slice::from_ref(&ca.cert), &[], Role::Ttp).unwrap();
    let c = Client::new(&server.url(), cfg).unwrap();

    let e = c.get_json::<Value>("/whoami").await.unwrap_err();
    assert_refused(&e, "requires a client certificate");
    let f = server.next_failure().await;
    assert_eq!(f.reason, "no client certificate presented");
    assert!(f.peer.ip().is_loopback());
}

#[tokio::test]
async fn certificate_of_another_ca_is_refused() {
    let ca = Ca::new("Cloud A CA");
    let rogue = Ca::new("Rogue CA");
    let ttp = ca.issue(Role::Ttp, "ttp-1");
    let sc = rogue.issue(Role::SecureComponent, "sc-host-1");
    let mut server = start(&[&ca], &ttp, &[Role::SecureComponent]).await;
    // The client itself trusts CA A (to accept the server).
    let c = client(&server, &[&ca], &sc, Role::Ttp);

    let e = c.get_json::<Value>("/whoami").await.unwrap_err();
    assert_refused(&e, "not issued by a CA the peer trusts");
    assert_eq!(server.next_failure().await.reason, "certificate is not issued by a trusted CA");
}

#[tokio::test]
async fn expired_certificate_is_refused() {
    let ca = Ca::new("Cloud A CA");
    let ttp = ca.issue(Role::Ttp, "ttp-1");
    let now = OffsetDateTime::now_utc();
    let old = CertificateAuthority::issue(
        &ca.cert,
        &ca.key,
        Role::SecureComponent,
        "sc-old",
        Validity::Between { not_before: now - time::Duration::days(30), not_after: now - time::Duration::days(1) },
    )
    .unwrap();
    let mut server = start(&[&ca], &ttp, &[Role::SecureComponent]).await;
    let c = client(&server, &[&ca], &old, Role::Ttp);

    let e = c.get_json::<Value>("/whoami").await.unwrap_err();
    assert_refused(&e, "expired");
    let reason = server.next_failure().await.reason;
    assert!(reason.starts_with("certificate expired at "), "{reason}");
    let day = (now - time::Duration::days(1)).date().to_string();
    assert!(reason.contains(&day), "{reason} should name the expiry date {day}");
}

#[tokio::test]
async fn wrong_role_is_refused_naming_both_roles() {
    let ca = Ca::new("Cloud A CA");
    let ttp = ca.issue(Role::Ttp, "ttp-1");
    let dm = ca.issue(Role::DomainManager, "alice");
    let mut server = start(&[&ca], &ttp, &[Role::SecureComponent]).await;
    let c = client(&server, &[&ca], &dm, Role::Ttp);

    let e = c.get_json::<Value>("/whoami").await.unwrap_err();
    assert_refused(&e, "refused our certificate");
    assert_eq!(
        server.next_failure().await.reason,
        "client certificate of \"alice\" has role domain-manager, this endpoint accepts secure-component"
    );
}

#[tokio::test]
async fn federated_server_accepts_clients_of_both_clouds() {
    let a = Ca::new("Cloud A CA");
    let b = Ca::new("Cloud B CA");
    let ttp = a.issue(Role::Ttp, "ttp-a");
    let sc_a = a.issue(Role::SecureComponent, "sc-a");
    let sc_b = b.issue(Role::SecureComponent, "sc-b");
    let server = start(&[&a, &b], &ttp, &[Role::SecureComponent]).await;

    let id: Identity = client(&server, &[&a], &sc_a, Role::Ttp).get_json("/whoami").await.unwrap();
    assert_eq!(id.name, "sc-a");
    let id: Identity = client(&server, &[&a], &sc_b, Role::Ttp).get_json("/whoami").await.unwrap();
    assert_eq!(id, Identity { name: "sc-b".into(), role: Role::SecureComponent });

    // ... and a server trusting only A still refuses B's.
    let mut only_a = start(&[&a], &ttp, &[Role::SecureComponent]).await;
    let e = client(&only_a, &[&a], &sc_b, Role::Ttp).get_json::<Value>("/whoami").await.unwrap_err();
    assert_refused(&e, "not issued by a CA the peer trusts");
    assert_eq!(only_a.next_failure().await.reason, "certificate is not issued by a trusted CA");
}

/// The TLS files of a TTP of cloud A that trusts its own root for every role and cloud B's
/// root only for domain managers and the secure component `sc-b-07`, configured the way
/// ttp.toml says it (docs/PKI.md "Federation").
fn federated_ttp_files(dir: &std::path::Path, a: &Ca, b: &Ca, ttp: &IssuedIdentity) -> TlsFiles {
    std::fs::write(dir.join("ca.pem"), &a.cert).unwrap();
    std::fs::write(dir.join("partner-ca.pem"), &b.cert).unwrap();
    std::fs::write(dir.join("ttp-a.pem"), &ttp.cert_pem).unwrap();
    let key = dir.join("ttp-a-key.pem");
    std::fs::write(&key, ttp.key_pem.as_bytes()).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    #[derive(serde::Deserialize)]
    struct Trust {
        ca: Vec<net::TrustedRootFile>,
    }
    let toml_text = format!(
        r#"ca = ["{own}", {{ file = "{partner}", allow = [{{ role = "domain-manager" }}, {{ role = "secure-component", names = ["sc-b-07"] }}] }}]"#,
        own = dir.join("ca.pem").display(),
        partner = dir.join("partner-ca.pem").display(),
    );
    let trust: Trust = toml::from_str(&toml_text).unwrap();
    TlsFiles { ca: trust.ca, cert: dir.join("ttp-a.pem"), key, crl: Vec::new() }
}

#[tokio::test]
async fn a_limited_partner_root_is_accepted_only_for_its_roles_and_names() {
    let a = Ca::new("Cloud A CA");
    let b = Ca::new("Cloud B CA");
    let dir = tempfile::tempdir().unwrap();
    let files = federated_ttp_files(dir.path(), &a, &b, &a.issue(Role::Ttp, "ttp-a"));
    let mut server =
        start_with(files.server_tls(&[Role::CloudPlatform, Role::SecureComponent, Role::DomainManager]).unwrap()).await;

    // Within the partner's allowance: its named host and its domain managers.
    for (role, name) in [(Role::SecureComponent, "sc-b-07"), (Role::DomainManager, "bob")] {
        let id: Identity = client(&server, &[&a], &b.issue(role, name), Role::Ttp).get_json("/whoami").await.unwrap();
        assert_eq!(id, Identity { name: name.into(), role });
    }
    // The own root is not limited: its cloud platform is served.
    let id: Identity =
        client(&server, &[&a], &a.issue(Role::CloudPlatform, "cp-a"), Role::Ttp).get_json("/whoami").await.unwrap();
    assert_eq!(id.role, Role::CloudPlatform);

    // Outside it: a cloud-platform certificate, and a secure component of another name.
    let allowed = "which may issue only domain-manager; secure-component named sc-b-07";
    for (role, name) in [(Role::CloudPlatform, "cp-b"), (Role::SecureComponent, "sc-b-99")] {
        let e = client(&server, &[&a], &b.issue(role, name), Role::Ttp).get_json::<Value>("/whoami").await.unwrap_err();
        assert_refused(&e, "its role is not accepted there");
        assert_eq!(
            server.next_failure().await.reason,
            format!("client certificate of {name:?} (role {role}) is issued by trusted root \"Cloud B CA\" (trusted CA #2), {allowed}")
        );
    }
}

#[tokio::test]
async fn a_client_refuses_a_server_certificate_its_root_may_not_issue() {
    let a = Ca::new("Cloud A CA");
    let b = Ca::new("Cloud B CA");
    let ttp_b = b.issue(Role::Ttp, "ttp-b");
    let server = start(&[&a, &b], &ttp_b, &[Role::SecureComponent]).await;
    let sc = a.issue(Role::SecureComponent, "sc-a");
    let roots = [
        pki::TrustedRoot::any_role(a.cert.clone()),
        pki::TrustedRoot::limited(b.cert.clone(), vec![pki::RoleAllowance::role(Role::DomainManager)]),
    ];
    let limited = pki::client_config(&roots, &[], &sc.cert_pem, &sc.key_pem, Role::Ttp).unwrap();
    match Client::new(&server.url(), limited).unwrap().get_json::<Value>("/whoami").await.unwrap_err() {
        Error::Tls { reason, .. } => assert_eq!(
            reason,
            "server certificate of \"ttp-b\" (role ttp) is issued by trusted root \"Cloud B CA\" (trusted CA #2), \
             which may issue only domain-manager"
        ),
        other => panic!("expected a TLS refusal, got {other:?}"),
    }
    // Trusting B for the ttp role, the same server is accepted.
    let roots = [
        pki::TrustedRoot::any_role(a.cert.clone()),
        pki::TrustedRoot::limited(b.cert.clone(), vec![pki::RoleAllowance::role(Role::Ttp)]),
    ];
    let cfg = pki::client_config(&roots, &[], &sc.cert_pem, &sc.key_pem, Role::Ttp).unwrap();
    let id: Identity = Client::new(&server.url(), cfg).unwrap().get_json("/whoami").await.unwrap();
    assert_eq!(id.name, "sc-a");
}

#[test]
fn a_signer_is_held_to_its_roots_limit_with_revocation_lists_too() {
    let a = Ca::new("Cloud A CA");
    let b = Ca::new("Cloud B CA");
    let roots = [
        pki::TrustedRoot::any_role(a.cert.clone()),
        pki::TrustedRoot::limited(b.cert.clone(), vec![pki::RoleAllowance::role(Role::DomainManager)]),
        // The same partner root listed again, for its one host: either entry may allow.
        pki::TrustedRoot::limited(
            b.cert.clone(),
            vec![pki::RoleAllowance::named(Role::SecureComponent, &["sc-b-*"]).unwrap()],
        ),
    ];
    let der = |id: &IssuedIdentity| pki::certs_from_pem(&id.cert_pem, "test").unwrap()[0].to_vec();
    let now = OffsetDateTime::now_utc().unix_timestamp() as u64;
    let crls = [revoke(&a, 1, &[]), revoke(&b, 1, &[])];
    for lists in [&crls[..], &[]] {
        let bob = pki::identity_from_certificate(&der(&b.issue(Role::DomainManager, "bob"))).unwrap();
        let verify = |id: &IssuedIdentity| protocol::signing::verify_signer_certificate(&der(id), &roots, lists, now);
        assert_eq!(verify(&b.issue(Role::DomainManager, "bob")).unwrap(), bob);
        assert_eq!(verify(&b.issue(Role::SecureComponent, "sc-b-1")).unwrap().name, "sc-b-1");
        assert_eq!(verify(&a.issue(Role::CloudPlatform, "cp-a")).unwrap().name, "cp-a");
        let e = verify(&b.issue(Role::CloudPlatform, "cp-b")).unwrap_err().to_string();
        assert!(
            e.contains("certificate of \"cp-b\" (role cloud-platform) is issued by trusted root \"Cloud B CA\"")
                && e.contains("may issue only domain-manager"),
            "{e}"
        );
        let e = verify(&b.issue(Role::SecureComponent, "other-host")).unwrap_err().to_string();
        assert!(e.contains("\"other-host\" (role secure-component)"), "{e}");
    }
}

#[tokio::test]
async fn client_refuses_server_of_unexpected_role() {
    let ca = Ca::new("Cloud A CA");
    let imposter = ca.issue(Role::SecureComponent, "sc-pretending");
    let cp = ca.issue(Role::CloudPlatform, "cp-1");
    let server = start(&[&ca], &imposter, &[Role::CloudPlatform]).await;
    let c = client(&server, &[&ca], &cp, Role::Ttp);

    match c.get_json::<Value>("/whoami").await.unwrap_err() {
        Error::Tls { reason, peer } => {
            assert_eq!(reason, "server certificate of \"sc-pretending\" has role secure-component, expected ttp");
            assert!(peer.starts_with("localhost:"), "{peer}");
        }
        other => panic!("expected a TLS refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn client_refuses_server_of_another_ca() {
    let a = Ca::new("Cloud A CA");
    let rogue = Ca::new("Rogue CA");
    let fake_ttp = rogue.issue(Role::Ttp, "ttp-1");
    let sc = a.issue(Role::SecureComponent, "sc-1");
    let server = start(&[&a], &fake_ttp, &[Role::SecureComponent]).await;
    match client(&server, &[&a], &sc, Role::Ttp).get_json::<Value>("/whoami").await.unwrap_err() {
        Error::Tls { reason, .. } => {
            assert_eq!(reason, "certificate is not issued by a trusted CA")
        }
        other => panic!("expected a TLS refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn error_bodies_limits_and_bad_json() {
    let ca = Ca::new("Cloud A CA");
    let ttp = ca.issue(Role::Ttp, "ttp-1");
    let sc = ca.issue(Role::SecureComponent, "sc-1");
    let server = start(&[&ca], &ttp, &[Role::SecureComponent]).await;
    let c = client(&server, &[&ca], &sc, Role::Ttp);

    match c.get_json::<Value>("/refuse").await.unwrap_err() {
        Error::Api { status, code, message } => {
            assert_eq!((status, code.as_str()), (403, "not-in-acl"));
            assert_eq!(message, "vm-7 is not in the ACL of domain 3f2a, version 4");
        }
        other => panic!("{other:?}"),
    }
    match c.get_json::<Value>("/missing").await.unwrap_err() {
        Error::Api { status: 404, code, .. } => assert_eq!(code, "domain_unknown"),
        other => panic!("{other:?}"),
    }
    match c.get_json::<Value>("/plain-error").await.unwrap_err() {
        Error::Http { status: 502, body, .. } => assert_eq!(body, "upstream down"),
        other => panic!("{other:?}"),
    }
    match c.get_json::<Value>("/not-json").await.unwrap_err() {
        Error::Json { detail, .. } => assert!(detail.contains("expected"), "{detail}"),
        other => panic!("{other:?}"),
    }
    let v: Vec<u8> = c.get_json("/big").await.unwrap();
    assert_eq!(v.len(), 10_000);
    let small = c.clone().with_max_body(1000);
    match small.get_json::<Vec<u8>>("/big").await.unwrap_err() {
        Error::TooLarge { limit: 1000, .. } => {}
        other => panic!("{other:?}"),
    }
    // Unknown route: axum's plain 404.
    assert!(matches!(c.get_json::<Value>("/nope").await.unwrap_err(), Error::Http { status: 404, .. }));
}

#[tokio::test]
async fn failed_handshakes_do_not_stop_the_loop_and_shutdown_is_graceful() {
    let ca = Ca::new("Cloud A CA");
    let ttp = ca.issue(Role::Ttp, "ttp-1");
    let sc = ca.issue(Role::SecureComponent, "sc-1");
    let dm = ca.issue(Role::DomainManager, "dm-1");
    let mut server = start(&[&ca], &ttp, &[Role::SecureComponent]).await;

    // Garbage instead of TLS, then a refused certificate, then a good client.
    {
        use tokio::io::AsyncWriteExt;
        let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", server.port)).await.unwrap();
        raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let f = server.next_failure().await;
        assert!(!f.reason.is_empty());
    }
    let _ = client(&server, &[&ca], &dm, Role::Ttp).get_json::<Value>("/whoami").await.unwrap_err();
    server.next_failure().await;
    let good = client(&server, &[&ca], &sc, Role::Ttp);
    let id: Identity = good.get_json("/whoami").await.unwrap();
    assert_eq!(id.role, Role::SecureComponent);

    server.stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), server.task).await.unwrap().unwrap().unwrap();
    match good.get_json::<Value>("/whoami").await.unwrap_err() {
        Error::Connect { .. } => {}
        other => panic!("expected a connection error after shutdown, got {other:?}"),
    }
}

#[tokio::test]
async fn connection_refused_is_a_connect_error() {
    let ca = Ca::new("Cloud A CA");
    let sc = ca.issue(Role::SecureComponent, "sc-1");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let cfg = pki::client_config(std::slice::from_ref(&ca.cert), &[], &sc.cert_pem, &sc.key_pem, Role::Ttp).unwrap();
    let c = Client::new(&format!("https://localhost:{port}"), cfg).unwrap();
    match c.get_json::<Value>("/x").await.unwrap_err() {
        Error::Connect { reason, .. } => assert!(reason.contains("connection refused"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let cfg = pki::client_config(std::slice::from_ref(&ca.cert), &[], &sc.cert_pem, &sc.key_pem, Role::Ttp).unwrap();
    let e = Client::new("http://localhost:1", cfg).unwrap_err();
    assert!(e.to_string().contains("not https://"), "{e}");
}

#[tokio::test]
async fn tls_files_load_and_refuse_readable_keys() {
    let ca = Ca::new("Cloud A CA");
    let sc = ca.issue(Role::SecureComponent, "sc-1");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), &ca.cert).unwrap();
    std::fs::write(dir.path().join("sc-1.pem"), &sc.cert_pem).unwrap();
    let key = dir.path().join("sc-1-key.pem");
    std::fs::write(&key, sc.key_pem.as_bytes()).unwrap();
    let files = TlsFiles::in_dir(dir.path(), "sc-1");

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = files.load().unwrap_err();
    assert!(matches!(e, Error::KeyPermissions { mode: 0o644, .. }), "{e:?}");
    let text = e.to_string();
    assert!(text.contains("mode 0644") && text.contains("chmod 600"), "{text}");
    assert!(!text.contains("PRIVATE KEY"));

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let m = files.load().unwrap();
    assert!(!format!("{m:?}").contains("PRIVATE KEY"));
    assert_eq!(m.identity().unwrap(), Identity { name: "sc-1".into(), role: Role::SecureComponent });
    files.client_config(Role::Ttp).unwrap();
    files.server_config(&[Role::CloudPlatform]).unwrap();

    let missing = TlsFiles::in_dir(dir.path(), "nobody");
    let e = missing.load().unwrap_err().to_string();
    assert!(e.contains("nobody.pem") && e.contains("cannot open"), "{e}");
}

/// Writes `pem` as DIR/crl.pem the way the CA tools do: a temporary file renamed over it.
fn publish_crl(dir: &std::path::Path, pem: &str) {
    let tmp = dir.join(".crl.pem.tmp");
    std::fs::write(&tmp, pem).unwrap();
    std::fs::rename(&tmp, dir.join(net::CRL_FILE)).unwrap();
}

fn revoke(ca: &Ca, number: u64, revoked: &[&IssuedIdentity]) -> String {
    let entries: Vec<_> = revoked
        .iter()
        .map(|id| {
            CertificateAuthority::revocation_entry(&ca.cert, &id.cert_pem, pki::RevocationReason::KeyCompromise)
                .unwrap()
        })
        .collect();
    CertificateAuthority::sign_revocation_list(&ca.cert, &ca.key, number, &entries, 30).unwrap()
}

/// A directory laid out as `TlsFiles::in_dir(dir, name)` reads it: ca.pem, NAME.pem,
/// NAME-key.pem (0600) and an empty crl.pem (list number 1).
fn tls_dir(ca: &Ca, name: &str, identity: &IssuedIdentity) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), &ca.cert).unwrap();
    std::fs::write(dir.path().join(format!("{name}.pem")), &identity.cert_pem).unwrap();
    let key = dir.path().join(format!("{name}-key.pem"));
    std::fs::write(&key, identity.key_pem.as_bytes()).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    publish_crl(dir.path(), &revoke(ca, 1, &[]));
    dir
}

#[tokio::test]
async fn revoked_certificates_are_refused_and_a_new_list_applies_without_restart() {
    let ca = Ca::new("Cloud A CA");
    let ttp = ca.issue(Role::Ttp, "ttp-1");
    let sc1 = ca.issue(Role::SecureComponent, "sc-1");
    let sc2 = ca.issue(Role::SecureComponent, "sc-2");
    let dir = tls_dir(&ca, "ttp-1", &ttp);

    // The server is built from its files, as every Skydd service is, and watches them.
    let files = TlsFiles::in_dir(dir.path(), "ttp-1");
    assert_eq!(files.crl, vec![dir.path().join("crl.pem")]);
    let mut tls = files.server_tls(&[Role::SecureComponent]).unwrap();
    tls.reload.as_mut().unwrap().check_every = Duration::from_millis(100);
    let mut server = start_with(tls).await;
    let url = server.url();
    // A fresh client per call: every call is a new handshake.
    let whoami = |who: &IssuedIdentity| {
        let cfg =
            pki::client_config(std::slice::from_ref(&ca.cert), &[], &who.cert_pem, &who.key_pem, Role::Ttp).unwrap();
        let c = Client::new(&url, cfg).unwrap();
        async move { c.get_json::<Identity>("/whoami").await }
    };
    assert_eq!(whoami(&sc1).await.unwrap().name, "sc-1");

    // The CA revokes sc-1; the running server refuses it from the next handshake on.
    let listed = revoke(&ca, 2, &[&sc1]);
    publish_crl(dir.path(), &listed);
    let published = std::time::Instant::now();
    let e = loop {
        match whoami(&sc1).await {
            Ok(_) if published.elapsed() < Duration::from_secs(5) => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Ok(_) => panic!("sc-1 still accepted 5 s after its revocation was published"),
            Err(e) => break e,
        }
    };
    eprintln!("revocation applied after {:?}", published.elapsed());
    assert_refused(&e, "revoked");
    let failure = server.next_failure().await;
    assert_eq!(failure.reason, "certificate is revoked (listed in its CA's certificate revocation list)");
    assert_eq!(whoami(&sc2).await.unwrap().name, "sc-2", "only the listed certificate is refused");

    // A list that does not load (not a CRL) keeps the previous one in force.
    std::fs::write(dir.path().join("crl.pem"), "garbage").unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(whoami(&sc1).await.is_err(), "a broken list must not un-revoke");
    assert_eq!(whoami(&sc2).await.unwrap().name, "sc-2");

    // Clients check the server against their lists too.
    let cfg = pki::client_config(
        std::slice::from_ref(&ca.cert),
        &[revoke(&ca, 3, &[&ttp])],
        &sc2.cert_pem,
        &sc2.key_pem,
        Role::Ttp,
    )
    .unwrap();
    match Client::new(&url, cfg).unwrap().get_json::<Identity>("/whoami").await.unwrap_err() {
        Error::Tls { reason, .. } => assert!(reason.contains("certificate is revoked"), "{reason}"),
        other => panic!("expected the client to refuse the revoked server, got {other:?}"),
    }
    server.stop.cancel();
    server.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn with_a_list_configured_a_certificate_of_a_ca_without_one_is_refused() {
    let ca = Ca::new("Cloud A CA");
    let partner = Ca::new("Cloud B CA");
    let ttp = ca.issue(Role::Ttp, "ttp-1");
    let visitor = partner.issue(Role::SecureComponent, "sc-b");
    let cas = vec![ca.cert.clone(), partner.cert.clone()];
    let tls = Arc::new(
        pki::server_config(&cas, &[revoke(&ca, 1, &[])], &ttp.cert_pem, &ttp.key_pem, &[Role::SecureComponent])
            .unwrap(),
    );
    let mut server = start_with(tls).await;
    let cfg = pki::client_config(&cas, &[], &visitor.cert_pem, &visitor.key_pem, Role::Ttp).unwrap();
    let e = Client::new(&server.url(), cfg).unwrap().get_json::<Identity>("/whoami").await.unwrap_err();
    eprintln!("client saw: {e}");
    let failure = server.next_failure().await;
    assert!(failure.reason.contains("revocation status unknown"), "{}", failure.reason);
    server.stop.cancel();
    server.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_client_built_from_files_refuses_a_server_revoked_while_it_runs() {
    let ca = Ca::new("Cloud A CA");
    let ttp = ca.issue(Role::Ttp, "ttp-1");
    let cp = ca.issue(Role::CloudPlatform, "cloud-platform");
    let dir = tls_dir(&ca, "cloud-platform", &cp);
    let tls = Arc::new(
        pki::server_config(std::slice::from_ref(&ca.cert), &[], &ttp.cert_pem, &ttp.key_pem, &[Role::CloudPlatform])
            .unwrap(),
    );
    let server = start_with(tls).await;

    // One long-lived client, as the cloud platform keeps for the TTP: its pooled connection
    // was checked under the old list.
    let files = TlsFiles::in_dir(dir.path(), "cloud-platform");
    let client = Client::from_files(&server.url(), &files, Role::Ttp, Duration::from_secs(5)).unwrap();
    assert_eq!(client.get_json::<Identity>("/whoami").await.unwrap().name, "cloud-platform");

    publish_crl(dir.path(), &revoke(&ca, 2, &[&ttp]));
    let published = std::time::Instant::now();
    let e = loop {
        match client.get_json::<Identity>("/whoami").await {
            Ok(_) if published.elapsed() < net::client::TLS_FILES_CHECK_EVERY * 3 => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Ok(_) => {
                panic!("the client still talks to the revoked server {:?} after its revocation", published.elapsed())
            }
            Err(e) => break e,
        }
    };
    eprintln!("the client refused the revoked server {:?} after the list was published", published.elapsed());
    match e {
        Error::Tls { reason, .. } => assert!(reason.contains("certificate is revoked"), "{reason}"),
        other => panic!("expected a TLS refusal of the revoked server, got {other:?}"),
    }
    // A list that does not load keeps the previous one (the server stays refused).
    std::fs::write(dir.path().join("crl.pem"), "garbage").unwrap();
    tokio::time::sleep(net::client::TLS_FILES_CHECK_EVERY + Duration::from_millis(200)).await;
    assert!(client.get_json::<Identity>("/whoami").await.is_err(), "a broken list must not un-revoke");
    server.stop.cancel();
    server.task.await.unwrap().unwrap();
}

/// A client given two replicas' URLs, the first of which is down, fails over to the second
/// and stays there.
#[tokio::test]
async fn a_client_fails_over_to_the_next_replica() {
    let ca = Ca::new("Cloud A CA");
    let ttp = ca.issue(Role::Ttp, "ttp-1");
    let sc = ca.issue(Role::SecureComponent, "sc-host-1");
    let server = start(&[&ca], &ttp, &[Role::SecureComponent]).await;
    let down = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("https://localhost:{}", l.local_addr().unwrap().port())
    };
    let cfg = pki::client_config(std::slice::from_ref(&ca.cert), &[], &sc.cert_pem, &sc.key_pem, Role::Ttp).unwrap();
    let c = Client::new(&format!("{down}, {}", server.url()), cfg).unwrap();
    let v: Value = c.post_json("/echo", &json!({"a": 1})).await.unwrap();
    assert_eq!(v, json!({"echo": {"a": 1}}));
    assert_eq!(c.base_url(), server.url());
    let id: Identity = c.get_json("/whoami").await.unwrap();
    assert_eq!(id.name, "sc-host-1");
}
