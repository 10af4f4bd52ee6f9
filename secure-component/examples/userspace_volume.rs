//! Opens a volume with the userspace backend, puts ext4 on it and mounts it, then waits
//! for a line (or EOF) on stdin and tears everything down. Used by scripts/fio-compare.sh.
//!
//! usage: userspace_volume VOLUME_FILE SIZE_MIB MOUNT_DIR STATE_DIR
//! Creates VOLUME_FILE (sparse, header area + SIZE_MIB of data) if it does not exist. The
//! key is random and lives only in this process: the volume is a throwaway.

use std::io::BufRead;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use protocol::format;
use protocol::secret::SecretBytes;
use secure_component::volume::userspace::UserspaceBackend;
use secure_component::volume::{filesystem, OpenMode, VolumeBackend};

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
    let backend = UserspaceBackend::new(&args[4])?;
    let v = backend.open("fio-bench", &volume, &key, OpenMode::ReadWrite)?;
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
