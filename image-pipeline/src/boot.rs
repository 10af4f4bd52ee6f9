//! A bootable image (profiles with `boot = true`): an EFI system partition holding
//! systemd-boot, the Debian kernel and initramfs from the image, and one loader entry whose
//! command line names the root file system by its fixed UUID (and turns AppArmor on).
//! FAT is made with `mkfs.fat --invariant` (fixed serial and times) and filled with mtools
//! (file times from the clamped tree; SOURCE_DATE_EPOCH for the rest).

use std::path::{Path, PathBuf};

use crate::disk;
use crate::error::{fsx, Error, Result};
use crate::process::run;
use crate::profile::Profile;
use crate::tree::at;

fn newest(root: &Path, dir: &str, prefix: &str) -> Result<PathBuf> {
    let host = at(root, dir);
    let mut names: Vec<String> = std::fs::read_dir(&host)
        .map_err(|e| Error::io("read", &host, e))?
        .filter_map(|e| e.ok().and_then(|e| e.file_name().to_str().map(str::to_string)))
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names.pop().map(|n| host.join(n)).ok_or_else(|| {
        Error::parse(format!("{dir} in the image"), format!("no {prefix}* (is linux-image-amd64 installed?)"))
    })
}

/// The kernel command line of a profile.
pub fn cmdline(role: &str, profile: &Profile) -> String {
    let uuid = disk::uuid_string(&disk::derived_uuid(&format!("{role}/rootfs")));
    let mut line = format!("root=UUID={uuid} ro rootfstype=ext4");
    if profile.hardening.apparmor {
        line.push_str(" apparmor=1 security=apparmor");
    }
    if !profile.image.kernel_cmdline.is_empty() {
        line.push(' ');
        line.push_str(&profile.image.kernel_cmdline);
    }
    line
}

/// Makes the FAT EFI system partition image `esp` for a bootable profile: systemd-boot as
/// `EFI/BOOT/BOOTX64.EFI`, the newest kernel and initramfs from `root`'s `/boot`, `loader.conf` and
/// one entry `skydd.conf` with [`cmdline`]. Sized from the files (+20 % and 32 MiB), serial derived
/// from the role and all times at `epoch`, so the partition is reproducible
/// (docs/IMAGE-PIPELINE.md, "Stage 1: creation", step 5). `work` holds the staging files.
pub fn make_esp(root: &Path, esp: &Path, role: &str, profile: &Profile, epoch: u64, work: &Path) -> Result<()> {
    let kernel = newest(root, "/boot", "vmlinuz-")?;
    let initrd = newest(root, "/boot", "initrd.img-")?;
    let efi = at(root, "/usr/lib/systemd/boot/efi/systemd-bootx64.efi");
    if !efi.exists() {
        return Err(Error::parse(
            "the image",
            "no /usr/lib/systemd/boot/efi/systemd-bootx64.efi (package systemd-boot-efi)",
        ));
    }
    let staging = work.join("esp-files");
    fsx::create_dir_all(&staging, "ESP staging")?;
    let loader = staging.join("loader.conf");
    fsx::write(&loader, "default skydd.conf\ntimeout 0\neditor no\n", "loader.conf")?;
    let entry = staging.join("skydd.conf");
    fsx::write(
        &entry,
        format!("title Skydd {role}\nlinux /vmlinuz\ninitrd /initrd.img\noptions {}\n", cmdline(role, profile)),
        "loader entry",
    )?;
    for f in [&loader, &entry] {
        crate::tree::set_times(f, epoch)?;
    }
    let bytes: u64 = [&kernel, &initrd, &efi].iter().map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)).sum();
    let size_mib = (bytes * 12 / 10).div_ceil(disk::MIB) + 32;
    let serial = &hex::encode(disk::derived_uuid(&format!("{role}/esp")))[..8];
    let esp_s = esp.display().to_string();
    let epoch_s = epoch.to_string();
    let env = [("SOURCE_DATE_EPOCH", epoch_s.as_str()), ("MTOOLS_SKIP_CHECK", "1"), ("LC_ALL", "C")];
    let _ = fsx::remove_file_if_exists(esp, "old ESP image")?;
    run(
        "boot",
        "mkfs.fat",
        &["--invariant", "-F", "32", "-i", serial, "-n", "ESP", "-C", &esp_s, &(size_mib * 1024).to_string()],
        &env,
    )?;
    run("boot", "mmd", &["-i", &esp_s, "::/EFI", "::/EFI/BOOT", "::/loader", "::/loader/entries"], &env)?;
    let copies: [(&Path, &str); 5] = [
        (&efi, "::/EFI/BOOT/BOOTX64.EFI"),
        (&kernel, "::/vmlinuz"),
        (&initrd, "::/initrd.img"),
        (&loader, "::/loader/loader.conf"),
        (&entry, "::/loader/entries/skydd.conf"),
    ];
    for (src, dst) in copies {
        run("boot", "mcopy", &["-m", "-i", &esp_s, &src.display().to_string(), dst], &env)?;
    }
    Ok(())
}
