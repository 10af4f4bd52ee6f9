//! Where the encrypted data area of a volume lies and how it is cut into sectors
//! (docs/FORMAT.md, "Data area"). The header area in front of it is encoded and decoded by
//! `protocol::format`, which defines [`DATA_OFFSET`] and [`SECTOR_SIZE`] once for every
//! crate (the cloud platform creates volumes with them, the fuzz targets parse headers);
//! this module re-exports them and adds the geometry the two volume backends need.

pub use protocol::format::{data_sectors, DATA_OFFSET, SECTOR_SIZE};

/// The kernel's block-layer sector: dm tables and `BLKGETSIZE` count in these.
pub const KERNEL_SECTOR: u64 = 512;

/// [`DATA_OFFSET`] in 512-byte kernel sectors: the `<offset>` of a dm-crypt table (2048).
pub const DATA_OFFSET_KERNEL_SECTORS: u64 = DATA_OFFSET / KERNEL_SECTOR;

/// Byte offset in the volume of data sector `sector` (`1 MiB + 4096·n`).
pub const fn data_sector_offset(sector: u64) -> u64 {
    DATA_OFFSET + sector * SECTOR_SIZE as u64
}

/// Length of the data area of a `volume_len`-byte volume in 512-byte kernel sectors:
/// whole 4096-byte data sectors only (the `<len>` of a dm-crypt table, a multiple of 8).
pub fn data_kernel_sectors(volume_len: u64) -> u64 {
    data_sectors(volume_len) * (SECTOR_SIZE as u64 / KERNEL_SECTOR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_matches_the_format_document() {
        assert_eq!(DATA_OFFSET_KERNEL_SECTORS, 2048);
        assert_eq!(data_sector_offset(0), 1 << 20);
        assert_eq!(data_sector_offset(3), (1 << 20) + 3 * 4096);
        assert_eq!(data_kernel_sectors(DATA_OFFSET + 3 * 4096 + 100), 24);
        assert_eq!(data_kernel_sectors(DATA_OFFSET - 1), 0);
    }
}
