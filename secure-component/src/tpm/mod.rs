//! The host TPM: EK, attestation key (AK) and the PCR-bound binding key that domain keys are
//! released to. docs/TPM.md describes every object, template and policy.
//!
//! Objects:
//! - EK: RSA-2048 from the TCG default template (re-derived from the endorsement seed on
//!   every use; its certificate is in NV index 0x01c00002).
//! - SRK: ECC P-256 storage primary in the owner hierarchy (TCG SRK template, re-derived).
//! - AK: ECC P-256 ECDSA-SHA256 restricted signing key under the SRK.
//! - binding key: RSA-2048 OAEP-SHA256 decrypt-only key under the SRK whose only usable
//!   authorization is PolicyPCR over the enrolled PCR selection and values.
//!
//! The AK and binding key blobs (TPM2B_PRIVATE contents, marshalled TPMT_PUBLIC) are kept in
//! the state directory; the TPM encrypts the private parts to the SRK, so they are useless
//! off this TPM. Transient objects and sessions are flushed after every operation (a TPM
//! holds only three loaded objects).

use std::path::{Path, PathBuf};
use std::str::FromStr;

use protocol::attest::{
    CredentialChallenge, EnrollmentProof, EnrollmentRequest, PcrSelection, PcrValue, QuoteEvidence,
};
use protocol::secret::SecretBytes;
use serde::{Deserialize, Serialize};
use tss_esapi::abstraction::{ek, AsymmetricAlgorithmSelection};
use tss_esapi::attributes::{ObjectAttributesBuilder, SessionAttributesBuilder};
use tss_esapi::constants::response_code::Tss2ResponseCodeKind;
use tss_esapi::constants::SessionType;
use tss_esapi::handles::{AuthHandle, KeyHandle, ObjectHandle, PcrHandle, SessionHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm, RsaSchemeAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Data, Digest, DigestValues, EccParameter, EccPoint, EccScheme, EncryptedSecret, HashScheme, IdObject,
    KeyDerivationFunctionScheme, PcrSelectionListBuilder, PcrSlot, Private, Public, PublicBuilder,
    PublicEccParametersBuilder, PublicKeyRsa, PublicRsaParametersBuilder, RsaDecryptionScheme, RsaExponent, RsaScheme,
    SignatureScheme, SymmetricDefinition, SymmetricDefinitionObject,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::Context;

use crate::error::{Error, Result};

mod exec_hygiene;
mod templates;

pub use exec_hygiene::close_inherited_fds_on_exec;
use exec_hygiene::close_sockets_on_exec;
use templates::{ak_template, binding_template, srk_template};

/// OAEP label of domain keys released to the binding key (shared with the TTP).
pub use protocol::attest::BINDING_OAEP_LABEL;

const AK_PUBLIC: &str = "ak.pub";
const AK_PRIVATE: &str = "ak.priv";
const BINDING_PUBLIC: &str = "binding.pub";
const BINDING_PRIVATE: &str = "binding.priv";
const BINDING_SELECTION: &str = "binding-selection.json";

/// A connection to the host TPM plus the keys enrolled in it.
pub struct HostTpm {
    context: Context,
    state_dir: PathBuf,
}

/// The persisted AK or binding key.
struct KeyBlobs {
    public: Public,
    private: Private,
}

#[derive(Serialize, Deserialize)]
struct StoredSelection {
    selection: PcrSelection,
}

impl HostTpm {
    /// Connects to the TPM (`swtpm:host=127.0.0.1,port=P` or `device:/dev/tpmrm0`) and uses
    /// `state_dir` for the AK and binding key blobs.
    pub fn open(tcti: &str, state_dir: &Path) -> Result<HostTpm> {
        let conf = TctiNameConf::from_str(tcti).map_err(|e| {
            Error::Config(format!(
                "TCTI '{tcti}' is not valid (expected swtpm:host=H,port=P or device:/dev/tpmrm0): {e}"
            ))
        })?;
        let context = Context::new(conf).map_err(|e| Error::tpm("connect", format!("TCTI '{tcti}': {e}")))?;
        close_sockets_on_exec();
        std::fs::create_dir_all(state_dir)
            .map_err(|e| Error::io(format!("creating TPM state directory {}", state_dir.display()), e))?;
        Ok(HostTpm { context, state_dir: state_dir.to_path_buf() })
    }

    /// Whether an AK and binding key from an earlier enrollment are stored.
    pub fn is_enrolled(&self) -> bool {
        [AK_PUBLIC, AK_PRIVATE, BINDING_PUBLIC, BINDING_PRIVATE, BINDING_SELECTION]
            .iter()
            .all(|f| self.state_dir.join(f).exists())
    }

    /// The RSA-2048 EK certificate (DER) from NV index 0x01c00002.
    pub fn ek_certificate(&mut self) -> Result<Vec<u8>> {
        ek::retrieve_ek_pubcert(&mut self.context, AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048))
            .map_err(|e| Error::tpm("NV_Read(EK certificate 0x01c00002)", e))
    }

    /// Enrollment step 1: creates a fresh AK and a binding key bound to the current values
    /// of `selection`, stores them, and describes them for the TTP.
    pub fn enrollment_request(&mut self, host_id: &str, selection: &PcrSelection) -> Result<EnrollmentRequest> {
        checked_indices(selection)?;
        let policy = self.pcr_policy_digest(selection)?;
        let ak_template = ak_template()?;
        let binding_template = binding_template(policy)?;
        let (ak, binding) = self.with_srk(|ctx, srk| {
            let ak = ctx
                .execute_with_nullauth_session(|ctx| ctx.create(srk, ak_template, None, None, None, None))
                .map_err(|e| Error::tpm("Create(AK)", e))?;
            let binding = ctx
                .execute_with_nullauth_session(|ctx| ctx.create(srk, binding_template, None, None, None, None))
                .map_err(|e| Error::tpm("Create(binding key)", e))?;
            Ok((
                KeyBlobs { public: ak.out_public, private: ak.out_private },
                KeyBlobs { public: binding.out_public, private: binding.out_private },
            ))
        })?;

        self.store_key(AK_PUBLIC, AK_PRIVATE, &ak)?;
        self.store_key(BINDING_PUBLIC, BINDING_PRIVATE, &binding)?;
        let stored = serde_json::to_vec(&StoredSelection { selection: selection.clone() })
            .map_err(|e| Error::Config(format!("encoding the PCR selection: {e}")))?;
        self.write_state(BINDING_SELECTION, &stored)?;
        self.describe_enrollment(host_id, selection, &ak.public, &binding.public)
    }

    /// The enrollment request for the TTP: this TPM's EK certificate and public, and the AK
    /// and binding key publics.
    fn describe_enrollment(
        &mut self,
        host_id: &str,
        selection: &PcrSelection,
        ak: &Public,
        binding: &Public,
    ) -> Result<EnrollmentRequest> {
        let ek_certificate = self.ek_certificate()?;
        let ek_public = self.with_ek(|ctx, ek| {
            let (public, _, _) = ctx.read_public(ek).map_err(|e| Error::tpm("ReadPublic(EK)", e))?;
            Ok(public)
        })?;
        Ok(EnrollmentRequest {
            host_id: host_id.to_string(),
            ek_certificate,
            ek_public: marshall(&ek_public, "EK public")?,
            ak_public: marshall(ak, "AK public")?,
            binding_public: marshall(binding, "binding key public")?,
            pcr_selection: selection.clone(),
            region: None,
        })
    }

    /// Enrollment step 1 with the AK and binding key already stored (another TTP of a
    /// host that serves partner clouds enrolled them: one TPM, one set of keys), when they
    /// fit: bound to `selection` and to the values its PCRs hold now. `None` when there are
    /// none or they do not fit (then [`HostTpm::enrollment_request`] makes fresh ones).
    pub fn enrollment_request_with_stored_keys(
        &mut self,
        host_id: &str,
        selection: &PcrSelection,
    ) -> Result<Option<EnrollmentRequest>> {
        checked_indices(selection)?;
        if !self.is_enrolled() {
            return Ok(None);
        }
        let stored = self.binding_selection()?;
        if stored.bank != selection.bank || stored.normalized_indices() != selection.normalized_indices() {
            return Ok(None);
        }
        let ak = self.read_key(AK_PUBLIC, AK_PRIVATE)?;
        let binding = self.read_key(BINDING_PUBLIC, BINDING_PRIVATE)?;
        let Public::Rsa { auth_policy, .. } = &binding.public else {
            return Ok(None);
        };
        if auth_policy.value() != self.pcr_policy_digest(selection)?.as_slice() {
            return Ok(None);
        }
        self.describe_enrollment(host_id, selection, &ak.public, &binding.public).map(Some)
    }

    /// Enrollment step 3a: TPM2_ActivateCredential with the AK and the EK (authorized by a
    /// PolicySecret(endorsement) session, the EK's policy). Fails unless the challenge was
    /// made for this TPM's EK and this AK's name.
    pub fn activate_credential(&mut self, challenge: &CredentialChallenge) -> Result<SecretBytes> {
        let id_object = IdObject::try_from(challenge.credential_blob.clone())
            .map_err(|e| Error::tpm("ActivateCredential", format!("credential blob is malformed: {e}")))?;
        let secret = EncryptedSecret::try_from(challenge.encrypted_secret.clone())
            .map_err(|e| Error::tpm("ActivateCredential", format!("encrypted secret is malformed: {e}")))?;
        let ak = self.load_key(AK_PUBLIC, AK_PRIVATE)?;
        let ek = create_ek(&mut self.context)?;
        // The AK was loaded under the SRK, which was flushed by load_key; the EK is fresh.
        let result = (|| {
            let session = start_policy_session(&mut self.context)?;
            let outcome = (|| {
                self.context
                    .execute_with_nullauth_session(|ctx| {
                        ctx.policy_secret(
                            PolicySession::try_from(session)?,
                            AuthHandle::Endorsement,
                            Default::default(),
                            Default::default(),
                            Default::default(),
                            None,
                        )
                    })
                    .map_err(|e| Error::tpm("PolicySecret(endorsement)", e))?;
                self.context
                    .execute_with_sessions((Some(AuthSession::Password), Some(session), None), |ctx| {
                        ctx.activate_credential(ak, ek, id_object, secret)
                    })
                    .map_err(|e| {
                        Error::tpm(
                            "ActivateCredential",
                            format!("{e} (the challenge was not made for this TPM's EK and AK)"),
                        )
                    })
            })();
            flush_session(&mut self.context, session);
            outcome
        })();
        flush(&mut self.context, ek.into());
        flush(&mut self.context, ak.into());
        scrub_command_buffer(&mut self.context);
        let digest = result?;
        let mut bytes = digest.value().to_vec();
        Ok(SecretBytes::from_slice_wiping(&mut bytes))
    }

    /// Enrollment step 3b: TPM2_Certify of the binding key by the AK over `qualifying_data`.
    /// Returns (marshalled TPMS_ATTEST, marshalled TPMT_SIGNATURE).
    pub fn certify_binding_key(&mut self, qualifying_data: &[u8]) -> Result<(Vec<u8>, Vec<u8>)> {
        let data = Data::try_from(qualifying_data.to_vec()).map_err(|_| {
            Error::tpm("Certify", format!("qualifying data is {} bytes, at most 64 allowed", qualifying_data.len()))
        })?;
        let (ak, binding) = self.load_ak_and_binding()?;
        // Certify needs the binding key's ADMIN role, authorized by its (empty) authValue:
        // adminWithPolicy is clear (see binding_template).
        let result = self
            .context
            .execute_with_sessions((Some(AuthSession::Password), Some(AuthSession::Password), None), |ctx| {
                ctx.certify(binding.into(), ak, data, SignatureScheme::Null)
            })
            .map_err(|e| Error::tpm("Certify(binding key)", e));
        flush(&mut self.context, binding.into());
        flush(&mut self.context, ak.into());
        let (attest, signature) = result?;
        Ok((marshall(&attest, "certify attest")?, marshall(&signature, "certify signature")?))
    }

    /// Enrollment step 3: both halves of the proof for `challenge`. The certification is
    /// qualified with the challenge's `certify_nonce` so it cannot be replayed.
    pub fn enrollment_proof(&mut self, challenge: &CredentialChallenge) -> Result<EnrollmentProof> {
        let secret = self.activate_credential(challenge)?;
        let (certify_attest, certify_signature) = self.certify_binding_key(&challenge.certify_nonce)?;
        Ok(EnrollmentProof {
            enrollment_id: challenge.enrollment_id.clone(),
            activated_secret: secret.expose().to_vec(),
            certify_attest,
            certify_signature,
        })
    }

    /// A quote by the AK of the binding key's PCR selection over `nonce` (at most 64 bytes),
    /// with the PCR values read just before.
    pub fn quote(&mut self, nonce: &[u8]) -> Result<QuoteEvidence> {
        let data = Data::try_from(nonce.to_vec())
            .map_err(|_| Error::tpm("Quote", format!("nonce is {} bytes, at most 64 allowed", nonce.len())))?;
        let selection = self.binding_selection()?;
        let pcr_values = self.read_pcrs(&selection)?;
        let pcr_list = tpm_selection(&selection)?;
        let ak = self.load_key(AK_PUBLIC, AK_PRIVATE)?;
        let result = self
            .context
            .execute_with_nullauth_session(|ctx| ctx.quote(ak, data, SignatureScheme::Null, pcr_list))
            .map_err(|e| Error::tpm("Quote", e));
        flush(&mut self.context, ak.into());
        let (attest, signature) = result?;
        Ok(QuoteEvidence {
            attest: marshall(&attest, "quote attest")?,
            signature: marshall(&signature, "quote signature")?,
            pcr_values: pcr_values.into_iter().map(|(index, digest)| PcrValue { index, digest }).collect(),
        })
    }

    /// Decrypts a key the TTP sealed to the binding key (RSA-OAEP-SHA256, label
    /// [`BINDING_OAEP_LABEL`]) in a PolicyPCR session: the TPM itself refuses when the
    /// host's PCRs no longer hold the enrolled values.
    pub fn decrypt_released_key(&mut self, ciphertext: &[u8]) -> Result<SecretBytes> {
        let cipher = PublicKeyRsa::try_from(ciphertext.to_vec()).map_err(|_| {
            Error::tpm("RSA_Decrypt", format!("ciphertext is {} bytes, expected 256", ciphertext.len()))
        })?;
        let label = Data::try_from(BINDING_OAEP_LABEL.to_vec()).map_err(|e| Error::tpm("RSA_Decrypt", e))?;
        let selection = self.binding_selection()?;
        let pcr_list = tpm_selection(&selection)?;
        let binding = self.load_key(BINDING_PUBLIC, BINDING_PRIVATE)?;
        let result = (|| {
            let session = start_policy_session(&mut self.context)?;
            let outcome = (|| {
                // An empty pcrDigest makes the TPM bind the session to the PCRs' current
                // values; RSA_Decrypt then succeeds only if they equal the enrolled ones.
                self.context
                    .policy_pcr(
                        PolicySession::try_from(session).map_err(|e| Error::tpm("PolicyPCR", e))?,
                        Digest::default(),
                        pcr_list,
                    )
                    .map_err(|e| Error::tpm("PolicyPCR", e))?;
                self.context
                    .execute_with_session(Some(session), |ctx| {
                        ctx.rsa_decrypt(
                            binding,
                            cipher,
                            RsaDecryptionScheme::Oaep(HashScheme::new(HashingAlgorithm::Sha256)),
                            label,
                        )
                    })
                    .map_err(|e| map_policy_error("RSA_Decrypt(binding key)", e))
            })();
            flush_session(&mut self.context, session);
            outcome
        })();
        flush(&mut self.context, binding.into());
        scrub_command_buffer(&mut self.context);
        let plain = result?;
        let mut bytes = plain.value().to_vec();
        Ok(SecretBytes::from_slice_wiping(&mut bytes))
    }

    /// Extends PCR `index` (sha256 bank) with SHA-256(`data`) (tests simulate a changed host).
    pub fn extend_pcr(&mut self, index: u8, data: &[u8]) -> Result<()> {
        use sha2_free::sha256;
        let handle = PcrHandle::try_from(ObjectHandle::from(u32::from(index)))
            .map_err(|_| Error::tpm("PCR_Extend", format!("PCR {index} does not exist")))?;
        let digest = Digest::try_from(sha256(&mut self.context, data)?).map_err(|e| Error::tpm("PCR_Extend", e))?;
        let mut values = DigestValues::new();
        values.set(HashingAlgorithm::Sha256, digest);
        self.context
            .execute_with_nullauth_session(|ctx| ctx.pcr_extend(handle, values))
            .map_err(|e| Error::tpm("PCR_Extend", format!("PCR {index}: {e}")))
    }

    /// Extends PCR `index` (sha256 bank) with a digest computed elsewhere, as measured boot
    /// and IMA do: the PCR becomes SHA-256(PCR || digest).
    pub fn extend_pcr_digest(&mut self, index: u8, digest: &[u8; 32]) -> Result<()> {
        let handle = PcrHandle::try_from(ObjectHandle::from(u32::from(index)))
            .map_err(|_| Error::tpm("PCR_Extend", format!("PCR {index} does not exist")))?;
        let digest = Digest::try_from(digest.to_vec()).map_err(|e| Error::tpm("PCR_Extend", e))?;
        let mut values = DigestValues::new();
        values.set(HashingAlgorithm::Sha256, digest);
        self.context
            .execute_with_nullauth_session(|ctx| ctx.pcr_extend(handle, values))
            .map_err(|e| Error::tpm("PCR_Extend", format!("PCR {index}: {e}")))
    }

    /// The current values of `selection`, in ascending PCR order.
    pub fn read_pcrs(&mut self, selection: &PcrSelection) -> Result<Vec<(u8, Vec<u8>)>> {
        let indices = checked_indices(selection)?;
        let mut values = Vec::with_capacity(indices.len());
        // TPM2_PCR_Read returns at most 8 digests per call.
        for chunk in indices.chunks(8) {
            let list = tpm_selection(&PcrSelection { bank: selection.bank.clone(), indices: chunk.to_vec() })?;
            let (_, read, digests) = self
                .context
                .execute_without_session(|ctx| ctx.pcr_read(list))
                .map_err(|e| Error::tpm("PCR_Read", e))?;
            let returned: Vec<u8> = read.get_selections().iter().flat_map(|s| s.selected()).map(slot_index).collect();
            if returned.len() != digests.value().len() || returned.len() != chunk.len() {
                return Err(Error::tpm(
                    "PCR_Read",
                    format!("asked for PCRs {chunk:?}, the TPM returned PCRs {returned:?}"),
                ));
            }
            let mut pairs: Vec<(u8, Vec<u8>)> =
                returned.into_iter().zip(digests.value().iter().map(|d| d.value().to_vec())).collect();
            pairs.sort_by_key(|(i, _)| *i);
            values.extend(pairs);
        }
        Ok(values)
    }

    /// The PolicyPCR digest over the current values of `selection`, computed by the TPM in a
    /// trial session (the binding key's authPolicy).
    pub fn pcr_policy_digest(&mut self, selection: &PcrSelection) -> Result<Vec<u8>> {
        let list = tpm_selection(selection)?;
        let session = self
            .context
            .start_auth_session(
                None,
                None,
                None,
                SessionType::Trial,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
            .map_err(|e| Error::tpm("StartAuthSession(trial)", e))?
            .ok_or_else(|| Error::tpm("StartAuthSession(trial)", "the TPM returned no session"))?;
        let result = (|| {
            let policy = PolicySession::try_from(session).map_err(|e| Error::tpm("PolicyPCR", e))?;
            self.context.policy_pcr(policy, Digest::default(), list).map_err(|e| Error::tpm("PolicyPCR(trial)", e))?;
            self.context.policy_get_digest(policy).map_err(|e| Error::tpm("PolicyGetDigest", e))
        })();
        flush_session(&mut self.context, session);
        Ok(result?.value().to_vec())
    }

    /// The PCR selection of the enrolled binding key.
    pub fn binding_selection(&self) -> Result<PcrSelection> {
        let bytes = self.read_state(BINDING_SELECTION)?;
        let stored: StoredSelection = serde_json::from_slice(&bytes).map_err(|e| Error::TpmState {
            path: self.state_dir.join(BINDING_SELECTION).display().to_string(),
            detail: e.to_string(),
        })?;
        Ok(stored.selection)
    }

    // ---- internals -------------------------------------------------------------------

    fn with_ek<T>(&mut self, f: impl FnOnce(&mut Context, KeyHandle) -> Result<T>) -> Result<T> {
        let ek = create_ek(&mut self.context)?;
        let result = f(&mut self.context, ek);
        flush(&mut self.context, ek.into());
        result
    }

    fn with_srk<T>(&mut self, f: impl FnOnce(&mut Context, KeyHandle) -> Result<T>) -> Result<T> {
        let template = srk_template()?;
        let srk = self
            .context
            .execute_with_nullauth_session(|ctx| ctx.create_primary(Hierarchy::Owner, template, None, None, None, None))
            .map_err(|e| Error::tpm("CreatePrimary(SRK)", e))?
            .key_handle;
        let result = f(&mut self.context, srk);
        flush(&mut self.context, srk.into());
        result
    }

    /// Loads a stored key under a fresh SRK and flushes the SRK (a loaded child does not
    /// need its parent to stay loaded).
    fn load_key(&mut self, public_file: &str, private_file: &str) -> Result<KeyHandle> {
        let blobs = self.read_key(public_file, private_file)?;
        self.with_srk(|ctx, srk| {
            ctx.execute_with_nullauth_session(|ctx| ctx.load(srk, blobs.private, blobs.public))
                .map_err(|e| Error::tpm("Load", format!("{public_file}: {e} (was the key created by another TPM?)")))
        })
    }

    fn load_ak_and_binding(&mut self) -> Result<(KeyHandle, KeyHandle)> {
        let ak = self.load_key(AK_PUBLIC, AK_PRIVATE)?;
        match self.load_key(BINDING_PUBLIC, BINDING_PRIVATE) {
            Ok(binding) => Ok((ak, binding)),
            Err(e) => {
                flush(&mut self.context, ak.into());
                Err(e)
            }
        }
    }

    fn store_key(&self, public_file: &str, private_file: &str, key: &KeyBlobs) -> Result<()> {
        self.write_state(public_file, &marshall(&key.public, public_file)?)?;
        self.write_state(private_file, key.private.value())
    }

    fn read_key(&self, public_file: &str, private_file: &str) -> Result<KeyBlobs> {
        let public_bytes = self.read_state(public_file)?;
        let public = Public::unmarshall(&public_bytes).map_err(|e| Error::TpmState {
            path: self.state_dir.join(public_file).display().to_string(),
            detail: format!("not a marshalled TPMT_PUBLIC: {e}"),
        })?;
        let private = Private::try_from(self.read_state(private_file)?).map_err(|e| Error::TpmState {
            path: self.state_dir.join(private_file).display().to_string(),
            detail: format!("not a TPM2B_PRIVATE: {e}"),
        })?;
        Ok(KeyBlobs { public, private })
    }

    fn read_state(&self, name: &str) -> Result<Vec<u8>> {
        let path = self.state_dir.join(name);
        std::fs::read(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::TpmState {
                    path: path.display().to_string(),
                    detail: "missing: this host has not been enrolled (call enrollment_request first)".into(),
                }
            } else {
                Error::io(format!("reading {}", path.display()), e)
            }
        })
    }

    /// Write-then-rename so a crash never leaves a torn key blob.
    fn write_state(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let path = self.state_dir.join(name);
        let tmp = self.state_dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, bytes).map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
        std::fs::rename(&tmp, &path)
            .map_err(|e| Error::io(format!("renaming {} to {}", tmp.display(), path.display()), e))
    }
}

/// sha256 without a crate dependency: the TPM hashes for us (TPM2_Hash).
mod sha2_free {
    use super::*;
    use tss_esapi::interface_types::resource_handles::Hierarchy;
    use tss_esapi::structures::MaxBuffer;

    pub fn sha256(ctx: &mut Context, data: &[u8]) -> Result<Vec<u8>> {
        let buffer = MaxBuffer::try_from(data.to_vec())
            .map_err(|_| Error::tpm("Hash", format!("{} bytes is more than one TPM2_Hash buffer", data.len())))?;
        let (digest, _) = ctx
            .execute_without_session(|ctx| ctx.hash(buffer, HashingAlgorithm::Sha256, Hierarchy::Null))
            .map_err(|e| Error::tpm("Hash", e))?;
        Ok(digest.value().to_vec())
    }
}

fn create_ek(ctx: &mut Context) -> Result<KeyHandle> {
    ek::create_ek_object_2(ctx, AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048), None)
        .map_err(|e| Error::tpm("CreatePrimary(EK)", e))
}

fn start_policy_session(ctx: &mut Context) -> Result<AuthSession> {
    let session = ctx
        .start_auth_session(
            None,
            None,
            None,
            SessionType::Policy,
            SymmetricDefinition::AES_128_CFB,
            HashingAlgorithm::Sha256,
        )
        .map_err(|e| Error::tpm("StartAuthSession(policy)", e))?
        .ok_or_else(|| Error::tpm("StartAuthSession(policy)", "the TPM returned no session"))?;
    // continueSession stays set so the session outlives the command and flush_session can
    // always end it (success or failure) without the TPM having freed it first.
    let (attributes, mask) = SessionAttributesBuilder::new().with_continue_session(true).build();
    ctx.tr_sess_set_attributes(session, attributes, mask).map_err(|e| Error::tpm("TRSess_SetAttributes", e))?;
    Ok(session)
}

fn flush_session(ctx: &mut Context, session: AuthSession) {
    let handle: SessionHandle = session.into();
    if let Err(e) = ctx.flush_context(ObjectHandle::from(handle)) {
        tracing::warn!(error = %e, "flushing a TPM session failed");
    }
}

/// Overwrites the TSS's command/response buffer (inside the ESYS context, reused by every
/// command): a response carrying a secret (RSA_Decrypt's plaintext, ActivateCredential's
/// credential) stays there after the short commands that follow (FlushContext writes 14
/// bytes). TPM2_StirRandom with 128 zero bytes marshals a 140-byte command over it.
fn scrub_command_buffer(ctx: &mut Context) {
    if let Ok(zeros) = tss_esapi::structures::SensitiveData::try_from(vec![0u8; 128]) {
        if let Err(e) = ctx.stir_random(zeros) {
            tracing::warn!(error = %e, "TPM2_StirRandom (scrubbing the TSS command buffer) failed");
        }
    }
}

fn flush(ctx: &mut Context, handle: ObjectHandle) {
    if let Err(e) = ctx.flush_context(handle) {
        tracing::warn!(error = %e, "flushing a transient TPM object failed");
    }
}

/// Names a failed policy check for what it is: the TPM refusing the key.
fn map_policy_error(operation: &'static str, e: tss_esapi::Error) -> Error {
    if let tss_esapi::Error::Tss2Error(rc) = e {
        match rc.kind() {
            Some(Tss2ResponseCodeKind::PolicyFail) => {
                return Error::BindingKeyRefused(
                    "PCR policy not satisfied (the host's measured state changed since enrollment)".into(),
                )
            }
            Some(Tss2ResponseCodeKind::PcrChanged) => {
                return Error::BindingKeyRefused("PCRs changed while the policy session was in use".into())
            }
            _ => {}
        }
    }
    Error::tpm(operation, e)
}

fn marshall<T: Marshall>(value: &T, what: &str) -> Result<Vec<u8>> {
    value.marshall().map_err(|e| Error::tpm("marshal", format!("{what}: {e}")))
}

fn checked_indices(selection: &PcrSelection) -> Result<Vec<u8>> {
    if selection.bank != "sha256" {
        return Err(Error::Config(format!("PCR bank '{}' is not supported (only sha256)", selection.bank)));
    }
    let indices = selection.normalized_indices();
    if indices.is_empty() {
        return Err(Error::Config("the PCR selection is empty".into()));
    }
    if let Some(bad) = indices.iter().find(|i| **i > 23) {
        return Err(Error::Config(format!("PCR {bad} does not exist (0-23)")));
    }
    Ok(indices)
}

fn tpm_selection(selection: &PcrSelection) -> Result<tss_esapi::structures::PcrSelectionList> {
    let indices = checked_indices(selection)?;
    let slots = indices
        .iter()
        .map(|i| PcrSlot::try_from(1u32 << i).map_err(|e| Error::Config(format!("PCR {i}: {e}"))))
        .collect::<Result<Vec<_>>>()?;
    PcrSelectionListBuilder::new()
        .with_selection(HashingAlgorithm::Sha256, &slots)
        .build()
        .map_err(|e| Error::Config(format!("PCR selection {indices:?}: {e}")))
}

fn slot_index(slot: PcrSlot) -> u8 {
    u32::from(slot).trailing_zeros() as u8
}
