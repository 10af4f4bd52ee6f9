//! Hand-made TLS and HTTP for the attacks the typed clients cannot make: an expired
//! certificate (T3), a TLS 1.2 handshake (T7), raw request bodies on every route (B1-B6).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use net::Role;
use skydd_testkit::now_unix;

/// An end-entity certificate that expired yesterday, issued by `ca` with the Skydd role
/// extension (made with OpenSSL: the lab's issuer only makes valid certificates).
pub(super) fn expired_certificate(ca_cert_pem: &str, ca_key_pem: &str, role: Role, name: &str) -> (String, String) {
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

pub(super) fn client_with(
    ca_pems: &[String],
    cert_pem: &str,
    key_pem: &str,
    server_role: Role,
    url: &str,
) -> net::Client {
    let tls = protocol::pki::client_config(ca_pems, &[], cert_pem, key_pem, server_role).unwrap();
    net::Client::with_timeout(url, tls, Duration::from_secs(20)).unwrap()
}

// ---- raw HTTPS with OpenSSL (bodies serde cannot produce) ----------------------------------------

pub(super) struct RawAnswer {
    pub(super) status: u16,
    pub(super) body: Vec<u8>,
}

#[derive(Clone)]
pub(super) struct RawTarget {
    pub(super) addr: String,
    pub(super) ca: PathBuf,
    pub(super) cert: PathBuf,
    pub(super) key: PathBuf,
}

pub(super) fn connector(target: &RawTarget, max_tls12: bool) -> openssl::ssl::SslConnector {
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
pub(super) fn raw_request(
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

pub(super) fn error_code_of(answer: &RawAnswer) -> String {
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
