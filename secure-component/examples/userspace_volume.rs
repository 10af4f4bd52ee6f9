//! Opens a volume with the userspace backend, puts ext4 on it and mounts it, then waits
//! for a line (or EOF) on stdin and tears everything down. Used by scripts/fio-compare.sh.
//!
//! usage: userspace_volume VOLUME_FILE SIZE_MIB MOUNT_DIR STATE_DIR
//! Creates VOLUME_FILE (sparse, header area + SIZE_MIB of data) if it does not exist. The
//! key is random and lives only in this process: the volume is a throwaway. SKYDD_FORMAT=2
//! makes it format 2 (tags, tree, a root committed at every flush); SKYDD_FUSE_THREADS=N
//! serves it with N FUSE threads.

use std::io::BufRead;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use protocol::format;
use protocol::secret::SecretBytes;
use secure_component::volume::userspace::UserspaceBackend;
use secure_component::volume::{filesystem, IntegrityOpen, OpenMode, VolumeBackend};

/// Accepts each next epoch, as the TTP does.
#[derive(Default)]
struct EpochKeeper(std::sync::atomic::AtomicU64);

impl skydd_volume::integrity::Authority for EpochKeeper {
    fn commit(&self, epoch: u64, _root: &[u8; 32]) -> Result<(), String> {
        use std::sync::atomic::Ordering;
        self.0
            .compare_exchange(epoch - 1, epoch, Ordering::SeqCst, Ordering::SeqCst)
            .map(|_| ())
            .map_err(|last| format!("epoch {epoch} after {last}"))
    }
    fn report(&self, kind: skydd_volume::ViolationKind, sector: Option<u64>) {
        eprintln!("integrity violation {kind:?} at {sector:?}");
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        return Err("usage: userspace_volume VOLUME_FILE SIZE_MIB MOUNT_DIR STATE_DIR".into());
    }
    let volume = PathBuf::from(&args[1]);
    let mib: u64 = args[2].parse()?;
    let mnt = PathBuf::from(&args[3]);
    if !volume.exists() {
        let f = std::fs::File::create(&volume)?;
        f.write_all_at(&format::new_header_area(b"fio throwaway volume")?, 0)?;
        f.set_len(format::DATA_OFFSET + (mib << 20))?;
    }
    let mut key = SecretBytes::zeroed(64);
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, key.expose_mut())?;
    // SKYDD_FUSE_THREADS: FUSE event-loop threads (default: the backend's).
    let mut backend = UserspaceBackend::new(&args[4])?;
    if let Some(threads) = std::env::var("SKYDD_FUSE_THREADS").ok().and_then(|n| n.parse().ok()) {
        backend = backend.with_fuse_threads(threads);
    }
    // SKYDD_FORMAT=2: the volume is format 2 (docs/FORMAT.md "Version 2"), its roots committed
    // to an in-process stand-in for the TTP that keeps the epoch rule (the TTP's own cost is
    // measured by the flush-latency benchmark).
    let v = if std::env::var("SKYDD_FORMAT").as_deref() == Ok("2") {
        let mut mac_key = SecretBytes::zeroed(32);
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, mac_key.expose_mut())?;
        let integrity = IntegrityOpen {
            mac_key,
            domain_id: "00000000000000000000000000f10b0e".into(),
            anchor: None,
            authority: std::sync::Arc::new(EpochKeeper::default()),
        };
        backend.open_authenticated("fio-bench", &volume, &key, integrity, OpenMode::ReadWrite)?
    } else {
        backend.open("fio-bench", &volume, &key, OpenMode::ReadWrite)?
    };
    drop(key);
    filesystem::ensure_ext4(&v.device)?;
    secure_component::hypervisor::local::mount_ext4(&v.device, &mnt, OpenMode::ReadWrite)?;
    println!("READY {}", v.device.display());
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    filesystem::unmount(&mnt)?;
    backend.close("fio-bench")?;
    println!("CLOSED");
    Ok(())
}
