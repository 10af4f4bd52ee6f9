//! Which cloud a request is served for (docs/PKI.md "A partner cloud's host"): the home
//! cloud, whose TTP is `ttp_url`, or a `[[partner]]` whose cloud platform placed one of its
//! VMs here and whose TTP releases that VM's keys. The cloud platform is known by its
//! verified client certificate: its name **and** the trusted root it chains to, so a cloud
//! platform of the home cloud named like a partner's is still the home cloud's, and a
//! certificate of the partner's root under another name is refused.
//!
//! Enrollment is per TTP too: every TTP learns this host's one TPM (EK, AK, binding key)
//! and keeps its own record of it; this side keeps one record per TTP in
//! `<state_dir>/enrollments/<name>.json`.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use serde::{Deserialize, Serialize};

use super::AttachmentService;
use crate::config::{PartnerConfig, HOME_TTP};
use crate::error::{Error, Result};
use crate::host::{AttestedHost, Enrolled, EnrollmentKeys, EnrollmentResult};

/// The cloud an attach, detach or listing is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cloud {
    /// The home cloud: its cloud platform, `ttp_url`, `volume_root`.
    Home,
    /// The `[[partner]]` of this name.
    Partner(String),
}

impl Cloud {
    /// The cloud of an attachment record (its `partner` field).
    pub(super) fn of_record(partner: Option<&str>) -> Cloud {
        partner.map_or(Cloud::Home, |name| Cloud::Partner(name.to_string()))
    }

    /// The partner's name, `None` for the home cloud.
    pub fn partner_name(&self) -> Option<&str> {
        match self {
            Cloud::Home => None,
            Cloud::Partner(name) => Some(name),
        }
    }

    /// [`HOME_TTP`] or the partner's name.
    pub fn ttp_name(&self) -> &str {
        self.partner_name().unwrap_or(HOME_TTP)
    }
}

/// A partner cloud this host serves: its configuration, this host as its TTP sees it, and a
/// check of "chains to the partner's root".
pub(super) struct PartnerTtp {
    pub(super) config: PartnerConfig,
    pub(super) host: AttestedHost,
    pub(super) root: Arc<dyn ClientCertVerifier>,
}

/// The home cloud's roots, to tell its cloud platforms from certificates of a partner's
/// root; `None` when no partner is configured (then every cloud platform is the home one,
/// as the TLS handshake already decided).
pub(super) type HomeRoots = Option<Arc<dyn ClientCertVerifier>>;

/// What `<state_dir>/enrollments/<name>.json` holds: this host's enrollment at one TTP (no
/// key material).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentRecord {
    /// [`HOME_TTP`] or the partner's name.
    pub ttp: String,
    /// The TTP's URL(s) at the time.
    pub ttp_url: String,
    /// The host id that TTP enrolled (the name in this host's certificate).
    pub host_id: String,
    /// The reference state that TTP bound the binding key to.
    pub reference_state: String,
    /// Hex SHA-256 of the EK certificate that TTP pinned.
    pub ek_fingerprint: String,
    /// Hex SHA-256 of the binding key's public area: the key that TTP seals domain keys to.
    pub binding_key_sha256: String,
    /// Unix seconds.
    pub enrolled_at: u64,
}

fn chains_to(verifier: &dyn ClientCertVerifier, chain: &[CertificateDer<'static>]) -> bool {
    match chain.split_first() {
        Some((leaf, intermediates)) => verifier.verify_client_cert(leaf, intermediates, UnixTime::now()).is_ok(),
        None => false,
    }
}

impl AttachmentService {
    /// The cloud whose cloud platform `caller` is, from its verified certificate `chain`
    /// (leaf first): a partner when it is named as that partner's `cloud_platform` and chains
    /// to the partner's root, the home cloud when it chains to a root no partner names.
    /// Anything else is [`Error::CloudPlatformNotServed`].
    pub fn cloud_of(&self, caller: &net::Identity, chain: &[CertificateDer<'static>]) -> Result<Cloud> {
        let Some(home_roots) = &self.home_roots else { return Ok(Cloud::Home) };
        let mut named_otherwise = None;
        for partner in &self.partners {
            if chains_to(partner.root.as_ref(), chain) {
                if caller.name == partner.config.cloud_platform {
                    return Ok(Cloud::Partner(partner.config.name.clone()));
                }
                named_otherwise = Some(&partner.config);
            }
        }
        if chains_to(home_roots.as_ref(), chain) {
            return Ok(Cloud::Home);
        }
        Err(Error::CloudPlatformNotServed(match named_otherwise {
            Some(partner) => format!(
                "cloud platform {:?} chains to the root of partner {:?} ({}), whose cloud platform this host serves is {:?}; \
                 no other cloud platform of that root may attach or detach here",
                caller.name,
                partner.name,
                partner.ca.display(),
                partner.cloud_platform
            ),
            None => format!(
                "cloud platform {:?} is neither this host's home cloud platform nor a configured [[partner]]: its \
                 certificate chains to none of their roots",
                caller.name
            ),
        }))
    }

    fn partner(&self, name: &str) -> Result<&PartnerTtp> {
        self.partners.iter().find(|p| p.config.name == name).ok_or_else(|| {
            Error::Config(format!("no [[partner]] named {name:?} in this host's configuration (any more)"))
        })
    }

    /// This host as the TTP of `cloud` sees it (host id, TPM worker, that TTP's client).
    pub fn host_for(&self, cloud: &Cloud) -> Result<&AttestedHost> {
        match cloud {
            Cloud::Home => Ok(&self.host),
            Cloud::Partner(name) => Ok(&self.partner(name)?.host),
        }
    }

    /// The directory `cloud`'s volumes must lie below, if one is configured.
    pub(super) fn volume_root_for(&self, cloud: &Cloud) -> Result<Option<&Path>> {
        match cloud {
            Cloud::Home => Ok(self.config.volume_root.as_deref()),
            Cloud::Partner(name) => Ok(self.partner(name)?.config.volume_root.as_deref()),
        }
    }

    /// The TTPs this host serves, home first: [`HOME_TTP`] and each partner's name.
    pub fn ttp_names(&self) -> Vec<String> {
        std::iter::once(HOME_TTP.to_string()).chain(self.partners.iter().map(|p| p.config.name.clone())).collect()
    }

    /// Enrolls at the TTP named `name` ([`HOME_TTP`] or a partner's) with the stored AK and
    /// binding key when they still fit the host's PCRs, fresh ones otherwise (then every other
    /// TTP must be enrolled again: a warning says which). Writes its enrollment record.
    pub async fn enroll_at(&self, name: &str) -> Result<EnrollmentResult> {
        self.enroll_with(name, EnrollmentKeys::StoredIfTheyFit).await
    }

    /// Enrolls at the home TTP with fresh keys, then at every partner's TTP with the same
    /// keys (one TPM, one binding key for all). Returns each TTP's name and answer, home first.
    pub async fn enroll_everywhere(&self) -> Result<Vec<(String, EnrollmentResult)>> {
        let mut done = vec![(HOME_TTP.to_string(), self.enroll_with(HOME_TTP, EnrollmentKeys::Fresh).await?)];
        for partner in &self.partners {
            let name = partner.config.name.clone();
            let result = self.enroll_with(&name, EnrollmentKeys::StoredIfTheyFit).await?;
            done.push((name, result));
        }
        Ok(done)
    }

    pub(super) async fn enroll_with(&self, name: &str, keys: EnrollmentKeys) -> Result<EnrollmentResult> {
        let (host, ttp_url) = match self.config.partner(name)? {
            None => (&self.host, self.config.ttp_url.clone()),
            Some(partner) => (&self.partner(&partner.name)?.host, partner.ttp_url.clone()),
        };
        let Enrolled { result, reused_keys, binding_key_sha256 } =
            host.enroll_with_keys(&self.config.pcr_selection, self.config.region.as_deref(), keys).await?;
        let record = EnrollmentRecord {
            ttp: name.to_string(),
            ttp_url,
            host_id: result.host_id.clone(),
            reference_state: result.reference_state.clone(),
            ek_fingerprint: result.ek_fingerprint.clone(),
            binding_key_sha256: binding_key_sha256.clone(),
            enrolled_at: super::unix_now(),
        };
        self.save_enrollment(&record)?;
        if !reused_keys {
            let stale: Vec<String> = self
                .enrollments()?
                .into_iter()
                .filter(|r| r.ttp != name && r.binding_key_sha256 != binding_key_sha256)
                .map(|r| r.ttp)
                .collect();
            if !stale.is_empty() {
                tracing::warn!(
                    ttp = name,
                    ?stale,
                    "enrolled with fresh keys: enroll again at these TTPs (secure-component enroll --ttp NAME)"
                );
            }
        }
        Ok(result)
    }

    /// This host's enrollment records, one per TTP it enrolled at.
    pub fn enrollments(&self) -> Result<Vec<EnrollmentRecord>> {
        let dir = self.config.enrollments_dir();
        let mut records = Vec::new();
        for name in self.ttp_names() {
            let path = dir.join(format!("{name}.json"));
            match std::fs::read(&path) {
                Ok(bytes) => {
                    records.push(serde_json::from_slice(&bytes).map_err(|e| {
                        Error::Config(format!("enrollment record {} is not valid: {e}", path.display()))
                    })?)
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
            }
        }
        Ok(records)
    }

    fn save_enrollment(&self, record: &EnrollmentRecord) -> Result<()> {
        let dir = self.config.enrollments_dir();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let (path, tmp) = (dir.join(format!("{}.json", record.ttp)), dir.join(format!(".{}.json.tmp", record.ttp)));
        let json = serde_json::to_vec_pretty(record)
            .map_err(|e| Error::Config(format!("encoding the enrollment record: {e}")))?;
        std::fs::write(&tmp, json)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))
    }
}
