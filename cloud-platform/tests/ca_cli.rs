//! The real `cloud-platform ca init/issue/revoke/crl/revoked` binary.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use protocol::pki::{read_revocation_list, RevocationList, RevocationReason, Role};

fn cp(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cloud-platform")).args(args).output().unwrap()
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
    assert!(err.contains("already holds a CA") && err.contains("refusing to overwrite"), "{err}");
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
    let der = protocol::pki::certs_from_pem(&cert_pem, "cert").unwrap().remove(0);
    let id = protocol::pki::identity_from_certificate(&der).unwrap();
    assert_eq!(id.name, "compute-07");
    assert_eq!(id.role, protocol::pki::Role::SecureComponent);
    let (_, c) = x509_parser::parse_x509_certificate(&der).unwrap();
    let days = (c.validity().not_after.timestamp() - c.validity().not_before.timestamp()) / 86400;
    assert_eq!(days, 30);

    // The issued pair works as a rustls identity against the CA.
    let ca_pem = std::fs::read_to_string(ca.join("ca.pem")).unwrap();
    let key_pem = std::fs::read_to_string(&key).unwrap();
    protocol::pki::server_config(&[ca_pem], &[], &cert_pem, &key_pem, &[protocol::pki::Role::CloudPlatform]).unwrap();

    // Same name again: refused.
    let o =
        cp(&["ca", "issue", "--dir", ca_s, "--role", "ttp", "--name", "compute-07", "--out", out.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already exists"));
}

#[test]
fn cli_refusals_are_specific() {
    let d = tempfile::tempdir().unwrap();
    let s = d.path().to_str().unwrap();
    let o = cp(&["ca", "issue", "--dir", s, "--role", "ttp", "--name", "ttp-1"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("does not hold a CA"));

    let o = cp(&["ca", "init", "--dir", s]);
    assert!(o.status.success());
    let o = cp(&["ca", "issue", "--dir", s, "--role", "admin", "--name", "x"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("invalid value 'admin'") && err.contains("domain-manager"), "{err}");
    let o = cp(&["ca", "issue", "--dir", s, "--role", "ttp", "--name", "../evil"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("only letters, digits"));

    // An organisation and role: a domain manager's only, both or neither, names checked.
    let affiliated = |role: &str, name: &str, organisation: &str| {
        cp(&[
            "ca",
            "issue",
            "--dir",
            s,
            "--role",
            role,
            "--name",
            name,
            "--organisation",
            organisation,
            "--org-role",
            "cardiologist",
        ])
    };
    assert!(refused(&affiliated("ttp", "ttp-2", "Karolinska")).contains("only a domain-manager certificate"));
    assert!(refused(&affiliated("domain-manager", "dm-x", "Karolinska;")).contains("contains ';'"));
    let o = cp(&["ca", "issue", "--dir", s, "--role", "domain-manager", "--name", "dm-y", "--organisation", "K"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--org-role"), "{o:?}");
    assert!(ok(&affiliated("domain-manager", "dm-erik", "Karolinska Cardiology"))
        .contains("cardiologist of Karolinska Cardiology"));
    let der = protocol::pki::single_cert_der(&read(&d.path().join("dm-erik.pem")), "certificate").unwrap();
    let affiliation = protocol::pki::affiliation_from_certificate(&der).unwrap().expect("an affiliation");
    assert_eq!(
        (affiliation.organisation.as_str(), affiliation.role.as_str()),
        ("Karolinska Cardiology", "cardiologist")
    );

    let o = cp(&["ca", "issue", "--help"]);
    let help = String::from_utf8_lossy(&o.stdout);
    for want in ["secure-component", "unseals keys", "domain-manager", "--san", "--org-role"] {
        assert!(help.contains(want), "help lacks {want}: {help}");
    }
}

fn ok(o: &std::process::Output) -> String {
    assert!(
        o.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn refused(o: &std::process::Output) -> String {
    assert!(!o.status.success(), "unexpectedly succeeded: {}", String::from_utf8_lossy(&o.stdout));
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `ca revoke --dir DIR --cert CERT` plus `more` arguments.
fn revoke(dir: &str, cert: &Path, more: &[&str]) -> std::process::Output {
    let mut args = vec!["ca", "revoke", "--dir", dir, "--cert", cert.to_str().unwrap()];
    args.extend_from_slice(more);
    cp(&args)
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap()
}

/// `ca init` plus certificates NAME (ROLE) issued into the CA directory.
fn ca_with(ca: &Path, parties: &[(&str, &str)]) {
    let s = ca.to_str().unwrap();
    ok(&cp(&["ca", "init", "--dir", s]));
    for (name, role) in parties {
        ok(&cp(&["ca", "issue", "--dir", s, "--role", role, "--name", name]));
    }
}

fn crl_of(ca: &Path) -> RevocationList {
    read_revocation_list(&read(&ca.join("ca.pem")), &read(&ca.join("crl.pem"))).unwrap()
}

fn serial_of(cert: &Path) -> String {
    let der = protocol::pki::certs_from_pem(&read(cert), "cert").unwrap().remove(0);
    let (_, c) = x509_parser::parse_x509_certificate(&der).unwrap();
    hex::encode(c.raw_serial())
}

fn days_from_now(t: i64) -> f64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    (t - now) as f64 / 86_400.0
}

/// An in-memory TLS handshake between the two configurations; the first side's error, in
/// words, if it fails.
fn handshake(server: rustls::ServerConfig, client: rustls::ClientConfig) -> Result<(), String> {
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut s = rustls::ServerConnection::new(Arc::new(server)).unwrap();
    let mut c = rustls::ClientConnection::new(Arc::new(client), name).unwrap();
    let words = |side: &str, e: rustls::Error| format!("{side}: {}", protocol::pki::describe_tls_error(&e));
    for _ in 0..10 {
        let mut buf = Vec::new();
        c.write_tls(&mut buf).unwrap();
        s.read_tls(&mut buf.as_slice()).unwrap();
        s.process_new_packets().map_err(|e| words("server", e))?;
        buf.clear();
        s.write_tls(&mut buf).unwrap();
        c.read_tls(&mut buf.as_slice()).unwrap();
        c.process_new_packets().map_err(|e| words("client", e))?;
        if !s.is_handshaking() && !c.is_handshaking() {
            return Ok(());
        }
    }
    Err("handshake did not finish".into())
}

#[test]
fn revoke_crl_and_revoked_maintain_a_signed_list() {
    let d = tempfile::tempdir().unwrap();
    let ca = d.path().join("ca");
    let s = ca.to_str().unwrap();
    ca_with(&ca, &[("alice", "domain-manager"), ("bob", "domain-manager"), ("ttp-1", "ttp")]);

    // init: an empty, valid list number 1, public.
    let crl_path = ca.join("crl.pem");
    assert_eq!(mode(&crl_path), 0o644);
    let l = crl_of(&ca);
    assert_eq!(l.crl_number, 1);
    assert!(l.revoked.is_empty());
    let days = days_from_now(l.next_update.unwrap().unix_timestamp());
    assert!((29.9..30.1).contains(&days), "{days}");

    // revoke alice.
    let alice = ca.join("alice.pem");
    let alice_serial = serial_of(&alice);
    let out = ok(&revoke(s, &alice, &["--reason", "key-compromise"]));
    for want in [
        "revoked alice",
        alice_serial.as_str(),
        "reason key-compromise",
        "CRL number 2",
        "next update: ",
        "refuse this certificate within 2 s",
    ] {
        assert!(out.contains(want), "lacks {want:?}: {out}");
    }
    let l = crl_of(&ca);
    assert_eq!(l.crl_number, 2);
    assert_eq!(l.revoked.len(), 1);
    let entry = l.find(&alice_serial).unwrap();
    assert_eq!(entry.reason, Some(RevocationReason::KeyCompromise));
    assert_eq!(mode(&crl_path), 0o644);
    assert!(!ca.join(".crl.pem.tmp").exists());

    // Again: refused, list untouched.
    let before = std::fs::read(&crl_path).unwrap();
    let err = refused(&revoke(s, &alice, &[]));
    assert!(
        err.contains("is already revoked: since ")
            && err.contains("reason key-compromise")
            && err.contains("nothing changed"),
        "{err}"
    );
    assert_eq!(std::fs::read(&crl_path).unwrap(), before);

    // A certificate of another CA: refused, list untouched.
    let other = d.path().join("other");
    ca_with(&other, &[("mallory", "domain-manager")]);
    let err = refused(&revoke(s, &other.join("mallory.pem"), &[]));
    assert!(err.contains("cannot revoke") && err.contains("not issued by this CA"), "{err}");
    assert_eq!(std::fs::read(&crl_path).unwrap(), before);
    assert!(!ca.join(".crl.pem.tmp").exists());

    // An unknown reason: clap lists the valid ones.
    let err = refused(&revoke(s, &ca.join("bob.pem"), &["--reason", "stolen"]));
    assert!(err.contains("cessation-of-operation"), "{err}");

    // crl: next number, same entries, fresh next update (5 days: warned about).
    let o = cp(&["ca", "crl", "--dir", s, "--days", "5"]);
    let out = ok(&o);
    assert!(out.contains("CRL number 3"), "{out}");
    let warn = String::from_utf8_lossy(&o.stderr);
    assert!(warn.contains("expires in") && warn.contains("ca crl --dir"), "{warn}");
    let l = crl_of(&ca);
    assert_eq!(l.crl_number, 3);
    assert_eq!(l.revoked.len(), 1);
    assert_eq!(l.find(&alice_serial).unwrap().reason, Some(RevocationReason::KeyCompromise));
    assert_eq!(l.find(&alice_serial).unwrap().revoked_at, entry.revoked_at, "re-signing keeps the revocation time");
    let days = days_from_now(l.next_update.unwrap().unix_timestamp());
    assert!((4.9..5.1).contains(&days), "{days}");

    // revoked: the table.
    let out = ok(&cp(&["ca", "revoked", "--dir", s]));
    assert!(out.contains(&alice_serial) && out.contains("key-compromise") && out.contains("number 3"), "{out}");
    assert!(!out.contains(&serial_of(&ca.join("bob.pem"))), "{out}");

    // Verifiers: the revoked signer is refused, the other one accepted.
    let ca_pem = read(&ca.join("ca.pem"));
    let crl_pem = read(&crl_path);
    let der =
        |name: &str| protocol::pki::certs_from_pem(&read(&ca.join(format!("{name}.pem"))), "cert").unwrap().remove(0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let crls = [crl_pem.clone()];
    let cas = [ca_pem.clone()];
    let e = protocol::signing::verify_signer_certificate(&der("alice"), &cas, &crls, now).unwrap_err().to_string();
    assert!(e.contains("certificate is revoked"), "{e}");
    protocol::signing::verify_signer_certificate(&der("bob"), &cas, &crls, now).unwrap();

    // And TLS: a server with the list refuses alice's client certificate, accepts bob's.
    let server = || {
        protocol::pki::server_config(
            &cas,
            &crls,
            &read(&ca.join("ttp-1.pem")),
            &read(&ca.join("ttp-1-key.pem")),
            &[Role::DomainManager],
        )
        .unwrap()
    };
    let client = |name: &str| {
        protocol::pki::client_config(
            &cas,
            &crls,
            &read(&ca.join(format!("{name}.pem"))),
            &read(&ca.join(format!("{name}-key.pem"))),
            Role::Ttp,
        )
        .unwrap()
    };
    let e = handshake(server(), client("alice")).unwrap_err();
    assert!(e.contains("server: ") && e.contains("certificate is revoked"), "{e}");
    handshake(server(), client("bob")).unwrap();
}

#[test]
fn revoke_works_for_a_ca_without_a_list_and_checks_the_key_mode() {
    let d = tempfile::tempdir().unwrap();
    let ca = d.path().join("ca");
    let s = ca.to_str().unwrap();
    ca_with(&ca, &[("compute-07", "secure-component")]);
    // A CA made before revocation lists: no crl.pem.
    std::fs::remove_file(ca.join("crl.pem")).unwrap();
    let err = refused(&cp(&["ca", "revoked", "--dir", s]));
    assert!(err.contains("has no revocation list yet") && err.contains("ca crl --dir"), "{err}");

    let cert = ca.join("compute-07.pem");
    std::fs::set_permissions(ca.join("ca-key.pem"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = refused(&revoke(s, &cert, &[]));
    assert!(err.contains("chmod 600"), "{err}");
    assert!(!ca.join("crl.pem").exists() && !ca.join(".crl.pem.tmp").exists());
    std::fs::set_permissions(ca.join("ca-key.pem"), std::fs::Permissions::from_mode(0o600)).unwrap();

    let out = ok(&revoke(s, &cert, &[]));
    assert!(out.contains("reason unspecified") && out.contains("CRL number 1"), "{out}");
    let l = crl_of(&ca);
    assert_eq!(l.crl_number, 1);
    // RFC 5280: the reason code "unspecified" is left out of the entry.
    let entry = l.find(&serial_of(&cert)).unwrap();
    assert!(matches!(entry.reason, None | Some(RevocationReason::Unspecified)), "{entry:?}");

    // An interrupted run leaves the lock behind: refused with what to do.
    std::fs::write(ca.join(".crl.pem.tmp"), "").unwrap();
    let err = refused(&cp(&["ca", "crl", "--dir", s]));
    assert!(err.contains(".crl.pem.tmp exists") && err.contains("remove that file"), "{err}");
    assert_eq!(crl_of(&ca).crl_number, 1);
    std::fs::remove_file(ca.join(".crl.pem.tmp")).unwrap();
    assert!(ok(&cp(&["ca", "crl", "--dir", s])).contains("CRL number 2"));

    let help = ok(&cp(&["ca", "revoke", "--help"]));
    for want in ["key-compromise", "within 2 s", "Examples"] {
        assert!(help.contains(want), "help lacks {want}: {help}");
    }
}
