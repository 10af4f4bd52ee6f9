//! The attack matrix (issue 7, item 1): the parties are built to distrust each other, and
//! each attack below goes through a PUBLIC interface of the all-in-one cloud (the HTTPS APIs
//! of the TTP, the cloud platform (CP) and the secure components (SC), the volume files the
//! CP stores, TLS itself) and asserts the refusal, its specific code, and — where the TTP
//! decides — the TTP's audit record of it.
//!
//! | id  | attacker        | attack                                                                  | refused with |
//! |-----|-----------------|-------------------------------------------------------------------------|--------------|
//! | C1  | cloud platform  | edits the ACL in a volume header (adds a VM), keeps the owner signature  | `descriptor_signature_invalid` (audited) |
//! | C2  | cloud platform  | replays the old header after a revoke                                   | `version_rollback` (audited) |
//! | C3  | cloud platform  | swaps the whole header of domain B into domain A's volume               | `grant_mismatch` (audited) |
//! | C4  | cloud platform  | splices domain B's registration under domain A's descriptor             | `registration_mismatch` (audited) |
//! | C5  | cloud platform  | forges a registration with its own key                                  | `registration_mismatch` (audited) |
//! | C6  | cloud platform  | bumps the version of an owner-signed descriptor and registers it        | `descriptor_signature_invalid` (audited) |
//! | C7  | cloud platform  | re-uses the owner's grant for vm-a to attach vm-b                       | `grant_mismatch` (audited) |
//! | C12 | cloud platform  | replays a grant it forwarded once, after the owner detached the VM      | `grant_replayed` (audited) |
//! | C13 | anyone with a TTP-role certificate | signs a registration (its own r) for a domain | `registration_mismatch` (audited) |
//! | C11 | cloud platform  | points the SC at another file (a host file; domain B's volume) with A's header | `bad_request` (SC; no key released) |
//! | C8  | compute host B  | forwards an attach: asks for a key claiming host A's id                 | `forbidden` (audited) |
//! | C9  | compute host B  | sends host A's quote over its own challenge                             | `quote_invalid` (audited) |
//! | C10 | compute host B  | uses a challenge issued to host A                                       | `challenge_invalid` (audited) |
//! | H1  | compute host    | replays an old quote with a fresh challenge id                          | `challenge_invalid` (audited) |
//! | H2  | compute host    | PCRs changed after enrollment (an unapproved module)                    | `pcr_mismatch` (audited) |
//! | H3  | compute host    | enrolls with another host's binding key                                 | `binding_key_invalid` (audited) |
//! | H4  | compute host    | enrolls a software RSA key (openssl) marshalled as TPMT_PUBLIC          | `binding_key_invalid` (audited) |
//! | H5  | compute host    | enrolls with a Certify signed by another TPM's AK                       | `binding_key_invalid` (audited) |
//! | H6  | compute host    | replays a Certify from an earlier enrollment                            | `challenge_invalid` (audited) |
//! | H7  | compute host    | presents another TPM's EK public beside its EK certificate              | `ek_mismatch` (audited) |
//! | H8  | compute host    | enrolls under another host's name                                       | `forbidden` (audited) |
//! | H9  | compute host    | enrolls a binding key bound to untrusted PCR values                     | `binding_policy_untrusted` (audited) |
//! | H10 | unenrolled host | asks for a key release                                                  | `host_unknown` (audited) |
//! | H11 | stolen host TLS key | a second genuine TPM (same vendor CA) enrolls as an enrolled host   | `ek_pinned` (audited, names both EKs) |
//! | H12 | compute host    | enrolls an EK already enrolled under another host id                    | `ek_in_use` (audited) |
//! | H13 | operator        | replaces a host's TPM (`ttp host replace`), then the new TPM enrolls     | `ok`, once (audited `host_replace`; the enrollment names old and new EK) |
//! | H14 | operator / host | a resettable PCR (16, 23) in the policy or in an enrollment's selection | `pcr_resettable` (TTP refuses to start; enrollment audited) |
//! | H15 | compute host    | a replaced secure-component binary (measured start-up)                  | `binding_policy_untrusted` at enrollment; `pcr_mismatch` at release, and the TPM refuses to decrypt |
//! | D1  | domain manager  | attaches another owner's domain through the CP                          | `forbidden` (CP; never reaches the TTP) |
//! | D2  | domain manager  | changes the ACL of a domain only shared with it                         | `owner_mismatch` (CP) |
//! | D3  | domain manager  | deletes a domain only shared with it, through the CP                    | `owner_mismatch` (CP) |
//! | D4  | domain manager  | deletes another owner's domain directly at the TTP                      | `owner_mismatch` (audited) |
//! | D5  | domain manager  | creates a domain naming another owner, through the CP                   | `owner_mismatch` (CP) |
//! | D6  | domain manager  | signs a descriptor naming another owner, registered directly            | `descriptor_signature_invalid` (audited) |
//! | D7  | domain manager  | grants a mount of a domain it does not manage                           | `grant_signer_not_authorized` (audited) |
//! | D8  | domain manager  | signs a grant that names another issuer                                 | `grant_signature_invalid` (audited) |
//! | D9  | domain manager  | reads another owner's viewing history                                   | `forbidden` |
//! | D10 | domain manager  | calls the TTP's key release with its certificate                        | `forbidden` (audited) |
//! | D11 | domain manager  | creates a domain with an existing domain's id                           | `domain_exists` (CP) |
//! | T1  | anyone          | TLS without a client certificate (TTP, CP, SC)                          | `net::Error::Tls` + server HandshakeFailure "no client certificate presented" |
//! | T2  | anyone          | TLS with a certificate of a foreign CA                                  | `net::Error::Tls` + HandshakeFailure "not issued by a trusted CA" |
//! | T3  | anyone          | TLS with an expired certificate (of a trusted partner CA)               | `net::Error::Tls` + HandshakeFailure "expired" |
//! | T4  | anyone          | a descriptor signed with an expired certificate                         | `descriptor_signature_invalid` (audited) |
//! | T5  | anyone          | a grant signed with a foreign-CA certificate of the owner's name         | `grant_signature_invalid` (audited) |
//! | T6  | domain manager  | calls a secure component (wrong role for that server)                   | `net::Error::Tls` (role refused) |
//! | T7  | anyone          | TLS 1.2 only (OpenSSL client)                                           | handshake refused (protocol version) |
//! | T8  | TTP impostor    | a CP certificate answering where the TTP is expected                    | `net::Error::Tls` (server role refused by the client) |
//! | T9  | domain manager  | TLS with a certificate the CA revoked while the cloud runs (TTP, CP)     | `net::Error::Tls` + "certificate is revoked" (after one 2 s file watch: 1.6–2.1 s seen) |
//! | T10 | domain manager  | a mount grant signed before its signer's certificate was revoked         | `grant_signature_invalid` "certificate is revoked" (audited) |
//! | B1  | anyone          | bodies over every limit (2 MiB + 1 KiB) on every route of TTP, CP, SC    | 413 `bad_request` JSON on every body route |
//! | B2  | anyone          | malformed JSON on every route                                           | 400 `bad_request` JSON on every body route |
//! | B3  | anyone          | JSON of the wrong shape on every route                                  | 422 `bad_request` JSON on every body route |
//! | B4  | anyone          | a non-JSON content type on every route                                  | 415 `bad_request` JSON on every body route |
//! | B5  | anyone          | a JSON nesting bomb (100k '[') on every route                           | 422 `bad_request` JSON (serde's recursion limit), no crash |
//! | B6  | anyone          | path traversal in ids (`../../etc/passwd`)                              | 404 `domain_unknown` / 400 `bad_request` |
//! | I2  | domain manager  | re-registers another tenant's VM on another host (POST /v1/instances)    | `forbidden` (CP; placement is the operator's) |
//! | I3  | domain manager  | a second rw attach of a domain, or a ro one beside a rw one              | `single_writer` (CP, 409) |
//! | I4  | domain manager  | declares more than its quota of volume bytes (8 x 1 TiB sparse, then one more) | `quota_exceeded` (CP, 403) |
//! | I5  | domain manager  | a grant valid beyond i64::MAX (its used mark would be purged at once)    | `grant_too_long` (audited) |
//! | I6  | operator/tenant | VM ids `..`, `.`, `-x`                                                   | `bad_request` at placement; no key released |
//! | I8  | domain manager  | lists every tenant's hosts/instances; reads a refusal naming an owner    | `forbidden`; the owner is not named |
//! | P1  | compute host B  | asks for vm-a's key with the CP's placement of vm-a on host A            | `placement_mismatch` (audited) |
//! | P2  | domain manager  | signs a placement of a VM on a host itself                              | `placement_invalid` (audited) |
//! | P3  | compute host    | a CP placement made for another grant                                   | `placement_mismatch` (audited) |
//! | P4  | compute host    | a CP placement older than 300 s                                         | `placement_invalid` (audited) |
//!
//! The TTP and the SC limit bodies to 1 MiB, the CP to 2 MiB; B1 exceeds both.
//! Routes without a request body ignore a body (they answer as without one, never 5xx,
//! never hang); that is checked for every such route in B1–B5 too.
//!
//! Revocation is by the cloud CA's revocation list (`crl.pem`, docs/PKI.md "Revocation"),
//! which every party of the lab checks (T9, T10); there is no OCSP.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use net::{Role, TlsFiles};
use protocol::attest::{CredentialChallenge, EnrollmentProof, EnrollmentRequest, PcrSelection};
use protocol::cloud::{
    Attachment, CreateAttachmentRequest, CreateDomainRequest, DeleteDomainBody, DomainView, Instance, InstanceList,
    UpdateDomainRequest,
};
use protocol::domain::{AccessMode, AclEntry, Descriptor};
use protocol::format;
use protocol::messages::{
    AuditRecord, ChallengeResponse, DeleteDomainRequest, HeaderRecord, HistoryResponse, KeyReleaseRequest,
    KeyReleaseResponse, RegisterDomainRequest, RegisterDomainResponse, Registration,
};
use protocol::signing::{SignatureContext, SignatureKey, SignedEnvelope};
use skydd::cloud::{AllInOne, DEMO_LAYOUT};
use skydd::lab::{DomainManager, LabHost, LabPki, Operator, RunningTtp};
use skydd_ca::{CertificateAuthority, Validity};
use tokio_util::sync::CancellationToken;

// ---- the summary ---------------------------------------------------------------------------

#[derive(Default)]
struct Matrix {
    rows: Vec<(String, String, String, String)>,
}

impl Matrix {
    fn record(&mut self, id: &str, attack: &str, code: &str, audit: &str) {
        println!("ATTACK {id:<4} {attack:<78} -> {code:<30} audit: {audit}");
        self.rows.push((id.into(), attack.into(), code.into(), audit.into()));
    }
}

// ---- helpers: refusals and the audit log -------------------------------------------------------

/// The (status, code, message) of an API refusal.
fn refusal<T: std::fmt::Debug>(result: Result<T, net::Error>) -> (u16, String, String) {
    match result {
        Err(net::Error::Api { status, code, message }) => (status, code, message),
        other => panic!("expected an API refusal, got {other:?}"),
    }
}

fn expect_code<T: std::fmt::Debug>(result: Result<T, net::Error>, code: &str) -> String {
    let (status, got, message) = refusal(result);
    assert_eq!(got, code, "HTTP {status}: {message}");
    assert!((400..500).contains(&status), "a refusal is a 4xx, got {status} {got}: {message}");
    assert!(!message.is_empty(), "{code} without a message");
    message
}

fn audit_records(ttp: &ttp::service::Ttp) -> Vec<AuditRecord> {
    ttp.store().audit_records(None).expect("read the audit log")
}

/// The newest audit record is the refusal just seen, of `event`; returns it.
fn assert_audited(ttp: &ttp::service::Ttp, before: usize, event: &str, code: &str) -> AuditRecord {
    assert_audited_n(ttp, before, 1, event, code)
}

/// As [`assert_audited`], when the attack added `added` records (e.g. an accepted first
/// enrollment step before the refused second one).
fn assert_audited_n(ttp: &ttp::service::Ttp, before: usize, added: usize, event: &str, code: &str) -> AuditRecord {
    let records = audit_records(ttp);
    assert_eq!(records.len(), before + added, "{added} audit record(s) for the attack; newest: {:?}", records.last());
    let last = records.last().unwrap().clone();
    assert_eq!((last.event.as_str(), last.outcome.as_str()), (event, code), "newest audit record: {last:?}");
    assert_eq!(last.hash, last.compute_hash(), "the record is in the chain");
    last
}

fn audit_text(record: &AuditRecord) -> String {
    format!("#{} {} {}", record.seq, record.event, record.outcome)
}

/// A TLS refusal seen by the client (`Tls`), or the close that a refused handshake can turn
/// into when the kernel resets the connection before the alert is read.
fn expect_tls_refusal<T: std::fmt::Debug>(result: Result<T, net::Error>) -> String {
    match result {
        Err(net::Error::Tls { reason, .. }) => reason,
        Err(net::Error::Connect { reason, .. }) if reason.contains("closed the connection") => {
            format!("connection closed: {reason}")
        }
        // hyper reports a connection the server closed right after refusing the handshake as
        // "connection was not ready" when the close wins the race with the alert (seen in CI).
        Err(net::Error::Request { detail, .. })
            if detail.contains("connection was not ready") || detail.contains("connection closed") =>
        {
            format!("connection closed during the handshake: {detail}")
        }
        other => panic!("expected a TLS refusal, got {other:?}"),
    }
}

// ---- helpers: identities -----------------------------------------------------------------------

/// A signer from certificate files already in the lab's PKI directory (not re-issued).
fn signer(pki: &LabPki, name: &str) -> DomainManager {
    let material = TlsFiles::in_dir(&pki.dir, name).load().unwrap();
    let der = protocol::pki::certs_from_pem(&material.cert_pem, "certificate").unwrap()[0].to_vec();
    DomainManager { name: name.into(), key: SignatureKey::from_pem(&material.key_pem, der).unwrap() }
}

fn signer_from_pems(name: &str, cert_pem: &str, key_pem: &str) -> DomainManager {
    let der = protocol::pki::certs_from_pem(cert_pem, "certificate").unwrap()[0].to_vec();
    DomainManager { name: name.into(), key: SignatureKey::from_pem(key_pem, der).unwrap() }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// An end-entity certificate that expired yesterday, issued by `ca` with the Skydd role
/// extension (made with OpenSSL: the lab's issuer only makes valid certificates).
fn expired_certificate(ca_cert_pem: &str, ca_key_pem: &str, role: Role, name: &str) -> (String, String) {
    use openssl::asn1::{Asn1Object, Asn1OctetString, Asn1Time};
    use openssl::bn::BigNum;
    use openssl::ec::{EcGroup, EcKey};
    use openssl::hash::MessageDigest;
    use openssl::nid::Nid;
    use openssl::pkey::PKey;
    use openssl::x509::extension::{BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName};
    use openssl::x509::{X509Builder, X509Extension, X509NameBuilder, X509};

    let ca = X509::from_pem(ca_cert_pem.as_bytes()).unwrap();
    let ca_key = PKey::private_key_from_pem(ca_key_pem.as_bytes()).unwrap();
    let key =
        PKey::from_ec_key(EcKey::generate(&EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap()).unwrap()).unwrap();
    let mut subject = X509NameBuilder::new().unwrap();
    subject.append_entry_by_nid(Nid::COMMONNAME, name).unwrap();
    let subject = subject.build();
    let mut b = X509Builder::new().unwrap();
    b.set_version(2).unwrap();
    b.set_serial_number(&BigNum::from_u32(rand::random::<u32>() >> 1).unwrap().to_asn1_integer().unwrap()).unwrap();
    b.set_subject_name(&subject).unwrap();
    b.set_issuer_name(ca.subject_name()).unwrap();
    b.set_pubkey(&key).unwrap();
    let now = now_unix() as i64;
    b.set_not_before(&Asn1Time::from_unix(now - 2 * 86_400).unwrap()).unwrap();
    b.set_not_after(&Asn1Time::from_unix(now - 86_400).unwrap()).unwrap();
    b.append_extension(BasicConstraints::new().critical().build().unwrap()).unwrap();
    b.append_extension(KeyUsage::new().critical().digital_signature().build().unwrap()).unwrap();
    b.append_extension(ExtendedKeyUsage::new().client_auth().server_auth().build().unwrap()).unwrap();
    let san =
        SubjectAlternativeName::new().dns(name).ip("127.0.0.1").build(&b.x509v3_context(Some(&ca), None)).unwrap();
    b.append_extension(san).unwrap();
    let oid = Asn1Object::from_str(
        &protocol::pki::ROLE_EXTENSION_OID.iter().map(|c| c.to_string()).collect::<Vec<_>>().join("."),
    )
    .unwrap();
    let value = Asn1OctetString::new_from_bytes(&protocol::pki::encode_role_extension(role)).unwrap();
    b.append_extension(X509Extension::new_from_der(&oid, false, &value).unwrap()).unwrap();
    b.sign(&ca_key, MessageDigest::sha256()).unwrap();
    let cert = String::from_utf8(b.build().to_pem().unwrap()).unwrap();
    (cert, String::from_utf8(key.private_key_to_pem_pkcs8().unwrap()).unwrap())
}

fn client_with(ca_pems: &[String], cert_pem: &str, key_pem: &str, server_role: Role, url: &str) -> net::Client {
    let tls = protocol::pki::client_config(ca_pems, &[], cert_pem, key_pem, server_role).unwrap();
    net::Client::with_timeout(url, tls, Duration::from_secs(20)).unwrap()
}

// ---- helpers: raw HTTPS with OpenSSL (bodies serde cannot produce) ----------------------------

struct RawAnswer {
    status: u16,
    body: Vec<u8>,
}

#[derive(Clone)]
struct RawTarget {
    addr: String,
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn connector(target: &RawTarget, max_tls12: bool) -> openssl::ssl::SslConnector {
    use openssl::ssl::{SslConnector, SslFiletype, SslMethod, SslVersion};
    let mut b = SslConnector::builder(SslMethod::tls_client()).unwrap();
    b.set_ca_file(&target.ca).unwrap();
    b.set_certificate_chain_file(&target.cert).unwrap();
    b.set_private_key_file(&target.key, SslFiletype::PEM).unwrap();
    if max_tls12 {
        b.set_max_proto_version(Some(SslVersion::TLS1_2)).unwrap();
    }
    b.build()
}

/// One HTTP/1.1 request over TLS (OpenSSL, our certificate), written while the answer is
/// read, so an early answer (413 before the whole body is sent) is not lost.
fn raw_request(
    target: &RawTarget,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<RawAnswer, String> {
    use openssl::ssl::ErrorCode;
    let tcp = std::net::TcpStream::connect(&target.addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut stream = connector(target, false).connect("127.0.0.1", tcp).map_err(|e| format!("handshake: {e}"))?;
    stream.get_ref().set_nonblocking(true).unwrap();
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/json\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    if let Some(ct) = content_type {
        request.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    request.push_str("\r\n");
    let mut out = request.into_bytes();
    out.extend_from_slice(body);
    let (mut written, mut answer) = (0usize, Vec::new());
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut progressed = false;
        if written < out.len() {
            let end = (written + 16 * 1024).min(out.len());
            match stream.ssl_write(&out[written..end]) {
                Ok(n) => {
                    written += n;
                    progressed = true;
                }
                Err(e) if e.code() == ErrorCode::WANT_READ || e.code() == ErrorCode::WANT_WRITE => {}
                Err(_) => written = out.len(), // the server stopped reading: read its answer
            }
        }
        match stream.ssl_read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                answer.extend_from_slice(&buf[..n]);
                progressed = true;
                if response_complete(&answer) {
                    break;
                }
            }
            Err(e) if e.code() == ErrorCode::ZERO_RETURN => break,
            Err(e) if e.code() == ErrorCode::WANT_READ || e.code() == ErrorCode::WANT_WRITE => {}
            Err(e) => {
                if answer.is_empty() {
                    return Err(format!("read: {e}"));
                }
                break;
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "no complete answer within 30 s (wrote {written} of {} bytes, read {} bytes)",
                out.len(),
                answer.len()
            ));
        }
        if !progressed {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    parse_response(&answer)
}

fn split_head(answer: &[u8]) -> Option<(String, usize)> {
    let end = answer.windows(4).position(|w| w == b"\r\n\r\n")?;
    Some((String::from_utf8_lossy(&answer[..end]).to_ascii_lowercase(), end + 4))
}

fn content_length(head: &str) -> Option<usize> {
    head.lines().find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
}

fn response_complete(answer: &[u8]) -> bool {
    let Some((head, start)) = split_head(answer) else { return false };
    if let Some(len) = content_length(&head) {
        return answer.len() >= start + len;
    }
    head.contains("transfer-encoding: chunked") && answer.ends_with(b"0\r\n\r\n")
}

fn parse_response(answer: &[u8]) -> Result<RawAnswer, String> {
    let (head, start) = split_head(answer).ok_or_else(|| format!("no HTTP head in {} bytes", answer.len()))?;
    let status: u16 = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or("no status")?;
    let mut body = answer[start..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        let mut plain = Vec::new();
        let mut rest = &body[..];
        while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
            let size = usize::from_str_radix(String::from_utf8_lossy(&rest[..eol]).trim(), 16).unwrap_or(0);
            if size == 0 {
                break;
            }
            plain.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
            rest = &rest[eol + 2 + size + 2..];
        }
        body = plain;
    }
    Ok(RawAnswer { status, body })
}

fn error_code_of(answer: &RawAnswer) -> String {
    let value: serde_json::Value = serde_json::from_slice(&answer.body).unwrap_or_else(|e| {
        panic!(
            "HTTP {} answer is not a JSON error body ({e}): {:?}",
            answer.status,
            String::from_utf8_lossy(&answer.body)
        )
    });
    let code = value["code"].as_str().unwrap_or_else(|| panic!("no code in {value}")).to_string();
    assert!(value["message"].as_str().is_some_and(|m| !m.is_empty()), "no message in {value}");
    code
}

// ---- helpers: domains and volumes ---------------------------------------------------------------

async fn create_domain(
    cp: &net::Client,
    owner: &DomainManager,
    acl: &[(&str, AccessMode)],
) -> (Descriptor, DomainView) {
    let descriptor = owner.new_domain(&[("department", "cardiology")], acl).unwrap();
    let view: DomainView = cp
        .post_json(
            "/v1/domains",
            &CreateDomainRequest { descriptor: owner.sign_descriptor(&descriptor).unwrap(), size_bytes: 16 << 20 },
        )
        .await
        .expect("create a domain");
    (descriptor, view)
}

async fn update_domain(cp: &net::Client, owner: &DomainManager, next: &Descriptor) -> DomainView {
    cp.put_json(
        &format!("/v1/domains/{}/descriptor", next.domain_id),
        &UpdateDomainRequest { descriptor: owner.sign_descriptor(next).unwrap() },
    )
    .await
    .expect("update the domain")
}

async fn attach(
    cp: &net::Client,
    domain_id: &str,
    vm: &str,
    mode: AccessMode,
    grant: SignedEnvelope,
) -> Result<Attachment, net::Error> {
    cp.post_json(
        "/v1/attachments",
        &CreateAttachmentRequest { domain_id: domain_id.into(), instance_id: vm.into(), mode, grant },
    )
    .await
}

fn volume_path(cloud: &AllInOne, domain_id: &str) -> PathBuf {
    cloud.dir.join("cloud-platform").join("volumes").join(format!("{domain_id}.vol"))
}

/// What a malicious cloud platform does with the files it stores: writes `record` as the
/// newest header slot of the volume (next sequence number, valid checksum).
fn plant_header(path: &Path, record: &HeaderRecord) {
    let file = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut area = vec![0u8; format::HEADER_AREA_SIZE];
    file.read_exact_at(&mut area, 0).unwrap();
    let active = format::decode_header_area(&area).unwrap();
    let (slot, seq) = format::next_slot_for_update(Some(&active)).unwrap();
    file.write_all_at(&format::encode_slot(seq, &record.encode()).unwrap(), format::slot_offset(slot)).unwrap();
    file.sync_all().unwrap();
}

/// A key-release request built by hand by a compute host's identity.
async fn quote_for(host: &skydd::cloud::ComputeNode, nonce: &[u8]) -> protocol::attest::QuoteEvidence {
    let nonce = nonce.to_vec();
    host.service.attested_host().tpm.run(move |tpm| tpm.quote(&nonce)).await.unwrap()
}

#[allow(clippy::too_many_arguments)]
fn release_request(
    operator: &Operator,
    host_id: &str,
    vm: &str,
    mode: AccessMode,
    header: &HeaderRecord,
    grant: &SignedEnvelope,
    challenge: &ChallengeResponse,
    quote: protocol::attest::QuoteEvidence,
) -> KeyReleaseRequest {
    KeyReleaseRequest {
        host_id: host_id.into(),
        vm_id: vm.into(),
        mode,
        header: header.clone(),
        grant: grant.clone(),
        // The placement the CP would have made for this VM on this host: the attacks below
        // fail on something else (or, for P1-P4, on a placement replaced afterwards).
        placement: operator.place(vm, host_id, grant),
        challenge_id: challenge.challenge_id.clone(),
        quote,
    }
}

fn enroll_code<T: std::fmt::Debug>(result: Result<T, secure_component::Error>) -> String {
    match result {
        Err(secure_component::Error::TtpRefused { code, .. }) => code,
        other => panic!("expected a TTP refusal, got {other:?}"),
    }
}

// ---- the matrix ------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_matrix() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let cloud = AllInOne::start(dir.path(), &DEMO_LAYOUT, &mut |line| println!(".. {line}"))
        .await
        .expect("start the all-in-one cloud");
    let pki = &cloud.pki;
    let ttp = cloud.ttp.service.clone();
    let mut m = Matrix::default();

    let alice = signer(pki, "dm-alice");
    let bob = signer(pki, "dm-bob");
    let alice_cp = pki.client("dm-alice", Role::CloudPlatform, &cloud.cp_url).unwrap();
    let bob_cp = pki.client("dm-bob", Role::CloudPlatform, &cloud.cp_url).unwrap();
    let bob_ttp = pki.client("dm-bob", Role::Ttp, &cloud.ttp.url).unwrap();
    let cp_ttp = pki.client("cloud-platform", Role::Ttp, &cloud.ttp.url).unwrap();
    // The all-in-one CP's own certificate: the placements it signs for each attach.
    let op = Operator::of(pki, "cloud-platform").unwrap();
    let compute1 = &cloud.hosts[0];
    let compute2 = &cloud.hosts[1];
    assert_eq!((compute1.id.as_str(), compute2.id.as_str()), ("compute-1", "compute-2"));
    let c1_ttp = pki.client("compute-1", Role::Ttp, &cloud.ttp.url).unwrap();
    let c2_ttp = pki.client("compute-2", Role::Ttp, &cloud.ttp.url).unwrap();

    // Domain A: vm-a rw, vm-b ro (alice). Domain B: vm-a rw (alice).
    let (desc_a, view_a) =
        create_domain(&alice_cp, &alice, &[("vm-a", AccessMode::Rw), ("vm-b", AccessMode::Ro)]).await;
    let (desc_b, view_b) = create_domain(&alice_cp, &alice, &[("vm-a", AccessMode::Rw)]).await;
    let (id_a, id_b) = (desc_a.domain_id.clone(), desc_b.domain_id.clone());
    let path_a = volume_path(&cloud, &id_a);
    assert!(path_a.exists(), "{}", path_a.display());

    // ================= a malicious cloud platform ==========================================
    {
        // C1: the ACL edited in the header (vm-c added), the owner's signature kept.
        let mut edited = desc_a.clone();
        edited.acl.push(AclEntry { vm_id: "vm-c".into(), mode: AccessMode::Rw });
        let mut header = view_a.header.clone();
        header.descriptor.message = edited.encode().unwrap();
        plant_header(&path_a, &header);
        let before = audit_records(&ttp).len();
        let message = expect_code(
            attach(&alice_cp, &id_a, "vm-c", AccessMode::Rw, alice.grant(&id_a, "vm-c", AccessMode::Rw, 300)).await,
            "descriptor_signature_invalid",
        );
        let audit = assert_audited(&ttp, before, "key_release", "descriptor_signature_invalid");
        assert_eq!(audit.domain_id.as_deref(), Some(id_a.as_str()));
        println!("   {message}");
        m.record(
            "C1",
            "CP edits the ACL in the header (adds vm-c rw), keeps the owner's signature",
            "descriptor_signature_invalid",
            &audit_text(&audit),
        );
        plant_header(&path_a, &view_a.header); // the honest header back in force
    }
    {
        // C4: domain B's registration spliced under domain A's descriptor.
        let mut spliced = view_a.header.clone();
        spliced.registration = view_b.header.registration.clone();
        plant_header(&path_a, &spliced);
        let before = audit_records(&ttp).len();
        expect_code(
            attach(&alice_cp, &id_a, "vm-a", AccessMode::Rw, alice.grant(&id_a, "vm-a", AccessMode::Rw, 300)).await,
            "registration_mismatch",
        );
        let audit = assert_audited(&ttp, before, "key_release", "registration_mismatch");
        m.record(
            "C4",
            "CP splices domain B's registration under domain A's descriptor",
            "registration_mismatch",
            &audit_text(&audit),
        );
    }
    {
        // C5: a registration the CP signs itself (claiming any r it likes).
        let cp_signer = signer(pki, "cloud-platform");
        let mut forged = Registration::decode(&view_a.header.registration.message).unwrap();
        forged.nonce_r = [0x42; 32];
        let mut header = view_a.header.clone();
        header.registration = cp_signer.key.sign_envelope(SignatureContext::Registration, forged.encode());
        plant_header(&path_a, &header);
        let before = audit_records(&ttp).len();
        let message = expect_code(
            attach(&alice_cp, &id_a, "vm-a", AccessMode::Rw, alice.grant(&id_a, "vm-a", AccessMode::Rw, 300)).await,
            "registration_mismatch",
        );
        assert!(message.contains("cloud-platform"), "{message}");
        let audit = assert_audited(&ttp, before, "key_release", "registration_mismatch");
        m.record(
            "C5",
            "CP forges the registration (its own r) and signs it with its own key",
            "registration_mismatch",
            &audit_text(&audit),
        );
    }
    {
        // C13 (issue 21): a registration signed by another certificate with the TTP role from
        // the cloud's own CA (a second TTP identity, e.g. a decommissioned or test TTP). It
        // carries r, so accepting it would let its holder re-key or shred the domain.
        pki.issue(Role::Ttp, "ttp-2").unwrap();
        let other_ttp = signer(pki, "ttp-2");
        let mut forged = Registration::decode(&view_a.header.registration.message).unwrap();
        forged.nonce_r = [0x43; 32];
        let mut header = view_a.header.clone();
        header.registration = other_ttp.key.sign_envelope(SignatureContext::Registration, forged.encode());
        plant_header(&path_a, &header);
        let before = audit_records(&ttp).len();
        let message = expect_code(
            attach(&alice_cp, &id_a, "vm-a", AccessMode::Rw, alice.grant(&id_a, "vm-a", AccessMode::Rw, 300)).await,
            "registration_mismatch",
        );
        assert!(
            message.contains("ttp-2") && message.contains("neither this TTP nor a configured replica"),
            "{message}"
        );
        let audit = assert_audited(&ttp, before, "key_release", "registration_mismatch");
        m.record(
            "C13",
            "a registration signed by another TTP-role certificate (ttp-2, same CA)",
            "registration_mismatch",
            &audit_text(&audit),
        );
        plant_header(&path_a, &view_a.header);
    }
    {
        // C3: domain B's whole (valid) header in domain A's volume; vm-a is in both ACLs.
        plant_header(&path_a, &view_b.header);
        let before = audit_records(&ttp).len();
        let message = expect_code(
            attach(&alice_cp, &id_a, "vm-a", AccessMode::Rw, alice.grant(&id_a, "vm-a", AccessMode::Rw, 300)).await,
            "grant_mismatch",
        );
        assert!(message.contains(&id_a) && message.contains(&id_b), "{message}");
        let audit = assert_audited(&ttp, before, "key_release", "grant_mismatch");
        m.record(
            "C3",
            "CP swaps domain B's valid header into domain A's volume (vm-a in both ACLs)",
            "grant_mismatch",
            &audit_text(&audit),
        );
        plant_header(&path_a, &view_a.header);
    }
    {
        // C7: the owner's grant for vm-a used for vm-b (in the ACL, ro).
        let before = audit_records(&ttp).len();
        expect_code(
            attach(&alice_cp, &id_a, "vm-b", AccessMode::Ro, alice.grant(&id_a, "vm-a", AccessMode::Rw, 300)).await,
            "grant_mismatch",
        );
        let audit = assert_audited(&ttp, before, "key_release", "grant_mismatch");
        assert_eq!(audit.vm_id.as_deref(), Some("vm-b"));
        m.record("C7", "CP re-uses the owner's grant for vm-a to attach vm-b", "grant_mismatch", &audit_text(&audit));
    }
    {
        // C12: a grant the CP forwarded once, kept and replayed after the owner detached the VM.
        let grant = alice.grant(&id_a, "vm-a", AccessMode::Rw, 300);
        let attached = attach(&alice_cp, &id_a, "vm-a", AccessMode::Rw, grant.clone())
            .await
            .expect("the owner's attach with a fresh grant");
        let detached: Attachment =
            alice_cp.delete_json(&format!("/v1/attachments/{}", attached.id)).await.expect("the owner detaches");
        assert_eq!(detached.status, "detached");
        let before = audit_records(&ttp).len();
        let message = expect_code(attach(&alice_cp, &id_a, "vm-a", AccessMode::Rw, grant).await, "grant_replayed");
        assert!(message.contains("used for a key release before"), "{message}");
        let audit = assert_audited(&ttp, before, "key_release", "grant_replayed");
        m.record(
            "C12",
            "CP replays a grant it forwarded once, after the owner detached the VM",
            "grant_replayed",
            &audit_text(&audit),
        );
    }
    {
        // C6: the CP bumps the version of the owner-signed descriptor and registers it itself.
        let mut bumped = desc_a.clone();
        bumped.version = 2;
        bumped.acl.push(AclEntry { vm_id: "vm-c".into(), mode: AccessMode::Rw });
        let envelope = SignedEnvelope { message: bumped.encode().unwrap(), ..view_a.header.descriptor.clone() };
        let before = audit_records(&ttp).len();
        let request = RegisterDomainRequest {
            descriptor: envelope,
            previous_registration: Some(view_a.header.registration.clone()),
        };
        expect_code(
            cp_ttp.post_json::<_, RegisterDomainResponse>("/v1/domains", &request).await,
            "descriptor_signature_invalid",
        );
        let audit = assert_audited(&ttp, before, "register", "descriptor_signature_invalid");
        m.record(
            "C6",
            "CP bumps the version of an owner-signed descriptor and registers it at the TTP",
            "descriptor_signature_invalid",
            &audit_text(&audit),
        );
    }
    {
        // C2: revoke vm-b (version 2), then the CP puts version 1 back in force.
        let v2 = desc_a.next_version(|d| d.acl.retain(|e| e.vm_id != "vm-b")).unwrap();
        let view_v2 = update_domain(&alice_cp, &alice, &v2).await;
        assert_eq!(view_v2.version, 2);
        plant_header(&path_a, &view_a.header);
        let before = audit_records(&ttp).len();
        let message = expect_code(
            attach(&alice_cp, &id_a, "vm-b", AccessMode::Ro, alice.grant(&id_a, "vm-b", AccessMode::Ro, 300)).await,
            "version_rollback",
        );
        assert!(message.contains("version 2"), "{message}");
        let audit = assert_audited(&ttp, before, "key_release", "version_rollback");
        m.record(
            "C2",
            "CP replays the old header (vm-b still in the ACL) after the owner revoked vm-b",
            "version_rollback",
            &audit_text(&audit),
        );
        plant_header(&path_a, &view_v2.header);
    }
    let view_a: DomainView = alice_cp.get_json(&format!("/v1/domains/{id_a}")).await.unwrap();
    assert_eq!(view_a.version, 2);
    let header_a = view_a.header.clone();
    let grant_a = alice.grant(&id_a, "vm-a", AccessMode::Rw, 300);

    {
        // C11: the CP sends a valid attach (the header in force on domain A's volume, the
        // owner's grant) but points the secure component at another file on the host.
        let decoy = cloud.dir.join("host-file.img");
        let pattern: Vec<u8> = (0..(format::DATA_OFFSET as usize + (4 << 20))).map(|i| (i % 251) as u8).collect();
        std::fs::write(&decoy, &pattern).unwrap();
        let cp_sc = pki.client("cloud-platform", Role::SecureComponent, &compute1.agent_url).unwrap();
        let before = audit_records(&ttp).len();
        let request = protocol::cloud::AgentAttachRequest {
            attachment_id: "attack-c11".into(),
            vm_id: "vm-a".into(),
            mode: AccessMode::Rw,
            header: header_a.clone(),
            grant: alice.grant(&id_a, "vm-a", AccessMode::Rw, 300),
            placement: op.place("vm-a", "compute-1", &grant_a),
            volume_path: decoy.to_string_lossy().into_owned(),
        };
        let result = cp_sc.post_json::<_, protocol::cloud::AgentAttachment>("/v1/attachments", &request).await;
        if result.is_ok() {
            let _ = cp_sc.delete_json::<serde_json::Value>("/v1/attachments/attack-c11").await;
        }
        let after = std::fs::read(&decoy).unwrap();
        assert!(
            after == pattern,
            "the secure component wrote to a host file the CP pointed it at ({:?})",
            result.as_ref().map(|a| &a.device)
        );
        let message = expect_code(result, "bad_request");
        assert!(message.contains("host-file.img"), "{message}");
        assert_eq!(audit_records(&ttp).len(), before, "no key is released for a volume that does not hold the header");
        // The same with domain B's volume (a Skydd volume, another domain's header).
        let request = protocol::cloud::AgentAttachRequest {
            volume_path: volume_path(&cloud, &id_b).to_string_lossy().into_owned(),
            ..request
        };
        expect_code(
            cp_sc.post_json::<_, protocol::cloud::AgentAttachment>("/v1/attachments", &request).await,
            "bad_request",
        );
        assert_eq!(audit_records(&ttp).len(), before);
        m.record(
            "C11",
            "CP points the SC at another file (a host file, domain B's volume) with A's header",
            "bad_request",
            "- (refused by the SC before any key release)",
        );
    }

    // ================= compute hosts at the TTP ===============================================
    {
        // C8: compute-2 asks for a key claiming to be compute-1 (an attach forwarded to it).
        let challenge: ChallengeResponse = c2_ttp.post_json("/v1/challenges", &()).await.unwrap();
        let quote = quote_for(compute2, &challenge.nonce).await;
        let before = audit_records(&ttp).len();
        let request = release_request(&op, "compute-1", "vm-a", AccessMode::Rw, &header_a, &grant_a, &challenge, quote);
        expect_code(c2_ttp.post_json::<_, KeyReleaseResponse>("/v1/key-releases", &request).await, "forbidden");
        let audit = assert_audited(&ttp, before, "key_release", "forbidden");
        assert_eq!(audit.actor, "compute-2");
        m.record(
            "C8",
            "attach forwarded to host B, which asks as host A (TLS id != host_id)",
            "forbidden",
            &audit_text(&audit),
        );
    }
    {
        // C9: compute-2 sends compute-1's quote over compute-2's own challenge.
        let challenge: ChallengeResponse = c2_ttp.post_json("/v1/challenges", &()).await.unwrap();
        let quote = quote_for(compute1, &challenge.nonce).await;
        let before = audit_records(&ttp).len();
        let request = release_request(&op, "compute-2", "vm-a", AccessMode::Rw, &header_a, &grant_a, &challenge, quote);
        expect_code(c2_ttp.post_json::<_, KeyReleaseResponse>("/v1/key-releases", &request).await, "quote_invalid");
        let audit = assert_audited(&ttp, before, "key_release", "quote_invalid");
        m.record(
            "C9",
            "host B sends host A's quote (A's AK) over B's own challenge",
            "quote_invalid",
            &audit_text(&audit),
        );
    }
    {
        // C10: compute-2 uses a challenge issued to compute-1 (with compute-1's quote).
        let challenge: ChallengeResponse = c1_ttp.post_json("/v1/challenges", &()).await.unwrap();
        let quote = quote_for(compute1, &challenge.nonce).await;
        let before = audit_records(&ttp).len();
        let request = release_request(&op, "compute-2", "vm-a", AccessMode::Rw, &header_a, &grant_a, &challenge, quote);
        let message = expect_code(
            c2_ttp.post_json::<_, KeyReleaseResponse>("/v1/key-releases", &request).await,
            "challenge_invalid",
        );
        assert!(message.contains("compute-1"), "{message}");
        let audit = assert_audited(&ttp, before, "key_release", "challenge_invalid");
        m.record(
            "C10",
            "host B uses a challenge (and quote) issued to host A",
            "challenge_invalid",
            &audit_text(&audit),
        );
    }
    {
        // H1: an old quote (over an earlier nonce) with a fresh challenge id.
        let old: ChallengeResponse = c1_ttp.post_json("/v1/challenges", &()).await.unwrap();
        let old_quote = quote_for(compute1, &old.nonce).await;
        let fresh: ChallengeResponse = c1_ttp.post_json("/v1/challenges", &()).await.unwrap();
        let before = audit_records(&ttp).len();
        let request = release_request(&op, "compute-1", "vm-a", AccessMode::Rw, &header_a, &grant_a, &fresh, old_quote);
        expect_code(c1_ttp.post_json::<_, KeyReleaseResponse>("/v1/key-releases", &request).await, "challenge_invalid");
        let audit = assert_audited(&ttp, before, "key_release", "challenge_invalid");
        m.record("H1", "host replays an old quote with a fresh challenge id", "challenge_invalid", &audit_text(&audit));
    }
    {
        // H10: a secure-component certificate of a host that never enrolled.
        pki.issue(Role::SecureComponent, "host-ghost").unwrap();
        let ghost = pki.client("host-ghost", Role::Ttp, &cloud.ttp.url).unwrap();
        expect_code(ghost.post_json::<_, ChallengeResponse>("/v1/challenges", &()).await, "host_unknown");
        let borrowed: ChallengeResponse = c1_ttp.post_json("/v1/challenges", &()).await.unwrap();
        let quote = quote_for(compute1, &borrowed.nonce).await;
        let before = audit_records(&ttp).len();
        let request = release_request(&op, "host-ghost", "vm-a", AccessMode::Rw, &header_a, &grant_a, &borrowed, quote);
        expect_code(ghost.post_json::<_, KeyReleaseResponse>("/v1/key-releases", &request).await, "host_unknown");
        let audit = assert_audited(&ttp, before, "key_release", "host_unknown");
        m.record(
            "H10",
            "an unenrolled host (valid SC certificate) asks for a challenge and a key",
            "host_unknown",
            &audit_text(&audit),
        );
    }
    {
        // P1 (was observation O1): compute-2, attested and enrolled, asks for vm-a's key with
        // the placement the CP made for vm-a on compute-1 (an attach it intercepted).
        let challenge: ChallengeResponse = c2_ttp.post_json("/v1/challenges", &()).await.unwrap();
        let quote = quote_for(compute2, &challenge.nonce).await;
        let before = audit_records(&ttp).len();
        let mut request =
            release_request(&op, "compute-2", "vm-a", AccessMode::Rw, &header_a, &grant_a, &challenge, quote);
        request.placement = op.place("vm-a", "compute-1", &grant_a);
        let message = expect_code(
            c2_ttp.post_json::<_, KeyReleaseResponse>("/v1/key-releases", &request).await,
            "placement_mismatch",
        );
        assert!(message.contains("compute-1") && message.contains("compute-2"), "{message}");
        let audit = assert_audited(&ttp, before, "key_release", "placement_mismatch");
        assert_eq!((audit.host_id.as_deref(), audit.vm_id.as_deref()), (Some("compute-2"), Some("vm-a")));
        m.record(
            "P1",
            "host B asks for vm-a's key with the CP's placement of vm-a on host A",
            "placement_mismatch",
            &audit_text(&audit),
        );
    }
    {
        // P2: a tenant signs the placement itself (dm-bob places vm-a on compute-2).
        let challenge: ChallengeResponse = c2_ttp.post_json("/v1/challenges", &()).await.unwrap();
        let quote = quote_for(compute2, &challenge.nonce).await;
        let before = audit_records(&ttp).len();
        let mut request =
            release_request(&op, "compute-2", "vm-a", AccessMode::Rw, &header_a, &grant_a, &challenge, quote);
        let tenant = Operator::of(pki, "dm-bob").unwrap();
        request.placement = tenant.place("vm-a", "compute-2", &grant_a);
        let message = expect_code(
            c2_ttp.post_json::<_, KeyReleaseResponse>("/v1/key-releases", &request).await,
            "placement_invalid",
        );
        assert!(message.contains("dm-bob") && message.contains("cloud-platform"), "{message}");
        let audit = assert_audited(&ttp, before, "key_release", "placement_invalid");
        m.record(
            "P2",
            "a tenant (dm-bob) signs a placement of vm-a on host B",
            "placement_invalid",
            &audit_text(&audit),
        );
    }
    {
        // P3: the CP's placement of vm-a on compute-1, made for another grant.
        let challenge: ChallengeResponse = c1_ttp.post_json("/v1/challenges", &()).await.unwrap();
        let quote = quote_for(compute1, &challenge.nonce).await;
        let before = audit_records(&ttp).len();
        let mut request =
            release_request(&op, "compute-1", "vm-a", AccessMode::Rw, &header_a, &grant_a, &challenge, quote);
        let other_grant = alice.grant(&id_b, "vm-a", AccessMode::Rw, 300);
        request.placement = op.place("vm-a", "compute-1", &other_grant);
        let message = expect_code(
            c1_ttp.post_json::<_, KeyReleaseResponse>("/v1/key-releases", &request).await,
            "placement_mismatch",
        );
        assert!(message.contains("another grant"), "{message}");
        let audit = assert_audited(&ttp, before, "key_release", "placement_mismatch");
        m.record("P3", "a placement made for another grant", "placement_mismatch", &audit_text(&audit));
    }
    {
        // P4: a placement held back past its age limit (the VM may have moved since).
        let challenge: ChallengeResponse = c1_ttp.post_json("/v1/challenges", &()).await.unwrap();
        let quote = quote_for(compute1, &challenge.nonce).await;
        let before = audit_records(&ttp).len();
        let mut request =
            release_request(&op, "compute-1", "vm-a", AccessMode::Rw, &header_a, &grant_a, &challenge, quote);
        let stale = now_unix() - protocol::messages::MAX_PLACEMENT_AGE_SECS - 60;
        request.placement = op.place_at("vm-a", "compute-1", &grant_a, stale);
        let message = expect_code(
            c1_ttp.post_json::<_, KeyReleaseResponse>("/v1/key-releases", &request).await,
            "placement_invalid",
        );
        assert!(message.contains("s old"), "{message}");
        let audit = assert_audited(&ttp, before, "key_release", "placement_invalid");
        m.record("P4", "a placement older than 300 s", "placement_invalid", &audit_text(&audit));
    }

    // ================= domain managers ==========================================================
    {
        // D1: bob attaches alice's domain (not shared with him).
        let before = audit_records(&ttp).len();
        let message = expect_code(
            attach(&bob_cp, &id_a, "vm-a", AccessMode::Rw, bob.grant(&id_a, "vm-a", AccessMode::Rw, 300)).await,
            "forbidden",
        );
        assert!(message.contains("dm-bob"), "{message}");
        assert_eq!(audit_records(&ttp).len(), before, "the CP refuses before the TTP is asked");
        m.record("D1", "dm-bob attaches dm-alice's domain through the CP", "forbidden", "- (refused by the CP)");
    }
    {
        // D9: bob reads alice's viewing history at the TTP.
        expect_code(bob_ttp.get_json::<HistoryResponse>(&format!("/v1/domains/{id_a}/history")).await, "forbidden");
        m.record("D9", "dm-bob reads dm-alice's viewing history at the TTP", "forbidden", "- (reads are not audited)");
    }
    {
        // D7: bob grants a mount of alice's domain; the CP is bypassed (compute-1 asks directly).
        let challenge: ChallengeResponse = c1_ttp.post_json("/v1/challenges", &()).await.unwrap();
        let quote = quote_for(compute1, &challenge.nonce).await;
        let before = audit_records(&ttp).len();
        let request = release_request(
            &op,
            "compute-1",
            "vm-a",
            AccessMode::Rw,
            &header_a,
            &bob.grant(&id_a, "vm-a", AccessMode::Rw, 300),
            &challenge,
            quote,
        );
        expect_code(
            c1_ttp.post_json::<_, KeyReleaseResponse>("/v1/key-releases", &request).await,
            "grant_signer_not_authorized",
        );
        let audit = assert_audited(&ttp, before, "key_release", "grant_signer_not_authorized");
        m.record(
            "D7",
            "dm-bob signs a mount grant for dm-alice's domain",
            "grant_signer_not_authorized",
            &audit_text(&audit),
        );
    }
    {
        // D8: bob signs a grant that names alice as its issuer.
        let grant = protocol::messages::MountGrant {
            domain_id: id_a.clone(),
            vm_id: "vm-a".into(),
            mode: AccessMode::Rw,
            expires_at: now_unix() + 300,
            nonce: rand::random(),
            issuer: "dm-alice".into(),
        };
        let forged = bob.key.sign_envelope(SignatureContext::MountGrant, grant.encode());
        let challenge: ChallengeResponse = c1_ttp.post_json("/v1/challenges", &()).await.unwrap();
        let quote = quote_for(compute1, &challenge.nonce).await;
        let before = audit_records(&ttp).len();
        let request = release_request(&op, "compute-1", "vm-a", AccessMode::Rw, &header_a, &forged, &challenge, quote);
        expect_code(
            c1_ttp.post_json::<_, KeyReleaseResponse>("/v1/key-releases", &request).await,
            "grant_signature_invalid",
        );
        let audit = assert_audited(&ttp, before, "key_release", "grant_signature_invalid");
        m.record(
            "D8",
            "dm-bob signs a grant naming dm-alice as the issuer",
            "grant_signature_invalid",
            &audit_text(&audit),
        );
    }
    {
        // D10: a domain-manager certificate at the key-release endpoint.
        let challenge: ChallengeResponse = c1_ttp.post_json("/v1/challenges", &()).await.unwrap();
        let quote = quote_for(compute1, &challenge.nonce).await;
        let before = audit_records(&ttp).len();
        let request = release_request(&op, "dm-bob", "vm-a", AccessMode::Rw, &header_a, &grant_a, &challenge, quote);
        expect_code(bob_ttp.post_json::<_, KeyReleaseResponse>("/v1/key-releases", &request).await, "forbidden");
        let audit = assert_audited(&ttp, before, "key_release", "forbidden");
        m.record(
            "D10",
            "dm-bob calls the TTP's key release with his domain-manager certificate",
            "forbidden",
            &audit_text(&audit),
        );
    }
    {
        // D5: bob creates a domain naming alice as its owner, through the CP.
        let descriptor = alice.new_domain(&[], &[("vm-a", AccessMode::Rw)]).unwrap();
        let before = audit_records(&ttp).len();
        let request = CreateDomainRequest {
            descriptor: bob.key.sign_envelope(SignatureContext::Descriptor, descriptor.encode().unwrap()),
            size_bytes: 1 << 20,
        };
        expect_code(bob_cp.post_json::<_, DomainView>("/v1/domains", &request).await, "owner_mismatch");
        assert_eq!(audit_records(&ttp).len(), before);
        m.record(
            "D5",
            "dm-bob creates a domain naming dm-alice as owner, through the CP",
            "owner_mismatch",
            "- (refused by the CP)",
        );
        // D6: the same descriptor registered directly at the TTP by a CP identity.
        let register = RegisterDomainRequest { descriptor: request.descriptor.clone(), previous_registration: None };
        expect_code(
            cp_ttp.post_json::<_, RegisterDomainResponse>("/v1/domains", &register).await,
            "descriptor_signature_invalid",
        );
        let audit = assert_audited(&ttp, before, "register", "descriptor_signature_invalid");
        m.record(
            "D6",
            "a descriptor naming dm-alice but signed by dm-bob, registered directly",
            "descriptor_signature_invalid",
            &audit_text(&audit),
        );
    }
    {
        // D11: bob creates a domain with the id of alice's domain.
        let mut squat = bob.new_domain(&[], &[("vm-b", AccessMode::Rw)]).unwrap();
        squat.domain_id = id_b.clone();
        let request = CreateDomainRequest { descriptor: bob.sign_descriptor(&squat).unwrap(), size_bytes: 1 << 20 };
        expect_code(bob_cp.post_json::<_, DomainView>("/v1/domains", &request).await, "domain_exists");
        m.record(
            "D11",
            "dm-bob creates a domain with the id of dm-alice's domain B",
            "domain_exists",
            "- (refused by the CP)",
        );
    }
    {
        // Domain B is shared with bob: he may see and attach it, not change or delete it.
        let shared = desc_b.next_version(|d| d.shared_with.push("dm-bob".into())).unwrap();
        update_domain(&alice_cp, &alice, &shared).await;
        let _: DomainView = bob_cp.get_json(&format!("/v1/domains/{id_b}")).await.expect("shared with bob");
        // D2: bob adds his VM to the ACL.
        let grab =
            shared.next_version(|d| d.acl.push(AclEntry { vm_id: "vm-c".into(), mode: AccessMode::Rw })).unwrap();
        let before = audit_records(&ttp).len();
        let result = bob_cp
            .put_json::<_, DomainView>(
                &format!("/v1/domains/{id_b}/descriptor"),
                &UpdateDomainRequest {
                    descriptor: bob.key.sign_envelope(SignatureContext::Descriptor, grab.encode().unwrap()),
                },
            )
            .await;
        let message = expect_code(result, "owner_mismatch");
        assert!(message.contains("dm-alice") && message.contains("dm-bob"), "{message}");
        assert_eq!(audit_records(&ttp).len(), before);
        m.record(
            "D2",
            "dm-bob (shared manager) changes the ACL of dm-alice's domain",
            "owner_mismatch",
            "- (refused by the CP)",
        );
        // D3: bob deletes it through the CP.
        let result = bob_cp.request_json_delete(&id_b, &bob).await;
        expect_code(result, "owner_mismatch");
        assert_eq!(audit_records(&ttp).len(), before);
        m.record(
            "D3",
            "dm-bob (shared manager) deletes dm-alice's domain through the CP",
            "owner_mismatch",
            "- (refused by the CP)",
        );
        // D4: bob's signed deletion sent straight to the TTP.
        let result = bob_ttp
            .post_json::<_, serde_json::Value>(
                &format!("/v1/domains/{id_b}/delete"),
                &DeleteDomainRequest { deletion: bob.deletion(&id_b) },
            )
            .await;
        let message = expect_code(result, "owner_mismatch");
        assert!(message.contains("dm-alice"), "{message}");
        let audit = assert_audited(&ttp, before, "delete", "owner_mismatch");
        m.record("D4", "dm-bob deletes dm-alice's domain directly at the TTP", "owner_mismatch", &audit_text(&audit));
        let _: DomainView = alice_cp.get_json(&format!("/v1/domains/{id_b}")).await.expect("domain B survives");
    }

    // Checkpoint: the viewing history of domain A holds every refusal made against it.
    {
        let alice_ttp = pki.client("dm-alice", Role::Ttp, &cloud.ttp.url).unwrap();
        let history: HistoryResponse =
            alice_ttp.get_json(&format!("/v1/domains/{id_a}/history")).await.expect("alice reads her history");
        let outcomes: Vec<&str> = history.records.iter().map(|r| r.outcome.as_str()).collect();
        for code in [
            "descriptor_signature_invalid",
            "registration_mismatch",
            "grant_mismatch",
            "version_rollback",
            "forbidden",
            "quote_invalid",
            "challenge_invalid",
            "host_unknown",
            "grant_signer_not_authorized",
            "grant_signature_invalid",
        ] {
            assert!(outcomes.contains(&code), "the history of domain A lacks {code}: {outcomes:?}");
        }
        ttp.verify_audit_chain().expect("the audit chain verifies");
        println!("   history of domain A: {} records, chain verified", history.records.len());
    }

    // ================= compute hosts at enrollment (two extra TPMs of the trusted vendor) =========
    let extra = cloud.dir.join("extra");
    let vendor_ca = cloud.dir.join("tpm-vendor-ca");
    let host_x = LabHost::start(&extra, pki, "host-x", &vendor_ca, &cloud.ttp.url).expect("start host-x (swtpm)");
    let host_y = LabHost::start(&extra, pki, "host-y", &vendor_ca, &cloud.ttp.url).expect("start host-y (swtpm)");
    let selection = PcrSelection::default_host();
    let request_of = |host: &LabHost, name: &'static str| {
        let (tpm, selection) = (host.agent.tpm.clone(), selection.clone());
        async move { tpm.run(move |t| t.enrollment_request(name, &selection)).await.unwrap() }
    };
    let rx: EnrollmentRequest = request_of(&host_x, "host-x").await;
    let ry: EnrollmentRequest = request_of(&host_y, "host-y").await;
    async fn begin(host: &LabHost, request: &EnrollmentRequest) -> CredentialChallenge {
        host.agent.ttp.post_json("/v1/enrollments", request).await.expect("the first enrollment step is accepted")
    }
    async fn proof_of(host: &LabHost, challenge: &CredentialChallenge) -> EnrollmentProof {
        let challenge = challenge.clone();
        host.agent.tpm.run(move |t| t.enrollment_proof(&challenge)).await.unwrap()
    }
    {
        // H3: host-x's EK and AK, host-y's binding key.
        let mut forged = rx.clone();
        forged.binding_public = ry.binding_public.clone();
        let before = audit_records(&ttp).len();
        let challenge = begin(&host_x, &forged).await;
        let proof = proof_of(&host_x, &challenge).await;
        let message = expect_code(
            host_x.agent.ttp.post_json::<_, serde_json::Value>("/v1/enrollments/proof", &proof).await,
            "binding_key_invalid",
        );
        assert!(message.contains("certified object"), "{message}");
        let audit = assert_audited_n(&ttp, before, 2, "enroll", "binding_key_invalid");
        m.record(
            "H3",
            "host-x enrolls with host-y's binding key (its own AK certifies its own key)",
            "binding_key_invalid",
            &audit_text(&audit),
        );
    }
    {
        // H4: a software RSA-2048 key (OpenSSL) in the TPM key's TPMT_PUBLIC (same attributes
        // and policy, modulus replaced): the AK can only certify the key that is in its TPM.
        let rsa = openssl::rsa::Rsa::generate(2048).unwrap();
        let mut software = rx.binding_public.clone();
        let n = software.len();
        assert_eq!(&software[n - 258..n - 256], &[1, 0], "TPMT_PUBLIC ends with unique = TPM2B of a 256-byte modulus");
        software[n - 256..].copy_from_slice(&rsa.n().to_vec_padded(256).unwrap());
        let mut forged = rx.clone();
        forged.binding_public = software;
        let before = audit_records(&ttp).len();
        let challenge = begin(&host_x, &forged).await;
        let proof = proof_of(&host_x, &challenge).await;
        let message = expect_code(
            host_x.agent.ttp.post_json::<_, serde_json::Value>("/v1/enrollments/proof", &proof).await,
            "binding_key_invalid",
        );
        assert!(message.contains("certified object"), "{message}");
        let audit = assert_audited_n(&ttp, before, 2, "enroll", "binding_key_invalid");
        m.record(
            "H4",
            "host enrolls a software RSA key (openssl) marshalled as TPMT_PUBLIC",
            "binding_key_invalid",
            &audit_text(&audit),
        );
    }
    {
        // H5: the credential activated in host-x's TPM, the Certify made by host-y's AK.
        let before = audit_records(&ttp).len();
        let challenge = begin(&host_x, &rx).await;
        let for_x = challenge.clone();
        let secret = host_x.agent.tpm.run(move |t| t.activate_credential(&for_x)).await.unwrap();
        let nonce = challenge.certify_nonce.clone();
        let (certify_attest, certify_signature) =
            host_y.agent.tpm.run(move |t| t.certify_binding_key(&nonce)).await.unwrap();
        let proof = EnrollmentProof {
            enrollment_id: challenge.enrollment_id.clone(),
            activated_secret: secret.expose().to_vec(),
            certify_attest,
            certify_signature,
        };
        expect_code(
            host_x.agent.ttp.post_json::<_, serde_json::Value>("/v1/enrollments/proof", &proof).await,
            "binding_key_invalid",
        );
        let audit = assert_audited_n(&ttp, before, 2, "enroll", "binding_key_invalid");
        m.record(
            "H5",
            "host enrolls with a Certify of the binding key signed by another TPM's AK",
            "binding_key_invalid",
            &audit_text(&audit),
        );
    }
    {
        // H6: the Certify of an earlier enrollment (another certify nonce) replayed.
        let before = audit_records(&ttp).len();
        let first = begin(&host_x, &rx).await;
        let second = begin(&host_x, &rx).await;
        let old = proof_of(&host_x, &first).await;
        let for_x = second.clone();
        let secret = host_x.agent.tpm.run(move |t| t.activate_credential(&for_x)).await.unwrap();
        let proof = EnrollmentProof {
            enrollment_id: second.enrollment_id.clone(),
            activated_secret: secret.expose().to_vec(),
            ..old
        };
        let message = expect_code(
            host_x.agent.ttp.post_json::<_, serde_json::Value>("/v1/enrollments/proof", &proof).await,
            "challenge_invalid",
        );
        assert!(message.contains("replayed"), "{message}");
        let audit = assert_audited_n(&ttp, before, 3, "enroll", "challenge_invalid");
        m.record("H6", "host replays the Certify of an earlier enrollment", "challenge_invalid", &audit_text(&audit));
    }
    {
        // H7: host-x's EK certificate beside host-y's EK public.
        let mut forged = rx.clone();
        forged.ek_public = ry.ek_public.clone();
        let before = audit_records(&ttp).len();
        expect_code(
            host_x.agent.ttp.post_json::<_, CredentialChallenge>("/v1/enrollments", &forged).await,
            "ek_mismatch",
        );
        let audit = assert_audited(&ttp, before, "enroll_begin", "ek_mismatch");
        m.record(
            "H7",
            "host presents another TPM's EK public beside its EK certificate",
            "ek_mismatch",
            &audit_text(&audit),
        );
    }
    {
        // H8: host-x enrolls host-y's TPM under host-y's name.
        let before = audit_records(&ttp).len();
        expect_code(host_x.agent.ttp.post_json::<_, CredentialChallenge>("/v1/enrollments", &ry).await, "forbidden");
        let audit = assert_audited(&ttp, before, "enroll_begin", "forbidden");
        assert_eq!(audit.actor, "host-x");
        m.record("H8", "host-x enrolls under host-y's name", "forbidden", &audit_text(&audit));
    }
    {
        // H9: host-x boots an unapproved module, then enrolls: its binding key's PolicyPCR
        // is over values no reference state allows.
        host_x.agent.tpm.run(|t| t.extend_pcr(11, b"unapproved kernel module")).await.unwrap();
        let before = audit_records(&ttp).len();
        assert_eq!(enroll_code(host_x.agent.enroll(&selection).await), "binding_policy_untrusted");
        let audit = assert_audited_n(&ttp, before, 2, "enroll", "binding_policy_untrusted");
        m.record(
            "H9",
            "host enrolls a binding key bound to untrusted PCR values",
            "binding_policy_untrusted",
            &audit_text(&audit),
        );
    }
    drop((host_x, host_y));

    // H2: compute-2's PCRs change after enrollment; an attach through the CP is refused.
    {
        let (desc_c, _) = create_domain(&alice_cp, &alice, &[("vm-b", AccessMode::Rw)]).await;
        compute2.service.attested_host().tpm.run(|t| t.extend_pcr(11, b"unapproved kernel module")).await.unwrap();
        let before = audit_records(&ttp).len();
        let message = expect_code(
            attach(
                &alice_cp,
                &desc_c.domain_id,
                "vm-b",
                AccessMode::Rw,
                alice.grant(&desc_c.domain_id, "vm-b", AccessMode::Rw, 300),
            )
            .await,
            "pcr_mismatch",
        );
        assert!(message.contains("PCR 11"), "{message}");
        let audit = assert_audited(&ttp, before, "key_release", "pcr_mismatch");
        assert_eq!(audit.host_id.as_deref(), Some("compute-2"));
        m.record(
            "H2",
            "compute-2's PCR 11 (measured state) changes after enrollment; attach via the CP",
            "pcr_mismatch",
            &audit_text(&audit),
        );
    }

    // ================= TLS and certificates ==========================================================
    // A federated TTP replica: the same TTP identity, trusting the lab CA and a partner CA
    // (whose key we hold, to make an expired certificate), with its handshake failures observed.
    let (partner_ca_pem, partner_ca_key) = CertificateAuthority::generate("partner-ca").unwrap();
    let partner_ca_file = extra.join("partner-ca.pem");
    std::fs::write(&partner_ca_file, &partner_ca_pem).unwrap();
    let lab_ca_pem = pki.ca_pem().to_string();
    let partner_dir = extra.join("partner-ttp");
    ttp::config::create_master_key(&partner_dir).unwrap();
    let ttp_files = TlsFiles::in_dir(&pki.dir, "ttp-1");
    let partner_config = ttp::config::TtpConfig {
        listen: "127.0.0.1:0".into(),
        data_dir: partner_dir.clone(),
        ca: vec![pki.dir.join("ca.pem"), partner_ca_file.clone()],
        crl: Vec::new(),
        cert: ttp_files.cert.clone(),
        key: ttp_files.key.clone(),
        attestation: cloud.dir.join("attestation.toml"),
        registration_replicas: Vec::new(),
    };
    let (partner, partner_tls) = ttp::server::build(&partner_config).expect("build the partner TTP");
    let partner_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let partner_url = format!("https://127.0.0.1:{}", partner_listener.local_addr().unwrap().port());
    let (failures_tx, mut failures) = tokio::sync::mpsc::unbounded_channel::<net::HandshakeFailure>();
    let partner_stop = CancellationToken::new();
    let partner_task = tokio::spawn(net::serve_with(
        partner_listener,
        partner_tls,
        ttp::http::router(partner.clone()),
        net::ServeOptions { failures: Some(failures_tx), ..Default::default() },
        partner_stop.clone(),
    ));
    {
        // T1: no client certificate, at the partner TTP (observed) and at the TTP, CP and SC.
        let bare = |role: Role, url: &str| {
            net::Client::with_timeout(
                url,
                protocol::pki::client_config_without_certificate(std::slice::from_ref(&lab_ca_pem), &[], role).unwrap(),
                Duration::from_secs(20),
            )
            .unwrap()
        };
        let reason = expect_tls_refusal(
            bare(Role::Ttp, &partner_url).post_json::<_, ChallengeResponse>("/v1/challenges", &()).await,
        );
        let failure = next_failure(&mut failures).await;
        assert_eq!(failure.reason, "no client certificate presented");
        assert!(failure.peer.ip().is_loopback());
        expect_tls_refusal(
            bare(Role::Ttp, &cloud.ttp.url).post_json::<_, ChallengeResponse>("/v1/challenges", &()).await,
        );
        expect_tls_refusal(bare(Role::CloudPlatform, &cloud.cp_url).get_json::<serde_json::Value>("/v1/domains").await);
        expect_tls_refusal(
            bare(Role::SecureComponent, &compute1.agent_url).get_json::<serde_json::Value>("/v1/attachments").await,
        );
        m.record(
            "T1",
            "TLS without a client certificate (TTP, CP, SC)",
            "net::Error::Tls",
            &format!("server: {}; client: {reason}", failure.reason),
        );
    }
    {
        // T2: a certificate named dm-alice from a foreign CA.
        let (rogue_ca, rogue_key) = CertificateAuthority::generate("rogue-ca").unwrap();
        let rogue_alice =
            CertificateAuthority::issue(&rogue_ca, &rogue_key, Role::DomainManager, "dm-alice", Validity::Days(30))
                .unwrap();
        let reason = expect_tls_refusal(
            client_with(
                std::slice::from_ref(&lab_ca_pem),
                &rogue_alice.cert_pem,
                &rogue_alice.key_pem,
                Role::Ttp,
                &partner_url,
            )
            .get_json::<HistoryResponse>(&format!("/v1/domains/{id_a}/history"))
            .await,
        );
        let failure = next_failure(&mut failures).await;
        assert!(failure.reason.contains("not issued by a trusted CA"), "{}", failure.reason);
        expect_tls_refusal(
            client_with(
                std::slice::from_ref(&lab_ca_pem),
                &rogue_alice.cert_pem,
                &rogue_alice.key_pem,
                Role::CloudPlatform,
                &cloud.cp_url,
            )
            .get_json::<DomainView>(&format!("/v1/domains/{id_a}"))
            .await,
        );
        m.record(
            "T2",
            "TLS with a foreign-CA certificate named dm-alice (partner TTP, CP)",
            "net::Error::Tls",
            &format!("server: {}; client: {reason}", failure.reason),
        );

        // T5: a grant signed with that certificate (the name is right, the CA is not).
        let rogue_signer = signer_from_pems("dm-alice", &rogue_alice.cert_pem, &rogue_alice.key_pem);
        let challenge: ChallengeResponse = c1_ttp.post_json("/v1/challenges", &()).await.unwrap();
        let quote = quote_for(compute1, &challenge.nonce).await;
        let before = audit_records(&ttp).len();
        let request = release_request(
            &op,
            "compute-1",
            "vm-a",
            AccessMode::Rw,
            &header_a,
            &rogue_signer.grant(&id_a, "vm-a", AccessMode::Rw, 300),
            &challenge,
            quote,
        );
        let message = expect_code(
            c1_ttp.post_json::<_, KeyReleaseResponse>("/v1/key-releases", &request).await,
            "grant_signature_invalid",
        );
        assert!(message.contains("not issued by a trusted CA"), "{message}");
        let audit = assert_audited(&ttp, before, "key_release", "grant_signature_invalid");
        m.record(
            "T5",
            "a mount grant signed with a foreign-CA certificate named dm-alice",
            "grant_signature_invalid",
            &audit_text(&audit),
        );
    }
    {
        // T3: an expired certificate of the trusted partner CA, on TLS.
        let (expired_cert, expired_key) =
            expired_certificate(&partner_ca_pem, &partner_ca_key, Role::DomainManager, "dm-carol");
        let trust = [lab_ca_pem.clone()];
        let reason = expect_tls_refusal(
            client_with(&trust, &expired_cert, &expired_key, Role::Ttp, &partner_url)
                .get_json::<HistoryResponse>(&format!("/v1/domains/{id_a}/history"))
                .await,
        );
        let failure = next_failure(&mut failures).await;
        assert!(failure.reason.contains("expired"), "{}", failure.reason);
        m.record(
            "T3",
            "TLS with an expired certificate of a trusted (partner) CA",
            "net::Error::Tls",
            &format!("server: {}; client: {reason}", failure.reason),
        );

        // T4: a descriptor signed with it, registered at the partner TTP by the CP; a
        // descriptor of a valid partner certificate is accepted there (the control).
        let carol = signer_from_pems("dm-carol", &expired_cert, &expired_key);
        let cp_partner = pki.client("cloud-platform", Role::Ttp, &partner_url).unwrap();
        let dave_id = CertificateAuthority::issue(
            &partner_ca_pem,
            &partner_ca_key,
            Role::DomainManager,
            "dm-dave",
            Validity::Days(30),
        )
        .unwrap();
        let dave = signer_from_pems("dm-dave", &dave_id.cert_pem, &dave_id.key_pem);
        let good = dave.new_domain(&[], &[("vm-a", AccessMode::Rw)]).unwrap();
        let _: RegisterDomainResponse = cp_partner
            .post_json(
                "/v1/domains",
                &RegisterDomainRequest {
                    descriptor: dave.sign_descriptor(&good).unwrap(),
                    previous_registration: None,
                },
            )
            .await
            .expect("a valid partner-CA signer is accepted");
        let stale = carol.new_domain(&[], &[("vm-a", AccessMode::Rw)]).unwrap();
        let before = audit_records(&partner).len();
        let result = cp_partner
            .post_json::<_, RegisterDomainResponse>(
                "/v1/domains",
                &RegisterDomainRequest {
                    descriptor: carol.sign_descriptor(&stale).unwrap(),
                    previous_registration: None,
                },
            )
            .await;
        let message = expect_code(result, "descriptor_signature_invalid");
        assert!(message.contains("expired"), "{message}");
        let audit = assert_audited(&partner, before, "register", "descriptor_signature_invalid");
        m.record(
            "T4",
            "a descriptor signed with an expired certificate (partner TTP)",
            "descriptor_signature_invalid",
            &audit_text(&audit),
        );
    }
    {
        // T7: TLS 1.2 only.
        let target = RawTarget {
            addr: partner_url.trim_start_matches("https://").into(),
            ca: pki.dir.join("ca.pem"),
            cert: pki.dir.join("cloud-platform.pem"),
            key: pki.dir.join("cloud-platform-key.pem"),
        };
        let tcp = std::net::TcpStream::connect(&target.addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let error = match connector(&target, true).connect("127.0.0.1", tcp) {
            Ok(_) => panic!("a TLS 1.2 handshake must be refused"),
            Err(e) => e.to_string(),
        };
        let failure = next_failure(&mut failures).await;
        assert!(
            failure.reason.contains("TLS 1.3") || failure.reason.to_lowercase().contains("version"),
            "{}",
            failure.reason
        );
        m.record(
            "T7",
            "TLS 1.2 only (OpenSSL client)",
            "handshake refused",
            &format!("server: {}; client: {error}", failure.reason),
        );
    }
    {
        // T6: a domain manager calls a secure component; T8: a CP answers where a TTP is expected.
        let reason = expect_tls_refusal(
            pki.client("dm-alice", Role::SecureComponent, &compute1.agent_url)
                .unwrap()
                .get_json::<serde_json::Value>("/v1/attachments")
                .await,
        );
        m.record(
            "T6",
            "dm-alice calls compute-1's secure component (role refused)",
            "net::Error::Tls",
            &format!("client: {reason}"),
        );
        let reason = expect_tls_refusal(
            pki.client("compute-1", Role::Ttp, &cloud.cp_url)
                .unwrap()
                .post_json::<_, ChallengeResponse>("/v1/challenges", &())
                .await,
        );
        assert!(reason.contains("cloud-platform"), "{reason}");
        m.record(
            "T8",
            "a host talks to the CP's address as if it were the TTP (server role refused)",
            "net::Error::Tls",
            &format!("client: {reason}"),
        );
    }
    {
        // T9: the CA revokes dm-frank's certificate (key compromise) while the cloud runs:
        // the TTP and the CP refuse its handshakes once the list is published, no restart.
        pki.issue(Role::DomainManager, "dm-frank").unwrap();
        let frank = signer(pki, "dm-frank");
        // Domain F: alice's, shared with dm-frank (who may grant mounts of it).
        let mut desc_f = alice.new_domain(&[("department", "radiology")], &[("vm-a", AccessMode::Rw)]).unwrap();
        desc_f.shared_with.push("dm-frank".into());
        let view_f: DomainView = alice_cp
            .post_json(
                "/v1/domains",
                &CreateDomainRequest { descriptor: alice.sign_descriptor(&desc_f).unwrap(), size_bytes: 16 << 20 },
            )
            .await
            .expect("create domain F");
        let id_f = desc_f.domain_id.clone();
        // Signed before the revocation; T10 presents it afterwards.
        let grant_f = frank.grant(&id_f, "vm-a", AccessMode::Rw, 300);
        let frank_ttp = || pki.client("dm-frank", Role::Ttp, &cloud.ttp.url).unwrap();
        frank_ttp()
            .get_json::<HistoryResponse>(&format!("/v1/domains/{id_f}/history"))
            .await
            .expect("dm-frank is served before the revocation");
        pki.revoke("dm-frank", protocol::pki::RevocationReason::KeyCompromise).unwrap();
        let published = Instant::now();
        let reason = loop {
            // A new client each time: every try is a new handshake.
            match frank_ttp().get_json::<HistoryResponse>(&format!("/v1/domains/{id_f}/history")).await {
                Ok(_) if published.elapsed() < Duration::from_secs(5) => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Ok(_) => panic!("the TTP still serves dm-frank 5 s after its revocation was published"),
                Err(e) => break expect_tls_refusal(Err::<(), _>(e)),
            }
        };
        let applied_after = published.elapsed();
        // The CP watches its files on its own 2 s clock: it may apply the list up to 2 s
        // after the TTP did (seen in CI), so it gets the same 5 s.
        let cp_reason = loop {
            match pki
                .client("dm-frank", Role::CloudPlatform, &cloud.cp_url)
                .unwrap()
                .get_json::<DomainView>(&format!("/v1/domains/{id_f}"))
                .await
            {
                Ok(_) if published.elapsed() < Duration::from_secs(5) => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Ok(_) => panic!("the CP still serves dm-frank 5 s after its revocation was published"),
                Err(e) => break expect_tls_refusal(Err::<(), _>(e)),
            }
        };
        let cp_applied_after = published.elapsed();
        m.record(
            "T9",
            "TLS with a certificate the CA revoked while the cloud runs (TTP, CP)",
            "net::Error::Tls",
            &format!("TTP after {applied_after:.1?}: {reason}; CP after {cp_applied_after:.1?}: {cp_reason}"),
        );

        // T10: the grant dm-frank signed before its revocation, presented by compute-1; the
        // same request with alice's grant is served (the control: only the signer changed).
        let challenge: ChallengeResponse = c1_ttp.post_json("/v1/challenges", &()).await.unwrap();
        let quote = quote_for(compute1, &challenge.nonce).await;
        let before = audit_records(&ttp).len();
        let request =
            release_request(&op, "compute-1", "vm-a", AccessMode::Rw, &view_f.header, &grant_f, &challenge, quote);
        let message = expect_code(
            c1_ttp.post_json::<_, KeyReleaseResponse>("/v1/key-releases", &request).await,
            "grant_signature_invalid",
        );
        assert!(message.contains("certificate is revoked"), "{message}");
        let audit = assert_audited(&ttp, before, "key_release", "grant_signature_invalid");
        let challenge: ChallengeResponse = c1_ttp.post_json("/v1/challenges", &()).await.unwrap();
        let quote = quote_for(compute1, &challenge.nonce).await;
        let request = release_request(
            &op,
            "compute-1",
            "vm-a",
            AccessMode::Rw,
            &view_f.header,
            &alice.grant(&id_f, "vm-a", AccessMode::Rw, 300),
            &challenge,
            quote,
        );
        let _: KeyReleaseResponse =
            c1_ttp.post_json("/v1/key-releases", &request).await.expect("the owner's grant is served");
        m.record(
            "T10",
            "a mount grant signed before its signer's certificate was revoked",
            "grant_signature_invalid",
            &audit_text(&audit),
        );
    }
    partner_stop.cancel();
    let _ = partner_task.await;

    // ================= bodies on every route ===========================================================
    {
        let target_of = |url: &str| RawTarget {
            addr: url.trim_start_matches("https://").into(),
            ca: pki.dir.join("ca.pem"),
            cert: pki.dir.join("cloud-platform.pem"),
            key: pki.dir.join("cloud-platform-key.pem"),
        };
        let (ttp_t, cp_t, sc_t) = (target_of(&cloud.ttp.url), target_of(&cloud.cp_url), target_of(&compute1.agent_url));
        let fake = "0123456789abcdef0123456789abcdef";
        // (service, target, method, path, takes a JSON body)
        let routes: Vec<(&str, &RawTarget, &str, String, bool)> = vec![
            ("TTP", &ttp_t, "POST", "/v1/enrollments".into(), true),
            ("TTP", &ttp_t, "POST", "/v1/enrollments/proof".into(), true),
            ("TTP", &ttp_t, "POST", "/v1/challenges".into(), false),
            ("TTP", &ttp_t, "POST", "/v1/domains".into(), true),
            ("TTP", &ttp_t, "POST", format!("/v1/domains/{id_a}/delete"), true),
            ("TTP", &ttp_t, "GET", format!("/v1/domains/{id_a}/history"), false),
            ("TTP", &ttp_t, "POST", "/v1/key-releases".into(), true),
            ("TTP", &ttp_t, "GET", "/v1/health".into(), false),
            ("CP", &cp_t, "POST", "/v1/hosts".into(), true),
            ("CP", &cp_t, "GET", "/v1/hosts".into(), false),
            ("CP", &cp_t, "POST", "/v1/instances".into(), true),
            ("CP", &cp_t, "GET", "/v1/instances".into(), false),
            ("CP", &cp_t, "POST", "/v1/domains".into(), true),
            ("CP", &cp_t, "GET", "/v1/domains".into(), false),
            ("CP", &cp_t, "GET", format!("/v1/domains/{id_a}"), false),
            ("CP", &cp_t, "DELETE", format!("/v1/domains/{id_a}"), true),
            ("CP", &cp_t, "PUT", format!("/v1/domains/{id_a}/descriptor"), true),
            ("CP", &cp_t, "POST", "/v1/attachments".into(), true),
            ("CP", &cp_t, "GET", "/v1/attachments".into(), false),
            ("CP", &cp_t, "GET", format!("/v1/attachments/{fake}"), false),
            ("CP", &cp_t, "DELETE", format!("/v1/attachments/{fake}"), false),
            ("CP", &cp_t, "GET", "/v1/health".into(), false),
            ("SC", &sc_t, "GET", "/v1/attachments".into(), false),
            ("SC", &sc_t, "POST", "/v1/attachments".into(), true),
            ("SC", &sc_t, "DELETE", format!("/v1/attachments/{fake}"), false),
            ("SC", &sc_t, "GET", "/v1/health".into(), false),
        ];
        let mut oversized = b"{\"descriptor\":\"".to_vec();
        oversized.resize(oversized.len() + (2 << 20) + 1024, b'a');
        oversized.extend_from_slice(b"\"}");
        // (id, attack, content type, body, the status every body route must answer)
        type BodyCase<'a> = (&'a str, &'a str, &'a str, Vec<u8>, &'a [u16]);
        let bodies: Vec<BodyCase<'_>> = vec![
            ("B1", "a body over every limit (2 MiB + 1 KiB) on every route", "application/json", oversized, &[413]),
            (
                "B2",
                "malformed JSON on every route",
                "application/json",
                b"{\"descriptor\": {\"message\": ".to_vec(),
                &[400],
            ),
            ("B3", "JSON of the wrong shape on every route", "application/json", b"[1, 2, 3]".to_vec(), &[422]),
            ("B4", "a non-JSON content type on every route", "text/plain", b"{}".to_vec(), &[415]),
            (
                "B5",
                "a JSON nesting bomb (100k '[') on every route",
                "application/json",
                vec![b'['; 100_000],
                &[400, 422],
            ),
        ];
        for (id, attack, content_type, body, expected) in bodies {
            let mut seen = Vec::new();
            for (service, target, method, path, takes_body) in &routes {
                let t = Instant::now();
                let (target, method, path, body, content_type) =
                    ((*target).clone(), method.to_string(), path.clone(), body.clone(), content_type.to_string());
                let label = format!("{service} {method} {path}");
                let answer = tokio::task::spawn_blocking(move || {
                    raw_request(&target, &method, &path, Some(&content_type), &body)
                })
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("{id} {label}: {e}"));
                assert!(t.elapsed() < Duration::from_secs(15), "{id} {label} took {:?}", t.elapsed());
                assert!(
                    answer.status < 500,
                    "{id} {label}: HTTP {} {:?}",
                    answer.status,
                    String::from_utf8_lossy(&answer.body)
                );
                if *takes_body {
                    assert!(
                        expected.contains(&answer.status),
                        "{id} {label}: HTTP {} (expected {expected:?}) {:?}",
                        answer.status,
                        String::from_utf8_lossy(&answer.body)
                    );
                    assert_eq!(error_code_of(&answer), "bad_request", "{id} {label}");
                    seen.push(answer.status);
                } else if answer.status >= 400 {
                    error_code_of(&answer); // a refusal still answers {code, message}
                }
            }
            let body_routes = routes.iter().filter(|r| r.4).count();
            seen.dedup();
            m.record(
                id,
                attack,
                &format!("HTTP {seen:?} bad_request on {body_routes} body routes"),
                &format!("{} body-less routes: no 5xx", routes.len() - body_routes),
            );
        }
        // B6: path traversal in ids.
        let alice_ttp = pki.client("dm-alice", Role::Ttp, &cloud.ttp.url).unwrap();
        let traversal = "..%2F..%2F..%2Fetc%2Fpasswd";
        expect_code(alice_cp.get_json::<DomainView>(&format!("/v1/domains/{traversal}")).await, "domain_unknown");
        expect_code(
            alice_ttp.get_json::<HistoryResponse>(&format!("/v1/domains/{traversal}/history")).await,
            "domain_unknown",
        );
        let sc = pki.client("cloud-platform", Role::SecureComponent, &compute1.agent_url).unwrap();
        expect_code(sc.delete_json::<serde_json::Value>(&format!("/v1/attachments/{traversal}")).await, "bad_request");
        m.record(
            "B6",
            "path traversal in ids (CP domain, TTP history, SC attachment)",
            "domain_unknown / bad_request",
            "-",
        );
    }

    // ================= tenants against each other (docs/SECURITY-TESTING.md, "Tenant isolation") ==
    {
        let operator = pki.client("cloud-platform", Role::CloudPlatform, &cloud.cp_url).unwrap();
        // I2: a tenant moves another tenant's VM to a host of its choosing.
        let message = expect_code(
            bob_cp
                .post_json::<_, Instance>("/v1/instances", &Instance { id: "vm-a".into(), host: "compute-2".into() })
                .await,
            "forbidden",
        );
        let placed: InstanceList = operator.get_json("/v1/instances").await.unwrap();
        let vm_a = placed.instances.iter().find(|i| i.id == "vm-a").expect("vm-a is placed");
        assert_eq!(vm_a.host, "compute-1", "vm-a moved: {message}");
        m.record(
            "I2",
            "dm-bob re-registers alice's vm-a on compute-2 (POST /v1/instances)",
            "forbidden (CP)",
            "placement unchanged",
        );
        // I8a: the topology is the operator's.
        expect_code(bob_cp.get_json::<serde_json::Value>("/v1/hosts").await, "forbidden");
        expect_code(bob_cp.get_json::<serde_json::Value>("/v1/instances").await, "forbidden");
        m.record("I8a", "a tenant lists the hosts and instances of every tenant", "forbidden (CP)", "-");
        // I8b: refusals name neither another tenant's owner nor its objects.
        let (unshared, _) = create_domain(&alice_cp, &alice, &[("vm-a", AccessMode::Ro)]).await;
        let message = expect_code(
            bob_cp.get_json::<DomainView>(&format!("/v1/domains/{}", unshared.domain_id)).await,
            "forbidden",
        );
        assert!(!message.contains("dm-alice"), "the refusal names the owner: {message}");
        m.record(
            "I8b",
            "dm-bob reads alice's domain: the refusal must not name its owner",
            "forbidden, owner not named",
            "-",
        );

        // I3: two writers (or a reader beside a writer) of one ext4 volume.
        let (desc_c, _) = create_domain(&alice_cp, &alice, &[("vm-a", AccessMode::Rw), ("vm-b", AccessMode::Rw)]).await;
        let id_c = desc_c.domain_id.clone();
        let first = attach(&alice_cp, &id_c, "vm-a", AccessMode::Rw, alice.grant(&id_c, "vm-a", AccessMode::Rw, 300))
            .await
            .expect("the first rw attach");
        let message = expect_code(
            attach(&alice_cp, &id_c, "vm-b", AccessMode::Rw, alice.grant(&id_c, "vm-b", AccessMode::Rw, 300)).await,
            "single_writer",
        );
        assert!(message.contains(&first.id), "the refusal names the attachment to detach: {message}");
        expect_code(
            attach(&alice_cp, &id_c, "vm-b", AccessMode::Ro, alice.grant(&id_c, "vm-b", AccessMode::Ro, 300)).await,
            "single_writer",
        );
        let _: Attachment = alice_cp.delete_json(&format!("/v1/attachments/{}", first.id)).await.expect("detach vm-a");
        // Alone again, a rw attach is served (vm-a: compute-2's measured state was changed
        // by an attack above, so vm-b could not be served now whatever the rule).
        let second = attach(&alice_cp, &id_c, "vm-a", AccessMode::Rw, alice.grant(&id_c, "vm-a", AccessMode::Rw, 300))
            .await
            .expect("rw once the other attachment is gone");
        let _: Attachment = alice_cp.delete_json(&format!("/v1/attachments/{}", second.id)).await.expect("detach vm-a");
        m.record(
            "I3",
            "a second rw attach (vm-b on compute-2) beside vm-a's rw one; a ro one beside it",
            "single_writer (CP, 409)",
            "-",
        );

        // I5: a grant that never expires (its used mark would be purged at once).
        let before = audit_records(&ttp).len();
        let forever = alice.grant_until(&id_c, "vm-a", AccessMode::Rw, 9_300_000_000_000_000_000);
        expect_code(attach(&alice_cp, &id_c, "vm-a", AccessMode::Rw, forever).await, "grant_too_long");
        let audit = assert_audited(&ttp, before, "key_release", "grant_too_long");
        m.record("I5", "a grant valid until 9.3e18 (beyond i64::MAX)", "grant_too_long", &audit_text(&audit));

        // I4: one owner promising away the provider's disk (sparse 1 TiB volumes).
        let create = |size_bytes: u64| {
            let descriptor = bob.new_domain(&[("department", "quota")], &[("vm-c", AccessMode::Ro)]).unwrap();
            let request = CreateDomainRequest { descriptor: bob.sign_descriptor(&descriptor).unwrap(), size_bytes };
            let bob_cp = &bob_cp;
            async move { bob_cp.post_json::<_, DomainView>("/v1/domains", &request).await }
        };
        let quota = cloud_platform::config::Quota::default();
        let tib = 1u64 << 40;
        for _ in 0..quota.max_bytes / tib {
            create(tib).await.expect("within the quota");
        }
        let message = expect_code(create(16 << 20).await, "quota_exceeded");
        assert!(message.contains("dm-bob"), "{message}");
        m.record("I4", "dm-bob declares 8 x 1 TiB, then one more domain", "quota_exceeded (CP, 403)", "-");

        // I6: names that are path components never get a key released: refused at placement.
        for bad in ["..", ".", "-x"] {
            expect_code(
                operator
                    .post_json::<_, Instance>("/v1/instances", &Instance { id: bad.into(), host: "compute-1".into() })
                    .await,
                "bad_request",
            );
        }
        m.record(
            "I6",
            "VM ids '..', '.', '-x' (path components, options)",
            "bad_request at placement",
            "no key released",
        );
    }

    println!("\nSUMMARY ({} attacks, {:?})", m.rows.len(), started.elapsed());
    for (id, attack, code, audit) in &m.rows {
        println!("  {id:<4} {code:<30} {audit:<36} {attack}");
    }
    drop((alice_cp, bob_cp));
    cloud.stop().await;
}

async fn next_failure(
    failures: &mut tokio::sync::mpsc::UnboundedReceiver<net::HandshakeFailure>,
) -> net::HandshakeFailure {
    tokio::time::timeout(Duration::from_secs(10), failures.recv())
        .await
        .expect("the server reports the failed handshake")
        .unwrap()
}

trait DeleteWithBody {
    async fn request_json_delete(&self, domain_id: &str, signer: &DomainManager) -> Result<DomainView, net::Error>;
}

impl DeleteWithBody for net::Client {
    /// `DELETE /v1/domains/{id}` with the signed deletion as its body (net::Client's
    /// `delete_json` sends none), through the generic request.
    async fn request_json_delete(&self, domain_id: &str, signer: &DomainManager) -> Result<DomainView, net::Error> {
        let body = DeleteDomainBody { deletion: signer.deletion(domain_id) };
        self.request_json("DELETE".parse().unwrap(), &format!("/v1/domains/{domain_id}"), Some(&body)).await
    }
}

// ---- issue 21: EK pinning, resettable PCRs, the measured state ------------------------------------

/// A lab for the issue-21 rows: a cloud CA, a TPM vendor CA (swtpm_localca) shared by every
/// TPM, and a TTP whose policy the caller makes once the hosts exist.
struct PinLab {
    dir: tempfile::TempDir,
    pki: LabPki,
    vendor_ca: PathBuf,
}

impl PinLab {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = LabPki::create(&dir.path().join("pki")).unwrap();
        let vendor_ca = dir.path().join("tpm-vendor-ca");
        Self { dir, pki, vendor_ca }
    }

    fn host(&self, host_id: &str, ttp_url: &str) -> LabHost {
        LabHost::start(self.dir.path(), &self.pki, host_id, &self.vendor_ca, ttp_url).expect("start a host (swtpm)")
    }

    /// A TPM of the same vendor driven with `identity`'s (already issued) TLS key: what an
    /// attacker who stole that host's key does with a second genuine TPM.
    fn tpm_with_identity(
        &self,
        tpm_name: &str,
        identity: &str,
        ttp_url: &str,
    ) -> (secure_component::host::AttestedHost, secure_component::swtpm::Swtpm) {
        let swtpm = secure_component::swtpm::Swtpm::start_with_ca(
            &self.dir.path().join(tpm_name).join("swtpm"),
            &self.vendor_ca,
        )
        .unwrap();
        let tpm =
            secure_component::host::TpmWorker::start(&swtpm.tcti(), self.dir.path().join(tpm_name).join("sc-state"))
                .unwrap();
        let ttp = self.pki.client(identity, Role::Ttp, ttp_url).unwrap();
        (secure_component::host::AttestedHost { host_id: identity.to_string(), tpm, ttp }, swtpm)
    }

    fn policy(&self, reference_states: Vec<ttp::attestation::ReferenceState>) -> ttp::attestation::AttestationPolicy {
        ttp::attestation::AttestationPolicy {
            trusted_ek_roots: secure_component::swtpm::ca_certificates_der(&self.vendor_ca).unwrap(),
            reference_states,
            ..Default::default()
        }
    }
}

fn ek_of(record: &AuditRecord) -> Vec<String> {
    record
        .message
        .split_whitespace()
        .map(|w| w.trim_matches(|c: char| !c.is_ascii_hexdigit()))
        .filter(|w| w.len() == 64 && w.chars().all(|c| c.is_ascii_hexdigit()))
        .map(str::to_string)
        .collect()
}

/// H11–H13: a second genuine TPM claiming an enrolled host, one host per EK, and the
/// operator's audited replacement of a host's TPM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_genuine_tpm_claiming_a_host() {
    let lab = PinLab::new();
    let mut m = Matrix::default();
    let (listener, url) = RunningTtp::bind().await.unwrap();
    let compute1 = lab.host("compute-1", &url);
    let selection = PcrSelection::default_host();
    let policy = lab.policy(vec![compute1.reference_state("compute-v1", &selection).await.unwrap()]);
    let running = RunningTtp::start(lab.dir.path(), &lab.pki, &policy, listener).await.unwrap();
    let ttp = running.service.clone();

    let enrolled = compute1.agent.enroll(&selection).await.expect("compute-1 enrolls its own TPM");
    let ek1 = enrolled.ek_fingerprint.clone();
    let first = audit_records(&ttp).last().unwrap().clone();
    assert_eq!((first.event.as_str(), first.outcome.as_str()), ("enroll", "ok"));
    assert!(first.message.contains(&ek1), "the enrollment record names the EK: {}", first.message);

    // H11: compute-1's TLS key and a DIFFERENT genuine TPM of the same vendor.
    let (rogue, _rogue_tpm) = lab.tpm_with_identity("rogue-tpm", "compute-1", &url);
    let before = audit_records(&ttp).len();
    assert_eq!(enroll_code(rogue.enroll(&selection).await), "ek_pinned");
    let audit = assert_audited_n(&ttp, before, 2, "enroll", "ek_pinned");
    let named = ek_of(&audit);
    assert_eq!(named.len(), 2, "the refusal names the pinned and the presented EK: {}", audit.message);
    assert_eq!(named[0], ek1);
    assert_ne!(named[1], ek1);
    let ek2 = named[1].clone();
    m.record(
        "H11",
        "a second genuine TPM (same vendor CA) enrolls with compute-1's TLS key",
        "ek_pinned",
        &audit_text(&audit),
    );
    // The real compute-1 is not locked out: its record still names its EK and its quotes verify.
    let record: ttp::attestation::HostRecord =
        serde_json::from_str(&ttp.store().host("compute-1").unwrap().unwrap()).unwrap();
    assert_eq!(record.ek_fingerprint, ek1);
    let challenge: ChallengeResponse = compute1.agent.ttp.post_json("/v1/challenges", &()).await.unwrap();
    let nonce = challenge.nonce.clone();
    let quote = compute1.agent.tpm.run(move |t| t.quote(&nonce)).await.unwrap();
    ttp::attestation::verify_quote(&record, &policy, &quote, &challenge.nonce)
        .expect("compute-1's own TPM still attests");

    // H12: the rogue TPM enrolls honestly as compute-9, then tries compute-1 again after the
    // operator allowed compute-1 a new TPM: one TPM is one host.
    lab.pki.issue(Role::SecureComponent, "compute-9").unwrap();
    let compute9 = secure_component::host::AttestedHost {
        host_id: "compute-9".into(),
        tpm: rogue.tpm.clone(),
        ttp: lab.pki.client("compute-9", Role::Ttp, &url).unwrap(),
    };
    let as9 = compute9.enroll(&selection).await.expect("the second TPM enrolls under its own host id");
    assert_eq!(as9.ek_fingerprint, ek2);
    let before = audit_records(&ttp).len();
    let replace =
        ttp.allow_host_replacement("operator:test", "compute-1").expect("the operator marks compute-1 replaceable");
    assert_eq!(
        (replace.event.as_str(), replace.outcome.as_str(), replace.host_id.as_deref()),
        ("host_replace", "ok", Some("compute-1"))
    );
    assert!(replace.message.contains(&ek1), "{}", replace.message);
    assert_eq!(enroll_code(rogue.enroll(&selection).await), "ek_in_use");
    let audit = assert_audited_n(&ttp, before, 3, "enroll", "ek_in_use");
    assert!(audit.message.contains("compute-9"), "{}", audit.message);
    m.record("H12", "the TPM enrolled as compute-9 enrolls as compute-1 too", "ek_in_use", &audit_text(&audit));

    // H13: the operator's replacement is used by a new TPM, once; the record names both EKs.
    let (replacement, _replacement_tpm) = lab.tpm_with_identity("replacement-tpm", "compute-1", &url);
    let before = audit_records(&ttp).len();
    let replaced = replacement.enroll(&selection).await.expect("the approved replacement TPM enrolls");
    let audit = assert_audited_n(&ttp, before, 2, "enroll", "ok");
    assert!(
        audit.message.contains(&ek1)
            && audit.message.contains(&replaced.ek_fingerprint)
            && audit.message.contains("replacing"),
        "{}",
        audit.message
    );
    let before = audit_records(&ttp).len();
    assert_eq!(enroll_code(compute1.agent.enroll(&selection).await), "ek_pinned", "the mark is used up");
    assert_audited_n(&ttp, before, 2, "enroll", "ek_pinned");
    m.record(
        "H13",
        "operator replaces compute-1's TPM; the new TPM enrolls once, the old is refused",
        "ok / ek_pinned",
        &format!("{} host_replace, {}", replace.seq, audit_text(&audit)),
    );
    // An unknown host cannot be marked.
    let err = ttp.allow_host_replacement("operator:test", "compute-404").unwrap_err();
    assert_eq!(err.code(), "host_unknown");
    assert_eq!(audit_records(&ttp).last().unwrap().outcome, "host_unknown", "a refused replacement is audited too");
    ttp.verify_audit_chain().unwrap();
    running.stop().await;
}

/// H14: a resettable PCR (16 debug, 23 application) is refused in the TTP's policy (it does
/// not start) and in an enrollment's selection. (Under swtpm `tpm2_pcrreset 16` succeeds
/// without authorisation, so a value in it proves nothing.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pcr_16_reset_is_refused_in_policy_and_selection() {
    let lab = PinLab::new();
    let mut m = Matrix::default();
    let (listener, url) = RunningTtp::bind().await.unwrap();
    let host = lab.host("compute-1", &url);
    let with_16 = PcrSelection { bank: "sha256".into(), indices: vec![0, 1, 2, 3, 4, 5, 6, 7, 16] };
    let values = host
        .agent
        .tpm
        .run({
            let s = with_16.clone();
            move |t| t.read_pcrs(&s)
        })
        .await
        .unwrap();
    let state_16 =
        ttp::attestation::ReferenceState { name: "debug".into(), selection: with_16.clone(), pcr_values: values };
    let err = RunningTtp::start(lab.dir.path(), &lab.pki, &lab.policy(vec![state_16]), listener)
        .await
        .err()
        .expect("the TTP refuses a policy with PCR 16");
    let err = err.downcast_ref::<ttp::Error>().expect("a TTP error");
    assert_eq!(err.code(), "pcr_resettable", "{err}");
    assert!(err.to_string().contains("PCR 16"), "{err}");
    m.record(
        "H14",
        "a reference state selecting PCR 16: the TTP refuses its policy at start-up",
        "pcr_resettable",
        "- (start-up)",
    );

    let (listener, url2) = RunningTtp::bind().await.unwrap();
    let good = host.reference_state("compute-v1", &PcrSelection::default_host()).await.unwrap();
    let running = RunningTtp::start(lab.dir.path(), &lab.pki, &lab.policy(vec![good]), listener).await.unwrap();
    let ttp = running.service.clone();
    let agent = secure_component::host::AttestedHost {
        host_id: "compute-1".into(),
        tpm: host.agent.tpm.clone(),
        ttp: lab.pki.client("compute-1", Role::Ttp, &url2).unwrap(),
    };
    let before = audit_records(&ttp).len();
    for pcr in [16u8, 23] {
        let selection = PcrSelection { bank: "sha256".into(), indices: vec![0, 1, 2, 3, 4, 5, 6, 7, pcr] };
        assert_eq!(enroll_code(agent.enroll(&selection).await), "pcr_resettable");
    }
    let audit = assert_audited_n(&ttp, before, 2, "enroll_begin", "pcr_resettable");
    assert!(audit.message.contains("PCR 23"), "{}", audit.message);
    m.record("H14", "a host enrolls a binding key over PCRs 0-7 + 16 (or 23)", "pcr_resettable", &audit_text(&audit));
    agent.enroll(&PcrSelection::default_host()).await.expect("the default selection (no resettable PCR) enrolls");
    running.stop().await;
}

/// H15: the measured state. A host's start-up extends PCR 11 with the secure component's
/// binary and configuration; the reference state is computed from the build. A host whose
/// binary was replaced cannot enroll, and a host that was enrolled and reboots with a
/// replaced binary is refused at release, and its TPM refuses to decrypt a key released
/// before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_secure_component_binary() {
    use secure_component::measure::{self, Measurement};
    let lab = PinLab::new();
    let mut m = Matrix::default();
    let binary = std::env::current_exe().unwrap();
    let config = b"# secure-component.toml of the measured hosts\nttp_url = \"https://ttp.example\"\n".to_vec();
    let replaced = lab.dir.path().join("secure-component-replaced");
    std::fs::copy(&binary, &replaced).unwrap();
    {
        use std::io::Write;
        std::fs::OpenOptions::new()
            .append(true)
            .open(&replaced)
            .unwrap()
            .write_all(b"\x00a patched secure component")
            .unwrap();
    }
    // The reference state from the build: no host is read.
    let expected = Measurement::of(&binary, &config).unwrap();
    let state = skydd::lab::measured_reference_state("compute-measured", &expected);
    let (listener, url) = RunningTtp::bind().await.unwrap();
    let good = lab.host("compute-1", &url);
    let policy = lab.policy(vec![state]);
    let running = RunningTtp::start(lab.dir.path(), &lab.pki, &policy, listener).await.unwrap();
    let ttp = running.service.clone();
    let selection = PcrSelection::default_host();

    // A host measured with the expected binary enrolls; one with the replaced binary cannot.
    good.agent.tpm.run(move |t| measure::extend(t, &expected)).await.unwrap();
    let enrolled = good.agent.enroll(&selection).await.expect("the measured host enrolls");
    assert_eq!(enrolled.reference_state, "compute-measured");
    let bad = lab.host("compute-2", &url);
    let bad_measurement = Measurement::of(&replaced, &config).unwrap();
    assert_ne!(bad_measurement.binary, expected.binary);
    bad.agent.tpm.run(move |t| measure::extend(t, &bad_measurement)).await.unwrap();
    let before = audit_records(&ttp).len();
    assert_eq!(enroll_code(bad.agent.enroll(&selection).await), "binding_policy_untrusted");
    let audit = assert_audited_n(&ttp, before, 2, "enroll", "binding_policy_untrusted");
    m.record(
        "H15",
        "a host whose secure-component binary was replaced enrolls",
        "binding_policy_untrusted",
        &audit_text(&audit),
    );
    // A changed configuration is a changed state too.
    assert_ne!(
        Measurement::of(&binary, b"ttp_url = \"https://rogue.example\"\n").unwrap().pcr_value(),
        expected.pcr_value()
    );

    // A key released to the good host while it runs the expected binary.
    lab.pki.issue(Role::CloudPlatform, "cp-1").unwrap();
    let cp = lab.pki.client("cp-1", Role::Ttp, &url).unwrap();
    let alice = DomainManager::create(&lab.pki, "dm-alice").unwrap();
    let descriptor = alice.new_domain(&[("department", "radiology")], &[("vm-a", AccessMode::Rw)]).unwrap();
    let header = skydd::lab::register(&cp, alice.sign_descriptor(&descriptor).unwrap(), None).await.unwrap();
    let grant = alice.grant(&descriptor.domain_id, "vm-a", AccessMode::Rw, 300);
    let operator = Operator::of(&lab.pki, "cp-1").unwrap();
    let earlier = operator
        .request_release(&good.agent, &header, &grant, "vm-a", AccessMode::Rw)
        .await
        .expect("released to the measured host");

    // The host reboots (its swtpm restarts: PCRs reset) and starts the replaced binary.
    drop(good);
    let rebooted = lab.host("compute-1", &url);
    rebooted.agent.tpm.run(move |t| measure::extend(t, &bad_measurement)).await.unwrap();
    let before = audit_records(&ttp).len();
    let grant = alice.grant(&descriptor.domain_id, "vm-a", AccessMode::Rw, 300);
    let refused = operator.obtain_key(&rebooted.agent, &header, &grant, "vm-a", AccessMode::Rw).await;
    let message = match refused {
        Err(secure_component::Error::TtpRefused { code, message, .. }) => {
            assert_eq!(code, "pcr_mismatch", "{message}");
            message
        }
        other => panic!("expected pcr_mismatch, got {:?}", other.map(|k| k.response.audit_seq)),
    };
    assert!(message.contains("PCR 11"), "{message}");
    let audit = assert_audited(&ttp, before, "key_release", "pcr_mismatch");
    let wrapped = earlier.wrapped_key.clone();
    let decrypted = rebooted.agent.tpm.run(move |t| t.decrypt_released_key(&wrapped)).await;
    assert!(
        matches!(decrypted, Err(secure_component::Error::BindingKeyRefused(_))),
        "the TPM must refuse: {:?}",
        decrypted.map(|k| k.len())
    );
    m.record(
        "H15",
        "the enrolled host reboots with a replaced secure-component binary",
        "pcr_mismatch + TPM refuses",
        &audit_text(&audit),
    );
    running.stop().await;
}
