//! What the TTP's integration tests share: identities issued from a test CA.

use std::path::Path;

use net::TlsFiles;
use protocol::pki::Role;
use skydd_ca::{CertificateAuthority, Validity};

/// A test CA: its certificate (PEM) and key.
pub type Ca = (String, zeroize::Zeroizing<String>);

/// Writes `name`'s certificate and key (mode 0600) under `dir`; returns its TLS files.
pub fn identity_files(dir: &Path, ca: &Ca, role: Role, name: &str) -> TlsFiles {
    use std::os::unix::fs::PermissionsExt;
    let issued = CertificateAuthority::issue(&ca.0, &ca.1, role, name, Validity::Days(5)).unwrap();
    let (cert, key, ca_file) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")), dir.join("ca.pem"));
    std::fs::write(&cert, &issued.cert_pem).unwrap();
    std::fs::write(&key, issued.key_pem.as_bytes()).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(&ca_file, &ca.0).unwrap();
    TlsFiles { ca: vec![ca_file.into()], cert, key, crl: Vec::new() }
}
