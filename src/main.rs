//! `skydd`: the all-in-one launcher. `skydd demo` tells Skydd's story on a loopback lab
//! (a cloud CA, a TTP, two compute hosts with their own swtpm, domain managers).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use net::Role;
use protocol::attest::PcrSelection;
use protocol::domain::AccessMode;
use skydd::lab::{register, DomainManager, LabHost, LabPki, RunningTtp};
use ttp::attestation::AttestationPolicy;

#[derive(Parser)]
#[command(name = "skydd", about = "Skydd all-in-one: domain-based storage protection on one machine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the story on a fresh loopback lab: enroll TPM hosts, create a domain, release its
    /// key only to attested hosts for VMs in its access list, show refusals and the history.
    Demo {
        /// Where the lab keeps its CA, TTP data and TPM state (default: a new temporary dir).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

fn step(n: usize, text: &str) {
    println!("\n[{n}] {text}");
}

fn proves(text: &str) {
    println!("    proves: {text}");
}

#[tokio::main]
async fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Demo { dir } => {
            let temp = tempfile::tempdir()?;
            let root = dir.unwrap_or_else(|| temp.path().to_path_buf());
            demo(&root).await
        }
    }
}

async fn demo(root: &std::path::Path) -> Result<()> {
    step(1, "A cloud CA issues certificates to the TTP, the cloud platform, two compute hosts and two domain managers");
    let pki = LabPki::create(&root.join("pki"))?;
    let (listener, ttp_url) = RunningTtp::bind().await?;
    let vendor_ca = root.join("tpm-vendor-ca");
    let host_a = LabHost::start(root, &pki, "compute-1", &vendor_ca, &ttp_url).context("start compute-1 with its swtpm")?;
    let host_b = LabHost::start(root, &pki, "compute-2", &vendor_ca, &ttp_url).context("start compute-2 with its swtpm")?;
    let selection = PcrSelection::default_host();
    let policy = AttestationPolicy {
        trusted_ek_roots: secure_component::swtpm::ca_certificates_der(&vendor_ca)?,
        ek_intermediates: Vec::new(),
        reference_states: vec![host_a.reference_state("compute-v1", &selection).await?],
    };
    let ttp = RunningTtp::start(root, &pki, &policy, listener).await?;
    pki.issue(Role::CloudPlatform, "cloud-platform")?;
    let cp = pki.client("cloud-platform", Role::Ttp, &ttp.url)?;
    let alice = DomainManager::create(&pki, "dm-alice")?;
    let mallory = DomainManager::create(&pki, "dm-mallory")?;
    proves("every link below is mutual TLS 1.3; each certificate carries its role");

    step(2, "Both compute hosts enroll their TPMs with the TTP");
    for host in [&host_a, &host_b] {
        let enrolled = host.agent.enroll(&selection).await?;
        println!("    {} enrolled: EK {}…, reference state {}", enrolled.host_id, &enrolled.ek_fingerprint[..16], enrolled.reference_state);
    }
    proves("EK certificate chains to the TPM vendor CA, the AK sits in that TPM, the binding key is PCR-bound");

    step(3, "dm-alice creates a domain: patient records, vm-a read-write, vm-b read-only");
    let descriptor = alice.new_domain(&[("department", "cardiology"), ("classification", "patient-records")], &[("vm-a", AccessMode::Rw), ("vm-b", AccessMode::Ro)])?;
    let header = register(&cp, alice.sign_descriptor(&descriptor)?, None).await?;
    println!("    domain {} registered at the TTP (version 1)", descriptor.domain_id);
    proves("the cloud platform forwarded a descriptor it cannot alter: the TTP checked dm-alice's signature");

    step(4, "compute-1 obtains the key for vm-a (rw); compute-2 for vm-b (ro)");
    let grant = alice.grant(&descriptor.domain_id, "vm-a", AccessMode::Rw, 300);
    let (key_a, release) = host_a.agent.obtain_key(&header, &grant, "vm-a", AccessMode::Rw).await?;
    println!("    compute-1 holds a {}-byte key (audit record {})", key_a.len(), release.audit_seq);
    let grant = alice.grant(&descriptor.domain_id, "vm-b", AccessMode::Ro, 300);
    let (key_b, _) = host_b.agent.obtain_key(&header, &grant, "vm-b", AccessMode::Ro).await?;
    if !key_a.ct_eq(key_b.expose()) {
        bail!("the two hosts derived different keys for one domain");
    }
    proves("the key left the TTP only encrypted to each host's TPM and was decrypted inside it");

    step(5, "Refusals");
    let grant = alice.grant(&descriptor.domain_id, "vm-b", AccessMode::Rw, 300);
    report(host_b.agent.obtain_key(&header, &grant, "vm-b", AccessMode::Rw).await, "vm-b asks for read-write")?;
    let grant = alice.grant(&descriptor.domain_id, "vm-x", AccessMode::Ro, 300);
    report(host_a.agent.obtain_key(&header, &grant, "vm-x", AccessMode::Ro).await, "vm-x is not in the access list")?;
    let grant = mallory.grant(&descriptor.domain_id, "vm-a", AccessMode::Rw, 300);
    report(host_a.agent.obtain_key(&header, &grant, "vm-a", AccessMode::Rw).await, "dm-mallory signs a grant")?;
    host_b.agent.tpm.run(|tpm| tpm.extend_pcr(16, b"unapproved kernel module")).await?;
    let grant = alice.grant(&descriptor.domain_id, "vm-b", AccessMode::Ro, 300);
    report(host_b.agent.obtain_key(&header, &grant, "vm-b", AccessMode::Ro).await, "compute-2's measured state changed")?;

    step(6, "dm-alice reads the viewing history (hash-chained, verified on every read)");
    let alice_client = pki.client("dm-alice", Role::Ttp, &ttp.url)?;
    let history: protocol::messages::HistoryResponse = alice_client.get_json(&format!("/v1/domains/{}/history", descriptor.domain_id)).await?;
    for record in &history.records {
        println!(
            "    #{:<3} {:<12} {:<28} {} {}",
            record.seq,
            record.event,
            record.outcome,
            record.vm_id.as_deref().unwrap_or("-"),
            record.host_id.as_deref().unwrap_or("-")
        );
    }
    proves("every release and every refusal is on record, and a removed or edited record would be detected");
    ttp.stop().await;
    println!("\nDemo complete.");
    Ok(())
}

fn report<T>(result: secure_component::Result<T>, what: &str) -> Result<()> {
    match result {
        Err(secure_component::Error::TtpRefused { code, message, .. }) => {
            println!("    {what}: refused ({code}): {message}");
            Ok(())
        }
        Err(other) => bail!("{what}: expected a TTP refusal, got: {other}"),
        Ok(_) => bail!("{what}: the TTP released a key it must refuse"),
    }
}
