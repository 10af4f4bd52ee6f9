//! Format 2 of a volume (docs/FORMAT.md "Version 2"): the same AES-256-XTS data area as
//! format 1, plus an integrity area after it that makes tampering and rollback by the
//! provider evident.
//!
//! - [`tag`]: a keyed tag per sector over (domain, sector, epoch, ciphertext);
//! - [`tree`]: a hash tree over the blocks of tags, and the volume root the TTP anchors;
//! - [`records`]: the superblock and the dirty map (which zones may hold writes not yet
//!   committed, written durably before those writes);
//! - [`geometry`]: where each part lies;
//! - [`rekey`]: the tags and tree rebuilt under a new key generation after a key rotation;
//! - [`verity`]: the dm-verity tree a read-only kernel mapping is checked against;
//! - `volume`: [`IntegrityVolume`], which reads (verifying), writes (tagging), flushes
//!   (committing a new epoch through an [`Authority`], the TTP) and, on open, checks the
//!   volume against the anchor and settles what a crash left behind.

pub mod geometry;
pub mod records;
pub mod rekey;
pub mod tag;
pub mod tree;
pub mod verity;
mod volume;

pub use volume::{Anchor, Authority, IntegrityVolume, Opened};

#[cfg(test)]
mod tests;
