//! The K_TTP ceremony end to end, with the real `ttp` binary and a swtpm as the TTP host's
//! TPM (docs/OPERATOR.md "Master key custodians"): `ttp init` seals and splits; the start-up
//! (`ttp::server::build`, what `ttp serve` runs) unseals from the TPM; a changed PCR makes it
//! refuse naming the PCR and `ttp unseal`; t−1 shares derive nothing; t shares typed at the
//! console reseal it; `ttp reseal`; a replica brought up from shares on its own TPM derives
//! the same domain keys; a stolen data directory without the TPM derives nothing; no file
//! of the data directory holds K_TTP in any encoding. Needs swtpm (fails naming it).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use protocol::pki::Role;
use secure_component::swtpm::Swtpm;
use skydd_ca::CertificateAuthority;
use ttp::config::TtpConfig;
use ttp::master_key::{shares, MasterKeyConfig};

mod support;
use support::{identity_files, Ca};

/// A TTP host: its TLS identity, data directory, configuration file and TPM (if any).
struct Host {
    config: TtpConfig,
    config_path: PathBuf,
}

impl Host {
    fn new(dir: &Path, ca: &Ca, name: &str, tpm: Option<&Swtpm>) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let tls = identity_files(dir, ca, Role::Ttp, name);
        let attestation = dir.join("attestation.toml");
        std::fs::write(&attestation, toml::to_string(&ttp::attestation::AttestationPolicy::default()).unwrap())
            .unwrap();
        let config = TtpConfig {
            listen: "127.0.0.1:0".into(),
            data_dir: dir.join("data"),
            ca: tls.ca,
            crl: Vec::new(),
            cert: tls.cert,
            key: tls.key,
            attestation,
            registration_replicas: Vec::new(),
            limits: Default::default(),
            database_url: None,
            database_pool_size: 4,
            group_commit: true,
            master_key: MasterKeyConfig { tpm_tcti: tpm.map(Swtpm::tcti), ..Default::default() },
            trusted_launch: None,
        };
        let config_path = dir.join("ttp.toml");
        let host = Self { config, config_path };
        host.save();
        host
    }

    fn save(&self) {
        std::fs::write(&self.config_path, toml::to_string(&self.config).unwrap()).unwrap();
    }

    /// `ttp ARGS --config CONFIG`, with `stdin` typed in.
    fn ttp(&self, args: &[&str], stdin: &str) -> Output {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ttp"))
            .args(args)
            .arg("--config")
            .arg(&self.config_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    }

    /// What `ttp serve` does at start: the whole build, K_TTP unsealed from the TPM.
    fn start(&self) -> Result<(), String> {
        ttp::server::build(&self.config).map(drop).map_err(|e| e.to_string())
    }
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

fn share_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    files
}

/// Every file under `dir` that holds `key` raw, in hex (either case) or in base64 at any
/// alignment.
fn files_holding(dir: &Path, key: &[u8]) -> Vec<PathBuf> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut patterns = vec![key.to_vec(), hex::encode(key).into_bytes(), hex::encode_upper(key).into_bytes()];
    for shift in 0..3 {
        let encoded = b64.encode([&vec![0u8; shift][..], key].concat());
        // Skip the characters that depend on the padding bytes; the middle is stable.
        patterns.push(encoded.as_bytes()[4..encoded.len() - 4].to_vec());
    }
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        if path.is_dir() {
            stack.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        } else if let Ok(bytes) = std::fs::read(&path) {
            if patterns.iter().any(|p| bytes.windows(p.len()).any(|w| w == p.as_slice())) {
                found.push(path);
            }
        }
    }
    found
}

/// A domain key as any replica derives it from K_TTP `version` after its start-up.
fn domain_key(config: &TtpConfig) -> Vec<u8> {
    let keys = ttp::master_key::unlock(&config.data_dir, &config.master_key, &[]).unwrap();
    let key = keys.key(1).unwrap();
    protocol::kdf::derive_volume_key(key, &[5u8; 32], "0123456789abcdef0123456789abcdef", &[6u8; 32], "aes-xts-plain64")
        .unwrap()
        .expose()
        .to_vec()
}

#[test]
fn master_key_ceremony_with_a_tpm_and_custodians() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::generate("cloud-ca").unwrap();
    let tpm = Swtpm::start(&dir.path().join("tpm-1")).expect("swtpm starts (is the swtpm package installed?)");
    let host = Host::new(&dir.path().join("ttp-1"), &ca, "ttp-1", Some(&tpm));
    let custodians = dir.path().join("custodians");

    // ttp init: sealed to the TPM, split 3 of 5, one file per custodian.
    let init =
        host.ttp(&["init", "--shares", "5", "--threshold", "3", "--share-dir", custodians.to_str().unwrap()], "");
    assert!(init.status.success(), "ttp init: {}", text(&init));
    assert!(text(&init).contains("sealed to this TPM under PCRs [0, 1, 2, 3, 4, 5, 6, 7]"), "{}", text(&init));
    let files = share_files(&custodians);
    assert_eq!(files.len(), 5);
    let all_shares = ttp::master_key::read_share_files(&files).unwrap();
    let k_ttp = shares::combine(&all_shares[..3]).unwrap();
    assert!(
        files_holding(&host.config.data_dir, k_ttp.expose()).is_empty(),
        "no file of the data directory holds K_TTP"
    );

    // Start: auto-unseal. The unseal alone, timed beside the custodians' way (median of 5).
    host.start().expect("the TTP starts, unsealing K_TTP from its TPM");
    ttp::server::build_with_shares(&host.config, &all_shares[..3]).expect("the TTP starts from 3 shares");
    let median = |given: &[ttp::master_key::ShareLine]| {
        let mut times: Vec<f64> = (0..5)
            .map(|_| {
                let started = std::time::Instant::now();
                ttp::master_key::unlock(&host.config.data_dir, &host.config.master_key, given).unwrap();
                started.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        times.sort_by(f64::total_cmp);
        times[2]
    };
    println!(
        "unseal K_TTP at start: TPM (swtpm) {:.2} ms, 3 of 5 shares {:.3} ms",
        median(&[]),
        median(&all_shares[..3])
    );
    let primary_key = domain_key(&host.config);

    // A measured component changed: PCR 7 moves, the TPM refuses, the TTP does not start.
    let mut host_tpm = secure_component::tpm::HostTpm::open(&tpm.tcti(), &dir.path().join("pcr-tool")).unwrap();
    host_tpm.extend_pcr(7, b"a new Secure Boot policy").unwrap();
    drop(host_tpm);
    let refusal = host.start().expect_err("the TPM refuses K_TTP after PCR 7 changed");
    assert!(refusal.contains("PCR 7 (sealed") && refusal.contains("ttp unseal"), "{refusal}");
    assert!(!refusal.contains("PCR 0 ") && !refusal.contains("PCR 6 "), "only the changed PCR is named: {refusal}");

    // t−1 shares derive nothing, and say so.
    let two = host.ttp(&["unseal", "--share", files[0].to_str().unwrap(), "--share", files[1].to_str().unwrap()], "");
    assert!(!two.status.success());
    assert!(text(&two).contains("2 distinct share(s) of K_TTP version 1 given, 3 are needed"), "{}", text(&two));
    assert!(host.start().is_err(), "t-1 shares changed nothing");

    // Three custodians at the console, one with a typo first: the TPM copy is renewed.
    let lines: Vec<String> = files[2..].iter().map(|f| std::fs::read_to_string(f).unwrap()).collect();
    let mut typo = lines[0].trim().to_string();
    typo.insert(30, 'x');
    let typed = format!("{typo}\n{}{}{}", lines[0], lines[1], lines[2]);
    let unseal = host.ttp(&["unseal"], &typed);
    assert!(unseal.status.success(), "ttp unseal: {}", text(&unseal));
    assert!(text(&unseal).contains("checksum does not match"), "the typo is caught: {}", text(&unseal));
    host.start().expect("after `ttp unseal` the TTP starts from its TPM again");
    assert_eq!(domain_key(&host.config), primary_key);

    // ttp reseal: bound to one more PCR from now on.
    let mut config = host.config.clone();
    config.master_key.pcrs.push(9);
    let host = Host { config, config_path: host.config_path.clone() };
    host.save();
    let reseal = host.ttp(&["reseal"], "");
    assert!(reseal.status.success(), "ttp reseal: {}", text(&reseal));
    host.start().expect("resealed K_TTP unseals");
    let mut host_tpm = secure_component::tpm::HostTpm::open(&tpm.tcti(), &dir.path().join("pcr-tool")).unwrap();
    host_tpm.extend_pcr(9, b"an unapproved kernel").unwrap();
    drop(host_tpm);
    assert!(host.start().expect_err("PCR 9 is now covered").contains("PCR 9 (sealed"));

    // A second replica on another TPM, from three other custodians' shares.
    let tpm_2 = Swtpm::start(&dir.path().join("tpm-2")).unwrap();
    let replica = Host::new(&dir.path().join("ttp-2"), &ca, "ttp-2", Some(&tpm_2));
    let from_files: Vec<String> =
        files[1..4].iter().flat_map(|f| ["--share".into(), f.display().to_string()]).collect();
    let args: Vec<&str> = ["unseal"].into_iter().chain(from_files.iter().map(String::as_str)).collect();
    let unseal = replica.ttp(&args, "");
    assert!(unseal.status.success(), "replica's ttp unseal: {}", text(&unseal));
    replica.start().expect("the replica starts from its own TPM");
    assert_eq!(domain_key(&replica.config), primary_key, "the replica derives the same domain keys");
    assert!(files_holding(&replica.config.data_dir, k_ttp.expose()).is_empty());

    // A stolen data directory: without the TPM nothing starts; on another TPM neither.
    let thief = Host::new(&dir.path().join("thief"), &ca, "ttp-1", None);
    copy_dir(&replica.config.data_dir, &thief.config.data_dir);
    let no_tpm = thief.start().expect_err("a stolen data directory without its TPM derives nothing");
    assert!(no_tpm.contains("no copy sealed to a configured TPM"), "{no_tpm}");
    let other = Host::new(&dir.path().join("thief-tpm"), &ca, "ttp-1", Some(&tpm));
    copy_dir(&replica.config.data_dir, &other.config.data_dir);
    let wrong_tpm = other.start().expect_err("the copy sealed to tpm-2 does not load on tpm-1");
    assert!(wrong_tpm.contains("another TPM"), "{wrong_tpm}");
}

#[test]
fn versions_are_counted_and_retired_only_when_unused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::generate("cloud-ca").unwrap();
    let host = Host::new(&dir.path().join("ttp-1"), &ca, "ttp-1", None);
    let custodians = dir.path().join("custodians");
    let dir_arg = custodians.to_str().unwrap();
    // Without a TPM: the data directory alone starts nothing.
    let init = host.ttp(&["init", "--shares", "3", "--threshold", "2", "--share-dir", dir_arg], "");
    assert!(init.status.success(), "{}", text(&init));
    let refusal = host.start().expect_err("no TPM and no shares");
    assert!(refusal.contains("ttp serve --unseal-shares"), "{refusal}");
    // `ttp serve --unseal-shares`: two custodians' files start it.
    let files = share_files(&custodians);
    let mut serve = serve_until_ready(
        &host,
        &["--unseal-shares", files[0].to_str().unwrap(), files[2].to_str().unwrap()],
        &dir.path().join("serve.log"),
    );
    let _ = serve.kill();
    let _ = serve.wait();
    assert!(std::fs::read_to_string(dir.path().join("serve.log")).unwrap().contains("K_TTP unsealed"));
    let new = host.ttp(&["master-key", "new-version", "--shares", "3", "--threshold", "2", "--share-dir", dir_arg], "");
    assert!(new.status.success(), "{}", text(&new));
    let shares = ttp::master_key::read_share_dir(&custodians).unwrap();
    let keys = ttp::master_key::unlock(&host.config.data_dir, &host.config.master_key, &shares).unwrap();
    assert_eq!((keys.versions(), keys.current_version()), (vec![1, 2], 2));

    // A domain registered under version 1 keeps version 1 from being retired.
    let store = host.config.open_store().unwrap();
    use ttp::store::TtpStore;
    store
        .insert_domain(&ttp::store::DomainRecord {
            domain_id: "0123456789abcdef0123456789abcdef".into(),
            owner: "dm-alice".into(),
            latest_version: 1,
            descriptor: b"d".to_vec(),
            descriptor_hash: [1; 32],
            metadata_hash: [2; 32],
            deleted_at: None,
            master_key_version: 1,
            key_generation: 1,
            previous_master_key_version: None,
        })
        .unwrap();
    drop(store);
    let status = host.ttp(&["master-key", "status"], "");
    assert!(status.status.success(), "{}", text(&status));
    let v1_line = String::from_utf8_lossy(&status.stdout).lines().find(|l| l.starts_with("1 ")).unwrap().to_string();
    assert!(v1_line.split_whitespace().any(|w| w == "1") && v1_line.contains("no TPM"), "{v1_line}");
    let retire = host.ttp(&["master-key", "retire", "--version", "1"], "");
    assert!(!retire.status.success());
    assert!(text(&retire).contains("still derives the keys of 1 registered domain(s)"), "{}", text(&retire));
    let store = host.config.open_store().unwrap();
    store.tombstone_domain("0123456789abcdef0123456789abcdef", 1).unwrap();
    drop(store);
    let retire = host.ttp(&["master-key", "retire", "--version", "1"], "");
    assert!(retire.status.success(), "{}", text(&retire));
    let keys = ttp::master_key::unlock(&host.config.data_dir, &host.config.master_key, &shares[3..]).unwrap();
    assert_eq!(keys.versions(), vec![2]);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

/// `ttp serve --config CONFIG ARGS`, once it logs that it serves (its log in `log`).
fn serve_until_ready(host: &Host, args: &[&str], log: &Path) -> std::process::Child {
    let mut serve = Command::new(env!("CARGO_BIN_EXE_ttp"))
        .args(["serve", "--config"])
        .arg(&host.config_path)
        .args(args)
        .stdout(std::fs::File::create(log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !std::fs::read_to_string(log).unwrap_or_default().contains("TTP serving") {
        if std::time::Instant::now() > deadline || serve.try_wait().unwrap().is_some() {
            let _ = serve.kill();
            panic!("ttp serve did not start: {}", std::fs::read_to_string(log).unwrap());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    serve
}

/// Where `needle` occurs in `haystack` (every offset).
fn offsets(haystack: &[u8], needle: &[u8]) -> Vec<usize> {
    haystack.windows(needle.len()).enumerate().filter(|(_, w)| *w == needle).map(|(i, _)| i).collect()
}

/// A core dump of a running `ttp serve` (gcore), searched for K_TTP and its hex: the live
/// key sits in pages marked MADV_DONTDUMP (`protocol::secret`), and no copy lingers (the
/// TSS buffer is scrubbed, the unsealed bytes wiped).
#[test]
fn a_core_dump_of_the_serving_ttp_holds_no_k_ttp() {
    if Command::new("gcore").arg("--version").output().is_err() {
        panic!("needs gdb's gcore");
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = CertificateAuthority::generate("cloud-ca").unwrap();
    let tpm = Swtpm::start(&dir.path().join("tpm")).expect("swtpm starts");
    let host = Host::new(&dir.path().join("ttp-1"), &ca, "ttp-1", Some(&tpm));
    let custodians = dir.path().join("custodians");
    let init =
        host.ttp(&["init", "--shares", "3", "--threshold", "2", "--share-dir", custodians.to_str().unwrap()], "");
    assert!(init.status.success(), "{}", text(&init));
    let k_ttp = shares::combine(&ttp::master_key::read_share_dir(&custodians).unwrap()).unwrap();

    let mut serve = serve_until_ready(&host, &[], &dir.path().join("serve.log"));
    let prefix = dir.path().join("core");
    let gcore = Command::new("gcore").arg("-o").arg(&prefix).arg(serve.id().to_string()).output().unwrap();
    let _ = serve.kill();
    let _ = serve.wait();
    let core = std::fs::read(format!("{}.{}", prefix.display(), serve.id()))
        .unwrap_or_else(|e| panic!("gcore wrote no core ({e}): {}", String::from_utf8_lossy(&gcore.stderr)));
    println!("core dump of ttp serve: {} MiB", core.len() >> 20);
    let data_dir = host.config.data_dir.display().to_string();
    assert!(!offsets(&core, data_dir.as_bytes()).is_empty(), "the dump holds the process's heap (its configuration)");
    let raw = offsets(&core, k_ttp.expose());
    let hex = offsets(&core, hex::encode(k_ttp.expose()).as_bytes());
    assert!(raw.is_empty() && hex.is_empty(), "K_TTP in the core dump: raw at {raw:x?}, hex at {hex:x?}");
}
