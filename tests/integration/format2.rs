//! Format 2 through the real stack (docs/FORMAT.md "Version 2"): the all-in-one cloud's
//! secure component serves a format-2 domain over FUSE + loop + ext4, each fsync in the VM
//! commits a root to the real TTP over mutual TLS, and `domain upgrade` turns a format-1
//! domain with data into a format-2 one without losing it. Prints the flush latency of
//! format 2 (including the TTP commit) beside format 1's, measured in the same run
//! (docs/PERFORMANCE.md "Format 2").
//! Needs root, swtpm, /dev/fuse and /dev/loop-control (the all-in-one cloud).

use std::io::Write;
use std::time::{Duration, Instant};

use domain_manager::config::DmConfig;
use domain_manager::ops::{parse_acl_entry, DomainManager};
use protocol::domain::{AccessMode, VolumeFormat};
use skydd::cloud::{AllInOne, DEMO_LAYOUT};

/// `rounds` × (write 4 KiB at the end of a file + fsync) in `dir`; the fsync latencies.
fn fsync_latencies(dir: &std::path::Path, rounds: usize) -> Vec<Duration> {
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("journal.bin")).unwrap();
    let block = vec![0x42u8; 4096];
    (0..rounds)
        .map(|_| {
            file.write_all(&block).unwrap();
            let started = Instant::now();
            file.sync_all().unwrap();
            started.elapsed()
        })
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn format_2_commits_every_flush_and_upgrade_keeps_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = AllInOne::start(dir.path(), &DEMO_LAYOUT, &mut |line| println!(".. {line}")).await.unwrap();
    let alice = DomainManager::connect(&DmConfig::load(&cloud.manager_config("dm-alice").unwrap()).unwrap()).unwrap();
    let acl = || vec![parse_acl_entry("vm-a:rw").unwrap(), parse_acl_entry("vm-b:ro").unwrap()];
    let v2 = alice.create_with_format(Default::default(), acl(), vec![], 32 << 20, VolumeFormat::V2).await.unwrap();
    let v1 = alice.create(Default::default(), acl(), vec![], 32 << 20).await.unwrap();

    // Flush latency, same run, same VM, same host: format 2 (with its TTP commit) vs format 1.
    let mut figures = Vec::new();
    for domain in [&v2, &v1] {
        alice.attach(&domain.id, "vm-a", AccessMode::Rw, 300).await.unwrap();
        let mount = cloud.vm_mount("vm-a", &domain.id, &DEMO_LAYOUT).unwrap();
        let mut latencies = tokio::task::spawn_blocking(move || fsync_latencies(&mount, 40)).await.unwrap();
        latencies.sort();
        figures.push((percentile(&latencies, 0.5), percentile(&latencies, 0.99)));
        alice.detach(&domain.id, "vm-a").await.unwrap();
    }
    let ((p50_v2, p99_v2), (p50_v1, p99_v1)) = (figures[0], figures[1]);
    println!(
        "fsync of 4 KiB on ext4, 40 rounds: format 2 (incl. TTP commit) p50 {p50_v2:.1?} p99 {p99_v2:.1?}; \
         format 1 p50 {p50_v1:.1?} p99 {p99_v1:.1?}; ratio of p50 {:.2}",
        p50_v2.as_secs_f64() / p50_v1.as_secs_f64()
    );
    let commits = |records: &[protocol::messages::AuditRecord]| {
        records.iter().filter(|r| r.event == "integrity_commit" && r.outcome == "ok").count()
    };
    let v2_history = alice.history(&v2.id).await.unwrap().records;
    assert!(commits(&v2_history) >= 40, "every fsync commits a root: {} commits", commits(&v2_history));
    assert!(v2_history
        .iter()
        .filter(|r| r.event == "integrity_commit")
        .all(|r| r.host_id.as_deref() == Some("compute-1")));
    assert_eq!(commits(&alice.history(&v1.id).await.unwrap().records), 0, "a format-1 domain commits nothing");

    // Upgrade: a format-1 domain with a record becomes format 2; its data stays.
    alice.attach(&v1.id, "vm-a", AccessMode::Rw, 300).await.unwrap();
    let record = cloud.vm_mount("vm-a", &v1.id, &DEMO_LAYOUT).unwrap().join("record.txt");
    std::fs::write(&record, "written under format 1\n").unwrap();
    alice.detach(&v1.id, "vm-a").await.unwrap();
    let upgraded = alice.upgrade(&v1.id).await.unwrap();
    assert_eq!(upgraded.version, 2);
    let again = alice.upgrade(&v1.id).await.unwrap_err().to_string();
    assert!(again.contains("format 2 already"), "{again}");
    // No root yet: a read-only attach cannot check anything and is refused.
    let refused = alice.attach(&v1.id, "vm-b", AccessMode::Ro, 300).await.unwrap_err();
    assert_eq!(refused.code(), Some("integrity_unsupported"), "{refused}");
    // The next read-write attach builds the tree and commits epoch 1.
    alice.attach(&v1.id, "vm-a", AccessMode::Rw, 300).await.unwrap();
    let text = std::fs::read_to_string(&record).unwrap();
    assert_eq!(text, "written under format 1\n");
    alice.detach(&v1.id, "vm-a").await.unwrap();
    let history = alice.history(&v1.id).await.unwrap().records;
    assert!(commits(&history) >= 1, "the upgrade's first root was committed");
    alice.attach(&v1.id, "vm-b", AccessMode::Ro, 300).await.unwrap();
    let vm_b = cloud.vm_mount("vm-b", &v1.id, &DEMO_LAYOUT).unwrap();
    assert_eq!(std::fs::read_to_string(vm_b.join("record.txt")).unwrap(), "written under format 1\n");
    alice.detach(&v1.id, "vm-b").await.unwrap();
}
