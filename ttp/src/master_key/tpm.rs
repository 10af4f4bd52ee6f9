//! The TPM copy of K_TTP: a sealed data object (KEYEDHASH, no sign or decrypt) under the
//! TCG storage primary of the TTP host's owner hierarchy, whose only authorization is
//! PolicyPCR over the configured PCRs as they were when it was sealed. The TPM keeps the
//! sealed object's private part encrypted to its storage primary; the blobs on disk are
//! useless without this very TPM in that very state (docs/TPM.md "The TTP's master key").

use std::str::FromStr;

use protocol::secret::SecretBytes;
use tss_esapi::attributes::{ObjectAttributesBuilder, SessionAttributesBuilder};
use tss_esapi::constants::response_code::Tss2ResponseCodeKind;
use tss_esapi::constants::SessionType;
use tss_esapi::handles::{KeyHandle, ObjectHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Digest, EccParameter, EccPoint, KeyedHashScheme, PcrSelectionList, PcrSelectionListBuilder, PcrSlot, Private,
    Public, PublicBuilder, PublicEccParametersBuilder, PublicKeyedHashParameters, SensitiveData, SymmetricDefinition,
    SymmetricDefinitionObject,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::Context;

use crate::error::{Error, Result};

/// A sealed copy as stored: the TPM's public and private blobs, and the PCRs it is bound to
/// with their values at sealing time (not secret: they let a refusal name what changed).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SealedCopy {
    /// PCRs (sha256 bank) the policy covers.
    pub pcrs: Vec<u8>,
    /// Their values (hex) when the key was sealed, in the order of `pcrs`.
    pub pcr_values: Vec<String>,
    /// Marshalled TPMT_PUBLIC of the sealed object (base64).
    pub public: String,
    /// TPM2B_PRIVATE contents, encrypted by the TPM to its storage primary (base64).
    pub private: String,
}

/// A connection to the TTP host's TPM.
pub struct TtpTpm {
    context: Context,
    tcti: String,
}

fn tpm_error(operation: &str, e: impl std::fmt::Display) -> Error {
    Error::MasterKey(format!("TPM {operation}: {e}"))
}

impl TtpTpm {
    /// Connects to the TPM (`swtpm:host=127.0.0.1,port=P` or `device:/dev/tpmrm0`).
    pub fn open(tcti: &str) -> Result<Self> {
        let conf = TctiNameConf::from_str(tcti).map_err(|e| {
            Error::Config(format!(
                "[master_key] tpm_tcti '{tcti}' is not valid (expected swtpm:host=H,port=P or device:/dev/tpmrm0): {e}"
            ))
        })?;
        let context = Context::new(conf).map_err(|e| tpm_error("connect", format!("TCTI '{tcti}': {e}")))?;
        Ok(Self { context, tcti: tcti.to_string() })
    }

    /// Seals `key` to the current values of `pcrs`.
    pub fn seal(&mut self, key: &SecretBytes, pcrs: &[u8]) -> Result<SealedCopy> {
        let selection = selection(pcrs)?;
        let pcr_values = self.read_pcrs(pcrs)?;
        let policy = self.trial_policy(selection)?;
        let template = sealed_template(policy)?;
        let sensitive = SensitiveData::try_from(key.expose().to_vec()).map_err(|e| tpm_error("seal", e))?;
        let created = self.with_primary(|ctx, primary| {
            ctx.execute_with_nullauth_session(|ctx| ctx.create(primary, template, None, Some(sensitive), None, None))
                .map_err(|e| tpm_error("Create(sealed K_TTP)", e))
        })?;
        self.scrub();
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        Ok(SealedCopy {
            pcrs: pcrs.to_vec(),
            pcr_values,
            public: b64.encode(created.out_public.marshall().map_err(|e| tpm_error("marshal", e))?),
            private: b64.encode(created.out_private.value()),
        })
    }

    /// Unseals a copy in a PolicyPCR session. When the PCRs changed the refusal names each
    /// changed PCR and points at `ttp unseal` (custodians' shares).
    pub fn unseal(&mut self, copy: &SealedCopy, version: u32) -> Result<SecretBytes> {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD;
        let damaged = |what: &str| Error::MasterKey(format!("the sealed copy of K_TTP version {version}: {what}"));
        let public_bytes = b64.decode(&copy.public).map_err(|_| damaged("public part is not base64"))?;
        let public = Public::unmarshall(&public_bytes).map_err(|_| damaged("public part is not a TPMT_PUBLIC"))?;
        let private = Private::try_from(b64.decode(&copy.private).map_err(|_| damaged("private part is not base64"))?)
            .map_err(|_| damaged("private part is not a TPM2B_PRIVATE"))?;
        let selection = selection(&copy.pcrs)?;
        let tcti = self.tcti.clone();
        let object = self.with_primary(|ctx, primary| {
            ctx.execute_with_nullauth_session(|ctx| ctx.load(primary, private, public)).map_err(|e| {
                tpm_error(
                    "Load(sealed K_TTP)",
                    format!("{e}: the copy was sealed by another TPM than {tcti} (new hardware? run `ttp unseal` with the custodians' shares)"),
                )
            })
        })?;
        let result = self.unseal_loaded(object, selection);
        flush(&mut self.context, object.into());
        self.scrub();
        match result? {
            Ok(data) => {
                let mut bytes = data.value().to_vec();
                Ok(SecretBytes::from_slice_wiping(&mut bytes))
            }
            Err(tss_esapi::Error::Tss2Error(rc)) if matches!(rc.kind(), Some(Tss2ResponseCodeKind::PolicyFail)) => {
                Err(self.changed_pcrs_refusal(copy, version))
            }
            Err(e) => Err(tpm_error("Unseal(K_TTP)", e)),
        }
    }

    /// Unseal of a loaded object in a fresh PolicyPCR session; the inner result is the TPM's
    /// answer to Unseal itself (a policy failure is told apart by the caller).
    fn unseal_loaded(
        &mut self,
        object: KeyHandle,
        selection: PcrSelectionList,
    ) -> Result<std::result::Result<SensitiveData, tss_esapi::Error>> {
        let session = policy_session(&mut self.context)?;
        let outcome = (|| {
            let policy = PolicySession::try_from(session).map_err(|e| tpm_error("PolicyPCR", e))?;
            self.context.policy_pcr(policy, Digest::default(), selection).map_err(|e| tpm_error("PolicyPCR", e))?;
            Ok(self.context.execute_with_session(Some(session), |ctx| ctx.unseal(object.into())))
        })();
        flush(&mut self.context, ObjectHandle::from(tss_esapi::handles::SessionHandle::from(session)));
        outcome
    }

    fn changed_pcrs_refusal(&mut self, copy: &SealedCopy, version: u32) -> Error {
        let now = match self.read_pcrs(&copy.pcrs) {
            Ok(now) => now,
            Err(e) => return e,
        };
        let changed: Vec<String> = copy
            .pcrs
            .iter()
            .zip(copy.pcr_values.iter().zip(&now))
            .filter(|(_, (sealed, current))| sealed != current)
            .map(|(index, (sealed, current))| {
                format!("PCR {index} (sealed {}…, now {}…)", &sealed[..16], &current[..16])
            })
            .collect();
        Error::MasterKeySealedToOtherState(format!(
            "the TPM refuses to unseal K_TTP version {version}: this host's measured state changed since it was sealed: {}. If the change is approved, run `ttp unseal --config ...` with the custodians' shares (it seals K_TTP to the current state); otherwise find out why these PCRs changed",
            if changed.is_empty() { "PCRs changed while unsealing".to_string() } else { changed.join(", ") }
        ))
    }

    /// The current values (hex) of `pcrs`, in that order.
    pub fn read_pcrs(&mut self, pcrs: &[u8]) -> Result<Vec<String>> {
        let mut values = Vec::with_capacity(pcrs.len());
        for index in pcrs {
            let (_, _, digests) = self.context.execute_without_session(|ctx| {
                ctx.pcr_read(selection(&[*index])?.clone()).map_err(|e| tpm_error("PCR_Read", e))
            })?;
            let digest =
                digests.value().first().ok_or_else(|| tpm_error("PCR_Read", format!("PCR {index} not returned")))?;
            values.push(hex::encode(digest.value()));
        }
        Ok(values)
    }

    fn trial_policy(&mut self, selection: PcrSelectionList) -> Result<Digest> {
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
            .map_err(|e| tpm_error("StartAuthSession(trial)", e))?
            .ok_or_else(|| tpm_error("StartAuthSession(trial)", "no session"))?;
        let result = (|| {
            let policy = PolicySession::try_from(session).map_err(|e| tpm_error("PolicyPCR", e))?;
            self.context
                .policy_pcr(policy, Digest::default(), selection)
                .map_err(|e| tpm_error("PolicyPCR(trial)", e))?;
            self.context.policy_get_digest(policy).map_err(|e| tpm_error("PolicyGetDigest", e))
        })();
        flush(&mut self.context, ObjectHandle::from(tss_esapi::handles::SessionHandle::from(session)));
        result
    }

    fn with_primary<T>(&mut self, f: impl FnOnce(&mut Context, KeyHandle) -> Result<T>) -> Result<T> {
        let template = storage_primary_template()?;
        let primary = self
            .context
            .execute_with_nullauth_session(|ctx| ctx.create_primary(Hierarchy::Owner, template, None, None, None, None))
            .map_err(|e| tpm_error("CreatePrimary(storage)", e))?
            .key_handle;
        let result = f(&mut self.context, primary);
        flush(&mut self.context, primary.into());
        result
    }

    /// Overwrites the TSS's command buffer, which still holds the last response (Unseal's
    /// K_TTP) or command (Create's), with a harmless command.
    fn scrub(&mut self) {
        if let Ok(zeros) = SensitiveData::try_from(vec![0u8; 128]) {
            if let Err(e) = self.context.stir_random(zeros) {
                tracing::warn!(error = %e, "TPM2_StirRandom (scrubbing the TSS command buffer) failed");
            }
        }
    }
}

/// The PCRs a sealed copy may be bound to: sha256 bank, 0-23 but not the resettable 16 and
/// 23 (anyone on the host could reset them to the sealed value).
pub fn selection(pcrs: &[u8]) -> Result<PcrSelectionList> {
    if pcrs.is_empty() {
        return Err(Error::Config("[master_key] pcrs is empty: K_TTP would be sealed to no measured state".into()));
    }
    let slots = pcrs
        .iter()
        .map(|index| match index {
            16 | 23 => {
                Err(Error::PcrResettable(format!("[master_key] pcrs names PCR {index}, which locality 0 can reset")))
            }
            0..=23 => PcrSlot::try_from(1u32 << index).map_err(|e| Error::Config(format!("PCR {index}: {e}"))),
            _ => Err(Error::Config(format!("[master_key] pcrs names PCR {index}; PCRs are 0-23"))),
        })
        .collect::<Result<Vec<_>>>()?;
    PcrSelectionListBuilder::new()
        .with_selection(HashingAlgorithm::Sha256, &slots)
        .build()
        .map_err(|e| Error::Config(format!("PCR selection {pcrs:?}: {e}")))
}

fn policy_session(ctx: &mut Context) -> Result<AuthSession> {
    let session = ctx
        .start_auth_session(
            None,
            None,
            None,
            SessionType::Policy,
            SymmetricDefinition::AES_128_CFB,
            HashingAlgorithm::Sha256,
        )
        .map_err(|e| tpm_error("StartAuthSession(policy)", e))?
        .ok_or_else(|| tpm_error("StartAuthSession(policy)", "no session"))?;
    // continueSession set: the session outlives Unseal, so it can always be flushed.
    let (attributes, mask) = SessionAttributesBuilder::new().with_continue_session(true).build();
    ctx.tr_sess_set_attributes(session, attributes, mask).map_err(|e| tpm_error("TRSess_SetAttributes", e))?;
    Ok(session)
}

fn flush(ctx: &mut Context, handle: ObjectHandle) {
    if let Err(e) = ctx.flush_context(handle) {
        tracing::warn!(error = %e, "flushing a transient TPM object failed");
    }
}

/// The TCG ECC P-256 storage primary (the SRK template of the TCG provisioning guidance),
/// re-derived from the owner seed whenever it is needed.
fn storage_primary_template() -> Result<Public> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()
        .map_err(|e| tpm_error("storage primary template", e))?;
    let zero = || EccParameter::try_from(vec![0u8; 32]).map_err(|e| tpm_error("storage primary template", e));
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_restricted_decryption_key(
                SymmetricDefinitionObject::AES_128_CFB,
                EccCurve::NistP256,
            )
            .build()
            .map_err(|e| tpm_error("storage primary template", e))?,
        )
        .with_ecc_unique_identifier(EccPoint::new(zero()?, zero()?))
        .build()
        .map_err(|e| tpm_error("storage primary template", e))
}

/// A sealed data object: fixedTPM and fixedParent (it can never leave this TPM), no
/// userWithAuth and no adminWithPolicy bypass: Unseal needs the PolicyPCR session.
fn sealed_template(policy: Digest) -> Result<Public> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_user_with_auth(false)
        .with_no_da(true)
        .build()
        .map_err(|e| tpm_error("sealed object template", e))?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::KeyedHash)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_auth_policy(policy)
        .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
        .with_keyed_hash_unique_identifier(Digest::default())
        .build()
        .map_err(|e| tpm_error("sealed object template", e))
}
