//! The secure component's side of the flows with the TTP (docs/PROTOCOL.md, "Message
//! sequences"): host enrollment here, and obtaining a domain key for a mount in
//! [`crate::key_release`].
//!
//! The TPM is a serial device and the ESAPI context is not thread-safe, so one worker
//! thread owns `HostTpm` and runs TPM jobs in order; async callers await their results.

use std::path::PathBuf;
use std::sync::mpsc;

use protocol::attest::{CredentialChallenge, PcrSelection};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::tpm::HostTpm;

type TpmJob = Box<dyn FnOnce(&mut HostTpm) + Send>;

/// A handle to the thread that owns the host TPM.
#[derive(Clone)]
pub struct TpmWorker {
    jobs: mpsc::Sender<TpmJob>,
}

impl TpmWorker {
    /// Opens the TPM on its own thread (`tcti` as in `HostTpm::open`).
    pub fn start(tcti: &str, state_dir: PathBuf) -> Result<Self> {
        let (jobs, inbox) = mpsc::channel::<TpmJob>();
        let (opened_tx, opened_rx) = mpsc::channel::<Result<()>>();
        let tcti = tcti.to_string();
        std::thread::Builder::new()
            .name("skydd-tpm".into())
            .spawn(move || match HostTpm::open(&tcti, &state_dir) {
                Ok(mut tpm) => {
                    let _ = opened_tx.send(Ok(()));
                    for job in inbox {
                        job(&mut tpm);
                        // A decrypted domain key passed through this thread's registers and
                        // the TSS stack (crate::scrub).
                        skydd_volume::scrub::scrub_this_thread();
                    }
                }
                Err(e) => {
                    let _ = opened_tx.send(Err(e));
                }
            })
            .map_err(|e| Error::io("start the TPM worker thread", e))?;
        opened_rx.recv().map_err(|_| Error::tpm("open", "the TPM worker thread ended before opening the TPM"))??;
        Ok(Self { jobs })
    }

    /// Runs `job` on the TPM thread and returns its result.
    pub async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce(&mut HostTpm) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (reply_tx, reply_rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move |tpm| {
                let _ = reply_tx.send(job(tpm));
            }))
            .map_err(|_| Error::tpm("job", "the TPM worker thread has stopped"))?;
        reply_rx.await.map_err(|_| Error::tpm("job", "the TPM worker thread dropped the job"))?
    }
}

/// What the TTP answered to an enrollment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnrollmentResult {
    /// The host id the TTP enrolled, as in this host's certificate.
    pub host_id: String,
    /// Name of the TTP's reference state (a set of PCR values, e.g. "compute-v1") whose
    /// PolicyPCR digest the binding key is now bound to; docs/TPM.md, "Enrollment".
    pub reference_state: String,
    /// Hex SHA-256 of the TPM's EK certificate (DER): the TPM the TTP now knows this host by.
    pub ek_fingerprint: String,
}

/// Converts a TTP answer error into the secure component's error, keeping the TTP's code
/// and message (they say exactly what was refused).
pub(crate) fn ttp_error(step: &'static str, error: net::Error) -> Error {
    match error {
        net::Error::Api { status, code, message } => Error::TtpRefused { step, status, code, message },
        other => Error::TtpUnreachable { step, detail: other.to_string() },
    }
}

/// The secure component of one compute host, as the TTP sees it.
pub struct AttestedHost {
    /// This host's id at the TTP (the name in its certificate); sent in every key release.
    pub host_id: String,
    /// The thread that owns the host TPM: quotes and decrypts released keys.
    pub tpm: TpmWorker,
    /// Mutual-TLS client for the TTP's API (docs/PROTOCOL.md, "TTP API").
    pub ttp: net::Client,
}

impl AttestedHost {
    /// Enrolls this host's TPM with the TTP (docs/PROTOCOL.md "Host enrollment").
    pub async fn enroll(&self, selection: &PcrSelection) -> Result<EnrollmentResult> {
        self.enroll_in_region(selection, None).await
    }

    /// [`AttestedHost::enroll`], claiming `region`: the TTP records it only if the reference
    /// state pins [`protocol::attest::LOCATION_PCR`] to that region's measurement, which the
    /// host's start-up extended there (docs/TPM.md "Location").
    pub async fn enroll_in_region(&self, selection: &PcrSelection, region: Option<&str>) -> Result<EnrollmentResult> {
        Ok(self.enroll_with_keys(selection, region, EnrollmentKeys::Fresh).await?.result)
    }

    /// Enrolls with this TTP using fresh keys, or the AK and binding key another TTP of this
    /// host enrolled (one TPM serving several clouds' TTPs, docs/PKI.md "A partner cloud's
    /// host"), when they still fit the host's PCRs.
    pub async fn enroll_with_keys(
        &self,
        selection: &PcrSelection,
        region: Option<&str>,
        keys: EnrollmentKeys,
    ) -> Result<Enrolled> {
        let (host_id, wanted) = (self.host_id.clone(), selection.clone());
        let (mut request, reused) = self
            .tpm
            .run(move |tpm| {
                if keys == EnrollmentKeys::StoredIfTheyFit {
                    if let Some(request) = tpm.enrollment_request_with_stored_keys(&host_id, &wanted)? {
                        return Ok((request, true));
                    }
                }
                Ok((tpm.enrollment_request(&host_id, &wanted)?, false))
            })
            .await?;
        request.region = region.map(str::to_string);
        let binding_key_sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&request.binding_public));
        let challenge: CredentialChallenge =
            self.ttp.post_json("/v1/enrollments", &request).await.map_err(|e| ttp_error("enrollment", e))?;
        let proof = self.tpm.run(move |tpm| tpm.enrollment_proof(&challenge)).await?;
        let result =
            self.ttp.post_json("/v1/enrollments/proof", &proof).await.map_err(|e| ttp_error("enrollment proof", e))?;
        Ok(Enrolled { result, reused_keys: reused, binding_key_sha256 })
    }
}

/// Which keys an enrollment proves to the TTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnrollmentKeys {
    /// A fresh AK and binding key (replacing the stored ones: every other TTP this host is
    /// enrolled at must be enrolled again).
    Fresh,
    /// The stored AK and binding key when they are bound to the selection and the PCR values
    /// of now; fresh ones otherwise.
    StoredIfTheyFit,
}

/// One enrollment done: the TTP's answer and which keys it now knows.
#[derive(Debug, Clone)]
pub struct Enrolled {
    /// What the TTP answered.
    pub result: EnrollmentResult,
    /// Whether the stored keys were proven again (`false`: fresh ones were made).
    pub reused_keys: bool,
    /// Hex SHA-256 of the binding key's marshalled public area: the key the TTP seals to.
    pub binding_key_sha256: String,
}
