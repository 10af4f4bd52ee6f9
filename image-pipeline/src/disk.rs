//! From a root tree to reproducible disk images: an ext4 file system made by mke2fs -d with
//! fixed features, UUID, hash seed and time, normalised with debugfs (ctime/atime of every
//! inode set to SOURCE_DATE_EPOCH: mke2fs copies them from the unpacked tree), then a GPT disk
//! written here byte by byte (fixed GUIDs derived from the role), then qcow2 with qemu-img.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::{fsx, Error, Result};
use crate::process::run;

/// GPT logical sector size in bytes: LBAs in the headers and partition entries count in these.
pub const SECTOR: u64 = 512;
/// One mebibyte in bytes: partition alignment and the unit of `disk_size_mib`.
pub const MIB: u64 = 1024 * 1024;
/// GPT partition type of a Linux x86-64 root file system (Discoverable Partitions Spec).
pub const ROOT_X86_64: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";
/// GPT partition type of an EFI system partition.
pub const ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";

const MKE2FS_CONF: &str = "[defaults]\n\tbase_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr\n\tdefault_mntopts = acl,user_xattr\n\tblocksize = 4096\n\tinode_size = 256\n\tinode_ratio = 16384\n\n[fs_types]\n\text4 = {\n\t\tfeatures = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize\n\t}\n";

/// A deterministic UUID (RFC 4122 version 4 layout) from a label.
pub fn derived_uuid(label: &str) -> [u8; 16] {
    let digest = Sha256::digest(format!("skydd/image-pipeline/uuid/{label}").as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    b
}

/// Formats 16 bytes as a lowercase UUID string (`8-4-4-4-12`), e.g. for `root=UUID=` and
/// `mke2fs -U`.
pub fn uuid_string(b: &[u8; 16]) -> String {
    let h = hex::encode(b);
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// GUID string → the mixed-endian bytes GPT stores.
fn guid_bytes(s: &str) -> Result<[u8; 16]> {
    let hexs: String = s.chars().filter(|c| *c != '-').collect();
    let raw = hex::decode(&hexs).map_err(|e| Error::parse(format!("GUID {s}"), e.to_string()))?;
    if raw.len() != 16 {
        return Err(Error::parse(format!("GUID {s}"), "not 16 bytes"));
    }
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&[raw[3], raw[2], raw[1], raw[0]]);
    b[4..6].copy_from_slice(&[raw[5], raw[4]]);
    b[6..8].copy_from_slice(&[raw[7], raw[6]]);
    b[8..16].copy_from_slice(&raw[8..16]);
    Ok(b)
}

/// Size of the root file system: the content with 30 % and 64 MiB of room, in 64 MiB steps.
pub fn auto_size_mib(root: &Path) -> Result<u64> {
    let mut bytes: u64 = 0;
    for entry in crate::tree::walk(root)? {
        bytes += entry.meta.len().div_ceil(4096) * 4096 + 256;
    }
    let mib = (bytes * 13 / 10).div_ceil(MIB) + 64;
    Ok(mib.div_ceil(64) * 64)
}

/// Makes a reproducible ext4 image of `root` at `out`.
pub fn make_ext4(
    root: &Path,
    out: &Path,
    size_mib: u64,
    label: &str,
    uuid_label: &str,
    epoch: u64,
    work: &Path,
) -> Result<()> {
    let conf = work.join("mke2fs.conf");
    fsx::write(&conf, MKE2FS_CONF, "mke2fs.conf")?;
    let _ = fsx::remove_file_if_exists(out, "old file system image")?;
    let uuid = uuid_string(&derived_uuid(uuid_label));
    let epoch_s = epoch.to_string();
    let env = [
        ("E2FSPROGS_FAKE_TIME", epoch_s.as_str()),
        ("MKE2FS_CONFIG", conf.to_str().unwrap_or_default()),
        ("LC_ALL", "C"),
    ];
    run(
        "mkfs-ext4",
        "mke2fs",
        &[
            "-q",
            "-F",
            "-t",
            "ext4",
            "-L",
            label,
            "-U",
            &uuid,
            "-E",
            &format!("hash_seed={uuid},root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0,nodiscard"),
            "-d",
            &root.display().to_string(),
            &out.display().to_string(),
            &format!("{size_mib}M"),
        ],
        &env,
    )?;
    // mke2fs copies atime/ctime from the unpacked files (ctime cannot be set on the host):
    // set both to the epoch for every inode in use.
    let dump = run("inode-map", "dumpe2fs", &[&out.display().to_string()], &env)?;
    let used = used_inodes(&dump)?;
    let mut script = String::new();
    for ino in used.into_iter().filter(|i| *i == 2 || *i >= 11) {
        script.push_str(&format!("sif <{ino}> ctime {epoch}\nsif <{ino}> atime {epoch}\n"));
    }
    let script_path = work.join("debugfs-normalise.cmds");
    fsx::write(&script_path, script, "debugfs script")?;
    run(
        "normalise-inode-times",
        "debugfs",
        &["-w", "-f", &script_path.display().to_string(), &out.display().to_string()],
        &env,
    )?;
    run("fsck", "e2fsck", &["-f", "-n", &out.display().to_string()], &env)?;
    Ok(())
}

/// Inodes in use, from dumpe2fs's per-group "Free inodes:" ranges.
pub fn used_inodes(dump: &str) -> Result<Vec<u64>> {
    let field = |name: &str| -> Result<u64> {
        dump.lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().parse::<u64>()))
            .ok_or_else(|| Error::parse("dumpe2fs output", format!("no {name}")))?
            .map_err(|e| Error::parse("dumpe2fs output", format!("{name} {e}")))
    };
    let count = field("Inode count:")?;
    let per_group = field("Inodes per group:")?;
    let mut free = vec![false; count as usize + 1];
    let mut group = 0u64;
    for line in dump.lines() {
        // Group sections are indented; the superblock's "Free inodes: N" count is not.
        if !line.starts_with(char::is_whitespace) {
            continue;
        }
        let line = line.trim();
        if let Some(ranges) = line.strip_prefix("Free inodes:") {
            for range in ranges.split(',').map(str::trim).filter(|r| !r.is_empty()) {
                let (a, b) = range.split_once('-').unwrap_or((range, range));
                let a: u64 = a.parse().map_err(|_| Error::parse("dumpe2fs free inodes", range.to_string()))?;
                let b: u64 = b.parse().map_err(|_| Error::parse("dumpe2fs free inodes", range.to_string()))?;
                for i in a..=b.min(count) {
                    free[i as usize] = true;
                }
            }
            group += 1;
        }
    }
    if group * per_group != count {
        return Err(Error::parse(
            "dumpe2fs output",
            format!("saw {group} groups of {per_group} inodes, expected {count} inodes"),
        ));
    }
    Ok((1..=count).filter(|i| !free[*i as usize]).collect())
}

/// A partition to place on the disk.
pub struct PartitionSpec<'a> {
    /// The partition's contents (a file system image), copied into the disk at the next 1 MiB
    /// boundary.
    pub image: &'a Path,
    /// GPT partition type GUID, e.g. [`ROOT_X86_64`] or [`ESP`].
    pub type_guid: &'a str,
    /// GPT partition name (UTF-16, at most 36 code units), e.g. `root` or `ESP`.
    pub name: &'a str,
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &byte in data {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// Writes a GPT disk image holding `parts` (each aligned to 1 MiB), with GUIDs derived from
/// `label`. Returns the disk size in bytes.
pub fn write_gpt_disk(out: &Path, parts: &[PartitionSpec<'_>], label: &str) -> Result<u64> {
    let mut layout = Vec::new();
    let mut next = MIB;
    for p in parts {
        let len = std::fs::metadata(p.image).map_err(|e| Error::io("stat partition image", p.image, e))?.len();
        let len = len.div_ceil(MIB) * MIB;
        layout.push((next, len));
        next += len;
    }
    let total = next + MIB;
    let last_lba = total / SECTOR - 1;
    let mut entries = vec![0u8; 128 * 128];
    for (i, (p, (start, len))) in parts.iter().zip(&layout).enumerate() {
        let e = &mut entries[i * 128..(i + 1) * 128];
        e[0..16].copy_from_slice(&guid_bytes(p.type_guid)?);
        e[16..32].copy_from_slice(&guid_bytes(&uuid_string(&derived_uuid(&format!("{label}/partition/{i}"))))?);
        e[32..40].copy_from_slice(&(start / SECTOR).to_le_bytes());
        e[40..48].copy_from_slice(&((start + len) / SECTOR - 1).to_le_bytes());
        for (j, unit) in p.name.encode_utf16().take(36).enumerate() {
            e[56 + 2 * j..58 + 2 * j].copy_from_slice(&unit.to_le_bytes());
        }
    }
    let entries_crc = crc32(&entries);
    let disk_guid = guid_bytes(&uuid_string(&derived_uuid(&format!("{label}/disk"))))?;
    let header = |current: u64, backup: u64, entries_lba: u64| {
        let mut h = vec![0u8; SECTOR as usize];
        h[0..8].copy_from_slice(b"EFI PART");
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[24..32].copy_from_slice(&current.to_le_bytes());
        h[32..40].copy_from_slice(&backup.to_le_bytes());
        h[40..48].copy_from_slice(&34u64.to_le_bytes());
        h[48..56].copy_from_slice(&(last_lba - 33).to_le_bytes());
        h[56..72].copy_from_slice(&disk_guid);
        h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
        h[80..84].copy_from_slice(&128u32.to_le_bytes());
        h[84..88].copy_from_slice(&128u32.to_le_bytes());
        h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
        let crc = crc32(&h[0..92]);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        h
    };
    let mut mbr = vec![0u8; SECTOR as usize];
    let pe = &mut mbr[446..462];
    pe[1..4].copy_from_slice(&[0x00, 0x02, 0x00]);
    pe[4] = 0xee;
    pe[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
    pe[8..12].copy_from_slice(&1u32.to_le_bytes());
    pe[12..16].copy_from_slice(&(last_lba.min(u32::MAX as u64) as u32).to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xaa;

    let _ = fsx::remove_file_if_exists(out, "old disk image")?;
    let mut file = std::fs::File::create(out).map_err(|e| Error::io("create disk image", out, e))?;
    file.set_len(total).map_err(|e| Error::io("size disk image", out, e))?;
    let mut put = |offset: u64, bytes: &[u8]| -> Result<()> {
        file.seek(SeekFrom::Start(offset)).map_err(|e| Error::io("seek disk image", out, e))?;
        file.write_all(bytes).map_err(|e| Error::io("write disk image", out, e))
    };
    put(0, &mbr)?;
    put(SECTOR, &header(1, last_lba, 2))?;
    put(2 * SECTOR, &entries)?;
    put((last_lba - 32) * SECTOR, &entries)?;
    put(last_lba * SECTOR, &header(last_lba, 1, last_lba - 32))?;
    for (p, (start, _)) in parts.iter().zip(&layout) {
        copy_sparse(p.image, &mut file, *start, out)?;
    }
    file.sync_all().map_err(|e| Error::io("sync disk image", out, e))?;
    Ok(total)
}

/// Copies `src` into `dst` at `offset`, skipping all-zero blocks (the disk stays sparse).
fn copy_sparse(src: &Path, dst: &mut std::fs::File, offset: u64, dst_path: &Path) -> Result<()> {
    let mut input = std::fs::File::open(src).map_err(|e| Error::io("open partition image", src, e))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = offset;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            let n = input.read(&mut buf[filled..]).map_err(|e| Error::io("read partition image", src, e))?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        for (i, chunk) in buf[..filled].chunks(64 * 1024).enumerate() {
            if chunk.iter().any(|b| *b != 0) {
                dst.seek(SeekFrom::Start(pos + (i * 64 * 1024) as u64))
                    .map_err(|e| Error::io("seek disk image", dst_path, e))?;
                dst.write_all(chunk).map_err(|e| Error::io("write disk image", dst_path, e))?;
            }
        }
        pos += filled as u64;
    }
    Ok(())
}

/// raw → qcow2 (uncompressed: deterministic and fast).
pub fn make_qcow2(raw: &Path, qcow2: &Path) -> Result<()> {
    let _ = fsx::remove_file_if_exists(qcow2, "old qcow2 image")?;
    run(
        "qcow2",
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            "compat=1.1",
            &raw.display().to_string(),
            &qcow2.display().to_string(),
        ],
        &[],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn guid_mixed_endian() {
        let b = guid_bytes(ESP).unwrap();
        assert_eq!(hex::encode(b), "28732ac11ff8d211ba4b00a0c93ec93b");
    }

    #[test]
    fn used_inodes_from_dump() {
        let dump = "Inode count:              16\nInodes per group:         8\nGroup 0:\n  Free inodes: 5-8\nGroup 1:\n  Free inodes: 9, 11-16\n";
        assert_eq!(used_inodes(dump).unwrap(), vec![1, 2, 3, 4, 10]);
    }
}
