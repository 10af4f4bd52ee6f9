//! Obtaining a domain key from the TTP, one type per step in protocol order
//! (docs/PROTOCOL.md, "Key release"):
//!
//! ```text
//! AttestedHost ──challenge()──▶ Challenged ──quote()──▶ Quoted ──release(request)──▶ Released ──decrypt()──▶ ObtainedKey
//!            POST /v1/challenges        TPM2_Quote          POST /v1/key-releases           TPM2_RSA_Decrypt
//! ```
//!
//! Each step can only be taken from the one before it, so a quote is always over a fresh
//! TTP nonce and a wrapped key is only ever decrypted after the TTP released it. Every step
//! records how long it took ([`StepTimes`]) for the attach timings of docs/PERFORMANCE.md.

use std::time::{Duration, Instant};

use protocol::attest::QuoteEvidence;
use protocol::domain::AccessMode;
use protocol::image::LaunchedImage;
use protocol::messages::{ChallengeResponse, HeaderRecord, KeyReleaseRequest, KeyReleaseResponse};
use protocol::secret::SecretBytes;
use protocol::signing::SignedEnvelope;

use crate::error::Result;
use crate::host::{ttp_error, AttestedHost};

/// What the secure component asks a key for: the header read from the volume, the owner's
/// grant and the cloud platform's placement it was handed, the VM and the mode.
#[derive(Debug, Clone, Copy)]
pub struct KeyRequest<'a> {
    /// The header record in force on the volume (owner-signed descriptor + registration).
    pub header: &'a HeaderRecord,
    /// The mount grant for `vm_id` (single use at the TTP).
    pub grant: &'a SignedEnvelope,
    /// The cloud platform's placement of `vm_id` on this host for `grant`.
    pub placement: &'a SignedEnvelope,
    /// The VM that gets the volume.
    pub vm_id: &'a str,
    /// The mode to open the volume in.
    pub mode: AccessMode,
    /// The allowlisted image this host launched `vm_id` from ([`crate::launch`]), reported
    /// to the TTP and covered by the quote; `None` for a VM this host did not launch.
    pub launched_image: Option<&'a LaunchedImage>,
}

/// How long each step took.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepTimes {
    /// TTP: `POST /v1/challenges`.
    pub challenge: Duration,
    /// TPM: the quote over the challenge nonce.
    pub quote: Duration,
    /// TTP: `POST /v1/key-releases` (all its checks, the derivation, the audit record).
    pub release: Duration,
    /// TPM: RSA-OAEP decryption of the wrapped key under the PCR policy session.
    pub decrypt: Duration,
}

/// Step 1 done: the TTP issued a fresh single-use nonce to this host.
pub struct Challenged<'h> {
    host: &'h AttestedHost,
    challenge: ChallengeResponse,
    times: StepTimes,
}

/// Step 2 done: the host TPM quoted its PCRs over the nonce (and the launched image).
pub struct Quoted<'h> {
    host: &'h AttestedHost,
    challenge_id: String,
    quote: QuoteEvidence,
    /// What the quote covers besides the nonce; the release reports exactly this.
    launched_image: Option<LaunchedImage>,
    times: StepTimes,
}

/// Step 3 done: the TTP checked everything and released the key, wrapped to this host's
/// PCR-bound binding key.
pub struct Released<'h> {
    host: &'h AttestedHost,
    response: KeyReleaseResponse,
    times: StepTimes,
}

/// Step 4 done: the domain key, decrypted inside the TPM.
#[derive(Debug)]
pub struct ObtainedKey {
    /// The domain key (zeroized on drop).
    pub key: SecretBytes,
    /// During a key rotation, the previous generation's keys (docs/PROTOCOL.md "Key
    /// rotation"), decrypted in the TPM likewise; `None` otherwise.
    pub previous_key: Option<SecretBytes>,
    /// The TTP's answer: domain, version, audit record.
    pub response: KeyReleaseResponse,
    /// How long each step took.
    pub times: StepTimes,
}

impl AttestedHost {
    /// Step 1: asks the TTP for a challenge.
    pub async fn challenge(&self) -> Result<Challenged<'_>> {
        let started = Instant::now();
        let challenge: ChallengeResponse =
            self.ttp.post_json("/v1/challenges", &()).await.map_err(|e| ttp_error("challenge", e))?;
        let times = StepTimes { challenge: started.elapsed(), ..StepTimes::default() };
        Ok(Challenged { host: self, challenge, times })
    }

    /// All four steps: the key for `request`, decrypted in this host's TPM.
    pub async fn obtain_key(&self, request: &KeyRequest<'_>) -> Result<ObtainedKey> {
        self.challenge().await?.quote(request.launched_image).await?.release(request).await?.decrypt().await
    }

    /// Steps 1-3: the key release alone (the wrapped key is useless outside this host's TPM).
    pub async fn request_release(&self, request: &KeyRequest<'_>) -> Result<KeyReleaseResponse> {
        Ok(self.challenge().await?.quote(request.launched_image).await?.release(request).await?.response)
    }
}

impl<'h> Challenged<'h> {
    /// Step 2: the TPM quotes the host's PCR selection over the challenge nonce, bound to the
    /// image `vm_id` was launched from when there is one
    /// ([`protocol::image::quote_qualifying_data`]).
    pub async fn quote(self, launched_image: Option<&LaunchedImage>) -> Result<Quoted<'h>> {
        let Self { host, challenge, mut times } = self;
        let started = Instant::now();
        let qualifying_data = protocol::image::quote_qualifying_data(&challenge.nonce, launched_image)?;
        let quote = host.tpm.run(move |tpm| tpm.quote(&qualifying_data)).await?;
        times.quote = started.elapsed();
        let launched_image = launched_image.cloned();
        Ok(Quoted { host, challenge_id: challenge.challenge_id, quote, launched_image, times })
    }
}

impl<'h> Quoted<'h> {
    /// Step 3: the key release request with the quote; the TTP checks host state, header,
    /// access, grant and placement (docs/PROTOCOL.md "Key release", steps 1-5).
    pub async fn release(self, request: &KeyRequest<'_>) -> Result<Released<'h>> {
        let Self { host, challenge_id, quote, launched_image, mut times } = self;
        let started = Instant::now();
        let body = KeyReleaseRequest {
            host_id: host.host_id.clone(),
            vm_id: request.vm_id.to_string(),
            mode: request.mode,
            header: request.header.clone(),
            grant: request.grant.clone(),
            placement: request.placement.clone(),
            challenge_id,
            quote,
            launched_image,
        };
        let response: KeyReleaseResponse =
            host.ttp.post_json("/v1/key-releases", &body).await.map_err(|e| ttp_error("key release", e))?;
        times.release = started.elapsed();
        Ok(Released { host, response, times })
    }
}

impl Released<'_> {
    /// Step 4: the TPM decrypts the wrapped key, under the PolicyPCR session of the state
    /// the TTP trusted.
    pub async fn decrypt(self) -> Result<ObtainedKey> {
        let Self { host, response, mut times } = self;
        let started = Instant::now();
        let wrapped = response.wrapped_key.clone();
        let key = host.tpm.run(move |tpm| tpm.decrypt_released_key(&wrapped)).await?;
        let previous_key = match response.previous_wrapped_key.clone() {
            Some(wrapped) => Some(host.tpm.run(move |tpm| tpm.decrypt_released_key(&wrapped)).await?),
            None => None,
        };
        times.decrypt = started.elapsed();
        Ok(ObtainedKey { key, previous_key, response, times })
    }
}
