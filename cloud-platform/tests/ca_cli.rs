//! The real `cloud-platform ca init/issue` binary.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn cp(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cloud-platform"))
        .args(args)
        .output()
        .unwrap()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn ca_init_and_issue_write_usable_files() {
    let d = tempfile::tempdir().unwrap();
    let ca = d.path().join("ca");
    let ca_s = ca.to_str().unwrap();

    let o = cp(&["ca", "init", "--dir", ca_s, "--name", "Hospital Cloud CA"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(mode(&ca.join("ca-key.pem")), 0o600);
    assert_eq!(mode(&ca), 0o700);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(!stdout.contains("PRIVATE KEY"));

    // Second init refuses and leaves the CA alone.
    let key_before = std::fs::read(ca.join("ca-key.pem")).unwrap();
    let o = cp(&["ca", "init", "--dir", ca_s]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("already holds a CA") && err.contains("refusing to overwrite"),
        "{err}"
    );
    assert_eq!(std::fs::read(ca.join("ca-key.pem")).unwrap(), key_before);

    let out = d.path().join("hosts");
    let o = cp(&[
        "ca",
        "issue",
        "--dir",
        ca_s,
        "--role",
        "secure-component",
        "--name",
        "compute-07",
        "--out",
        out.to_str().unwrap(),
        "--days",
        "30",
        "--san",
        "10.0.0.7",
        "--san",
        "compute-07.hospital.example",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let key = out.join("compute-07-key.pem");
    assert_eq!(mode(&key), 0o600);
    let cert_pem = std::fs::read_to_string(out.join("compute-07.pem")).unwrap();
    let der = protocol::pki::certs_from_pem(&cert_pem, "cert")
        .unwrap()
        .remove(0);
    let id = protocol::pki::identity_from_certificate(&der).unwrap();
    assert_eq!(id.name, "compute-07");
    assert_eq!(id.role, protocol::pki::Role::SecureComponent);
    let (_, c) = x509_parser::parse_x509_certificate(&der).unwrap();
    let days = (c.validity().not_after.timestamp() - c.validity().not_before.timestamp()) / 86400;
    assert_eq!(days, 30);

    // The issued pair works as a rustls identity against the CA.
    let ca_pem = std::fs::read_to_string(ca.join("ca.pem")).unwrap();
    let key_pem = std::fs::read_to_string(&key).unwrap();
    protocol::pki::server_config(
        &[ca_pem],
        &cert_pem,
        &key_pem,
        &[protocol::pki::Role::CloudPlatform],
    )
    .unwrap();

    // Same name again: refused.
    let o = cp(&[
        "ca",
        "issue",
        "--dir",
        ca_s,
        "--role",
        "ttp",
        "--name",
        "compute-07",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already exists"));
}

#[test]
fn cli_refusals_are_specific() {
    let d = tempfile::tempdir().unwrap();
    let s = d.path().to_str().unwrap();
    let o = cp(&[
        "ca", "issue", "--dir", s, "--role", "ttp", "--name", "ttp-1",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("does not hold a CA"));

    let o = cp(&["ca", "init", "--dir", s]);
    assert!(o.status.success());
    let o = cp(&["ca", "issue", "--dir", s, "--role", "admin", "--name", "x"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("invalid value 'admin'") && err.contains("domain-manager"),
        "{err}"
    );
    let o = cp(&[
        "ca", "issue", "--dir", s, "--role", "ttp", "--name", "../evil",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("only letters, digits"));

    let o = cp(&["ca", "issue", "--help"]);
    let help = String::from_utf8_lossy(&o.stdout);
    for want in [
        "secure-component",
        "unseals keys",
        "domain-manager",
        "--san",
    ] {
        assert!(help.contains(want), "help lacks {want}: {help}");
    }
}
