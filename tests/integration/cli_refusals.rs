//! Every refusal of the trust core that a domain manager can reach through the CLI gives a
//! message a domain manager understands: the party, the code, what exactly failed, and what
//! to do. The CLI prints `error: {Error}` of the domain-manager library used here.

use domain_manager::config::DmConfig;
use domain_manager::ops::DomainManager;
use protocol::domain::AccessMode;
use skydd::cloud::{AllInOne, DEMO_LAYOUT};

fn expect_refusal<T: std::fmt::Debug>(result: domain_manager::Result<T>, code: &str, must_mention: &[&str]) {
    let error = result.expect_err("the cloud must refuse");
    let text = error.to_string();
    println!("--- {code}\nerror: {text}");
    assert_eq!(error.code(), Some(code), "{text}");
    for needle in must_mention {
        assert!(text.contains(needle), "the message for {code} does not mention {needle:?}:\n{text}");
    }
    assert!(text.contains("what to do:"), "the message for {code} gives no next step:\n{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_read_well_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = AllInOne::start(dir.path(), &DEMO_LAYOUT, &mut |line| println!(".. {line}")).await.unwrap();
    let alice = DomainManager::connect(&DmConfig::load(&cloud.manager_config("dm-alice").unwrap()).unwrap()).unwrap();
    let bob = DomainManager::connect(&DmConfig::load(&cloud.manager_config("dm-bob").unwrap()).unwrap()).unwrap();

    let acl = vec![
        domain_manager::ops::parse_acl_entry("vm-a:rw").unwrap(),
        domain_manager::ops::parse_acl_entry("vm-b:ro").unwrap(),
    ];
    let domain = alice.create(Default::default(), acl, Vec::new(), 16 << 20).await.unwrap();
    let id = domain.id.clone();

    expect_refusal(
        alice.attach(&id, "vm-c", AccessMode::Ro, 300).await,
        "vm_not_in_acl",
        &["vm-c", &id, "domain-manager domain grant"],
    );
    expect_refusal(
        alice.attach(&id, "vm-b", AccessMode::Rw, 300).await,
        "mode_not_permitted",
        &["vm-b", "ro", "--mode ro"],
    );
    // The cloud platform refuses a manager the domain is not shared with before the TTP is asked.
    expect_refusal(bob.attach(&id, "vm-a", AccessMode::Rw, 300).await, "forbidden", &["dm-bob", "shared with"]);
    let not_owner = bob.revoke(&id, "vm-b").await.expect_err("only the owner changes the access list").to_string();
    // ... and says so without naming the domain's owner to someone who does not manage it.
    assert!(not_owner.contains("dm-bob") && !not_owner.contains("dm-alice"), "{not_owner}");

    // A compute host whose measured state changed: the TTP refuses its quote.
    let compute_2 = cloud.hosts.iter().find(|h| h.id == "compute-2").unwrap();
    compute_2.service.attested_host().tpm.run(|tpm| tpm.extend_pcr(11, b"unapproved module")).await.unwrap();
    expect_refusal(
        alice.attach(&id, "vm-b", AccessMode::Ro, 300).await,
        "pcr_mismatch",
        &["PCR 11", "compute-2-measured", "re-enroll"],
    );

    alice.delete(&id).await.unwrap();
    let after = alice.attach(&id, "vm-a", AccessMode::Rw, 300).await;
    let text = after.expect_err("a deleted domain cannot be attached").to_string();
    println!("--- deleted\nerror: {text}");
    assert!(text.contains("domain_deleted") && text.contains(&id), "{text}");
    cloud.stop().await;
}
