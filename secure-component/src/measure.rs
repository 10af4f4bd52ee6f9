//! The measured start-up of a compute host (docs/TPM.md "Measured state"): before the secure
//! component runs, the SHA-256 of its binary and of its configuration are extended, in that
//! order, into [`MEASURED_STATE_PCR`]. That PCR is in the default selection, so the binding
//! key's PolicyPCR and every quote cover what runs: another binary or configuration gives
//! another value, which the TTP refuses at release and the TPM refuses at decryption.
//!
//! A PCR below 16 cannot be reset at locality 0, so a process that runs later cannot undo a
//! measurement; only a TPM reset (a reboot, which measures again) clears it.

use std::io::Read;
use std::path::Path;

pub use protocol::attest::MEASURED_STATE_PCR;

use crate::error::{Error, Result};
use crate::tpm::HostTpm;

/// What a host's start-up extends into [`MEASURED_STATE_PCR`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Measurement {
    /// SHA-256 of the secure component's binary file.
    pub binary: [u8; 32],
    /// SHA-256 of its configuration file's bytes.
    pub config: [u8; 32],
}

impl Measurement {
    /// Hashes the binary at `binary` and the configuration bytes `config`.
    pub fn of(binary: &Path, config: &[u8]) -> Result<Self> {
        Ok(Self { binary: sha256_file(binary)?, config: openssl::sha::sha256(config) })
    }

    /// The value [`MEASURED_STATE_PCR`] holds after a TPM reset and [`extend`] with this
    /// measurement: what a reference state pins.
    pub fn pcr_value(&self) -> [u8; 32] {
        protocol::attest::pcr_after(&[self.binary, self.config])
    }
}

/// SHA-256 of a file, streamed (binaries are hundreds of MiB in debug builds).
pub fn sha256_file(path: &Path) -> Result<[u8; 32]> {
    let mut file =
        std::fs::File::open(path).map_err(|e| Error::io(format!("open {} to measure it", path.display()), e))?;
    sha256_open_file(&mut file, path)
}

/// SHA-256 of an open file from its current position to its end (`path` names it in errors):
/// what a launch hashes is the very descriptor it hands to qemu.
pub fn sha256_open_file(file: &mut std::fs::File, path: &Path) -> Result<[u8; 32]> {
    let mut hasher = openssl::sha::Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).map_err(|e| Error::io(format!("read {} to measure it", path.display()), e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hasher.finish())
}

/// Extends [`protocol::attest::LOCATION_PCR`] with the measurement of `region` (docs/TPM.md
/// "Location"): part of a host's start-up before its secure component runs, like [`extend`].
pub fn extend_location(tpm: &mut HostTpm, region: &str) -> Result<()> {
    let measurement = protocol::attest::location_measurement(region);
    tpm.extend_pcr_digest(protocol::attest::LOCATION_PCR, &measurement)
}

/// Extends the measurement into [`MEASURED_STATE_PCR`]: binary first, then configuration.
pub fn extend(tpm: &mut HostTpm, measurement: &Measurement) -> Result<()> {
    tpm.extend_pcr_digest(MEASURED_STATE_PCR, &measurement.binary)?;
    tpm.extend_pcr_digest(MEASURED_STATE_PCR, &measurement.config)
}
