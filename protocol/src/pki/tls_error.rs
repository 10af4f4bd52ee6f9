//! TLS errors in words: which rule a rustls error stands for, at either end of a link (a
//! local verifier failure names the certificate problem; a received alert says what the peer
//! refused).

use rustls::pki_types::UnixTime;
use rustls::{AlertDescription, CertificateError};
use time::OffsetDateTime;

/// A time as RFC 3339 (UTC), as every PKI message writes it.
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// UNIX seconds as RFC 3339 (UTC), e.g. `2026-05-01T12:00:00Z`; a time `time` cannot hold
/// as `<seconds> (UNIX)`.
pub fn unix_seconds_rfc3339(seconds: i64) -> String {
    match OffsetDateTime::from_unix_timestamp(seconds) {
        Ok(t) => rfc3339(t),
        Err(_) => format!("{seconds} (UNIX)"),
    }
}

fn unix_rfc3339(t: UnixTime) -> String {
    unix_seconds_rfc3339(i64::try_from(t.as_secs()).unwrap_or(i64::MAX))
}

/// Say in words which rule a rustls error stands for. Used by both ends: a local verifier
/// failure names the certificate problem; a received alert says what the peer refused.
pub fn describe_tls_error(e: &rustls::Error) -> String {
    use rustls::Error as E;
    match e {
        E::NoCertificatesPresented => "no client certificate presented".into(),
        E::InvalidCertificate(c) => describe_certificate_error(c),
        E::InvalidCertRevocationList(c) => {
            format!("the configured revocation list is unusable ({c:?}): it must be a CRL signed by a trusted CA")
        }
        E::AlertReceived(a) => describe_alert(*a),
        E::PeerIncompatible(p) => {
            format!("peer is incompatible (Skydd speaks TLS 1.3 only): {p:?}")
        }
        other => other.to_string(),
    }
}

fn describe_certificate_error(c: &CertificateError) -> String {
    match c {
        CertificateError::Expired => "certificate expired".into(),
        CertificateError::ExpiredContext { time, not_after } => {
            format!("certificate expired at {} (checked at {})", unix_rfc3339(*not_after), unix_rfc3339(*time))
        }
        CertificateError::NotValidYet => "certificate is not valid yet".into(),
        CertificateError::NotValidYetContext { time, not_before } => format!(
            "certificate is not valid before {} (checked at {})",
            unix_rfc3339(*not_before),
            unix_rfc3339(*time)
        ),
        CertificateError::UnknownIssuer => "certificate is not issued by a trusted CA".into(),
        CertificateError::Revoked => "certificate is revoked (listed in its CA's certificate revocation list)".into(),
        CertificateError::UnknownRevocationStatus => {
            "revocation status unknown: no revocation list of the certificate's CA is configured".into()
        }
        CertificateError::ExpiredRevocationList | CertificateError::ExpiredRevocationListContext { .. } => format!(
            "the configured revocation list is past its next update ({c}): the CA must publish \
             a fresh one (`cloud-platform ca crl`)"
        ),
        CertificateError::BadSignature => "certificate signature does not verify".into(),
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            format!("certificate is not allowed for this purpose (extended key usage): {c}")
        }
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            format!("certificate is not valid for the server name: {c}")
        }
        CertificateError::Other(o) => o.to_string(),
        other => format!("certificate refused: {other}"),
    }
}

fn describe_alert(a: AlertDescription) -> String {
    let what = match a {
        AlertDescription::CertificateRequired => "the peer requires a client certificate and none was presented",
        AlertDescription::CertificateExpired => "the peer refused our certificate: it is expired or not yet valid",
        AlertDescription::UnknownCA => "the peer refused our certificate: it is not issued by a CA the peer trusts",
        AlertDescription::CertificateUnknown => {
            "the peer refused our certificate: its role is not accepted there, or it is not a Skydd identity"
        }
        AlertDescription::BadCertificate => "the peer refused our certificate as malformed",
        AlertDescription::AccessDenied => "the peer denied access to our certificate",
        AlertDescription::CertificateRevoked => "the peer refused our certificate: it is revoked",
        AlertDescription::UnsupportedCertificate => {
            "the peer refused our certificate: wrong key usage or extended key usage"
        }
        AlertDescription::ProtocolVersion => "the peer does not speak TLS 1.3",
        AlertDescription::HandshakeFailure => "the TLS handshake failed at the peer",
        _ => "the peer aborted the TLS handshake",
    };
    format!("{what} (TLS alert {a:?})")
}
