//! The provenance record: an in-toto Statement v1 whose predicate follows SLSA Provenance v1
//! (buildDefinition / runDetails) with Skydd's own fields beside them (steps, hardening, test
//! results, package list), wrapped in a DSSE envelope signed with ECDSA P-256 by a key whose
//! certificate the cloud CA issued.
//!
//! DSSE signs `PAE(payloadType, payload)` =
//! `"DSSEv1" SP len(type) SP type SP len(payload) SP payload`, so the signature covers the
//! exact payload bytes and their type; the signature is DER-encoded ECDSA over SHA-256.
//!
//! The signer: the PKI has four roles (docs/PKI.md) and none is "image builder". The pipeline
//! signs with a `cloud-platform` certificate named `image-pipeline` (the image pipeline is
//! operated by the cloud platform's operators) and `verify` insists on exactly that role and
//! name, so a TTP, host or domain-manager key cannot sign images.

use std::collections::BTreeMap;
use std::path::Path;

use protocol::pki::{Identity, Role};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::checks::TestReport;
use crate::debian::{InstalledPackage, ReleaseRecord};
use crate::error::{fsx, Error, Result};
use crate::harden::HardeningRecord;

/// DSSE `payloadType` of a provenance envelope; [`verify`] refuses any other type ("not a DSSE
/// envelope / wrong payload type" in docs/IMAGE-PIPELINE.md, "`verify IMAGE`").
pub const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
/// The statement's `_type`: in-toto Statement v1.
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
/// The statement's `predicateType`: SLSA Provenance v1.
pub const PREDICATE_TYPE: &str = "https://slsa.dev/provenance/v1";
/// `buildDefinition.buildType`: identifies how this pipeline builds Debian images, so a reader
/// knows how to interpret the external and internal parameters.
pub const BUILD_TYPE: &str = "https://skydd.example/image-pipeline/debian-image/v1";
/// `runDetails.builder.id`: the builder that produced the record.
pub const BUILDER_ID: &str = "https://skydd.example/image-pipeline";
/// Name the signer certificate must carry (role cloud-platform).
pub const DEFAULT_SIGNER_NAME: &str = "image-pipeline";

/// The steps every build must have run, in this order, each with status "ok".
pub const REQUIRED_STEPS: &[&str] =
    &["bootstrap", "unpack", "archive-chain", "harden", "security-checks", "filesystem", "disk", "qcow2"];

/// An in-toto Statement v1: the images it is about (`subject`) and what is claimed about them
/// (`predicate`). Its JSON is the DSSE payload of `provenance.dsse.json` (docs/IMAGE-PIPELINE.md,
/// "Provenance").
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Statement {
    /// Always [`STATEMENT_TYPE`]; checked by [`verify_with`].
    #[serde(rename = "_type")]
    pub statement_type: String,
    /// `image.raw` and `image.qcow2` with their sha256; `verify` re-hashes each file and refuses on
    /// a difference.
    pub subject: Vec<ResourceDescriptor>,
    /// Always [`PREDICATE_TYPE`]; checked by [`verify_with`].
    #[serde(rename = "predicateType")]
    pub predicate_type: String,
    /// The SLSA provenance with the Skydd extension.
    pub predicate: Predicate,
}

/// A named, digested artifact (in-toto ResourceDescriptor): an image file in `subject`, or a build
/// input in `resolvedDependencies` (keyring, `InRelease`, `Packages` index, `.deb` as a `pkg:deb`
/// URL).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ResourceDescriptor {
    /// File name for subjects (`image.raw`); must be a plain name, since [`verify_with`] looks it
    /// up next to the record or in the store.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Location of a dependency: `file://` for the keyring, the archive URL of an `InRelease` or
    /// `Packages` file, `pkg:deb/debian/NAME@VERSION?arch=ARCH` for a package.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uri: String,
    /// Algorithm → hex digest; this pipeline always records `sha256`.
    pub digest: BTreeMap<String, String>,
    /// Extra facts: `role = trust anchor` for the keyring; `date`, `suite`, `signedBy` for an
    /// `InRelease`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl ResourceDescriptor {
    /// The hex sha256 digest, if recorded.
    pub fn sha256(&self) -> Option<&str> {
        self.digest.get("sha256").map(String::as_str)
    }
}

/// The statement's predicate: SLSA Provenance v1 (`buildDefinition`, `runDetails`) plus the `skydd`
/// extension.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Predicate {
    /// What was built from which inputs (SLSA `buildDefinition`).
    pub build_definition: BuildDefinition,
    /// Who built it, with which tool versions, and when (SLSA `runDetails`).
    pub run_details: RunDetails,
    /// Skydd extension: what was run, changed and tested.
    pub skydd: SkyddRecord,
}

/// SLSA `buildDefinition`: everything needed to rebuild the image bit-identically.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BuildDefinition {
    /// Always [`BUILD_TYPE`].
    pub build_type: String,
    /// Inputs the operator chose (profile, role, suite, updates).
    pub external_parameters: ExternalParameters,
    /// Inputs the pipeline fixed (epoch, keyring).
    pub internal_parameters: InternalParameters,
    /// The trust anchor and every input fetched: the keyring, each `InRelease` (with Date, suite
    /// and signer), each `Packages` index, every installed package with its `.deb` sha256. `diff`
    /// compares package versions from these records.
    pub resolved_dependencies: Vec<ResourceDescriptor>,
}

/// Build inputs the operator chose; `diff` reports a changed profile digest or updates flag as a
/// hardening change.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ExternalParameters {
    /// Where the profile came from: `builtin:NAME`, a file path or `store:ROLE@N` (patch).
    pub profile: String,
    /// sha256 of the profile's exact bytes; the profile blob in the store has this digest.
    pub profile_sha256: String,
    /// The role (`[image].role`).
    pub role: String,
    /// The Debian suite, e.g. `bookworm`.
    pub suite: String,
    /// The mmdebstrap variant, e.g. `minbase`.
    pub variant: String,
    /// Whether SUITE-updates and SUITE-security were used.
    pub updates: bool,
    /// The archive mirrors used: the main mirror, plus the security mirror when updates are on.
    pub mirrors: Vec<String>,
}

/// Build inputs the pipeline fixed; they make the build reproducible and anchor its trust.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InternalParameters {
    /// SOURCE_DATE_EPOCH in seconds since 1970: the timestamp of every file in the image.
    pub source_date_epoch: u64,
    /// Path of the keyring mmdebstrap and `gpgv` used (normally
    /// `/usr/share/keyrings/debian-archive-keyring.gpg`).
    pub keyring: String,
    /// sha256 of that keyring file, so the trust anchor itself is pinned.
    pub keyring_sha256: String,
}

/// SLSA `runDetails`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RunDetails {
    /// The builder id and the tool versions.
    pub builder: Builder,
    /// Invocation id and start/finish times.
    pub metadata: RunMetadata,
}

/// The builder: who ran the build and with what.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Builder {
    /// Always [`BUILDER_ID`].
    pub id: String,
    /// Tool → version line: image-pipeline, mmdebstrap, mke2fs, qemu-img, tar and (when run) oscap.
    /// Records enough to tell two build hosts apart when images differ (docs/IMAGE-PIPELINE.md,
    /// "Stage 1: creation", step 4).
    pub version: BTreeMap<String, String>,
}

/// SLSA run metadata.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RunMetadata {
    /// Random 128-bit id (hex) of this build run, so two runs of the same inputs have distinct
    /// records.
    pub invocation_id: String,
    /// Start of the build, RFC 3339 UTC.
    pub started_on: String,
    /// End of the build, RFC 3339 UTC.
    pub finished_on: String,
}

/// One pipeline step as run: the list in the signed record is what [`verify_with`] compares with
/// [`REQUIRED_STEPS`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepRecord {
    /// Step name, e.g. `bootstrap` or `security-checks`.
    pub name: String,
    /// The command or a short description of what the step did.
    pub command: String,
    /// `ok`, or `failed: ERROR`; anything other than `ok` makes `verify` refuse the image.
    pub status: String,
    /// Wall-clock duration in milliseconds.
    pub duration_ms: u64,
    /// Values the step produced, e.g. `tarball_sha256` after the bootstrap.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub outputs: BTreeMap<String, String>,
}

/// Which image this is and where it sits in its role's history; part of the `skydd` extension.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageIdentity {
    /// The profile's role; store versions are numbered per role.
    pub role: String,
    /// Version in the store (None when built outside a store).
    pub version: Option<u64>,
    /// The version this one was patched from.
    pub parent: Option<String>,
    /// What changed against the parent (patch), human-readable.
    #[serde(default)]
    pub changes: Vec<String>,
    /// Size of `image.raw` in bytes (its apparent size; the file is sparse).
    pub raw_size: u64,
    /// Size of `image.qcow2` in bytes.
    pub qcow2_size: u64,
}

/// The `skydd` extension of the predicate: what was run, changed and tested, so a reader of the
/// signed record sees more than SLSA's inputs and outputs (docs/IMAGE-PIPELINE.md, "Provenance").
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SkyddRecord {
    /// Role, store version, parent, changes and sizes.
    pub image: ImageIdentity,
    /// Every step with command, status and duration.
    pub steps: Vec<StepRecord>,
    /// Every hardening action and what it changed.
    pub hardening: Vec<HardeningRecord>,
    /// Every security check (passes too, with inventories) and the OpenSCAP result; `verify`
    /// refuses a record whose checks did not all pass.
    pub tests: TestReport,
    /// Each verified `InRelease`: suite, date, signer, digest.
    pub releases: Vec<ReleaseRecord>,
    /// Every installed package with version, architecture and `.deb` sha256.
    pub packages: Vec<InstalledPackage>,
}

// ---- DSSE ------------------------------------------------------------------------------------

// The envelope format and its verification are shared with the secure component and the TTP,
// which check image allowlists (docs/IMAGE-PIPELINE.md "Signer").
pub use protocol::dsse::{pae, Envelope, EnvelopeSignature, SignerTrust as TrustPolicy};

/// The pipeline's signing key and its certificate.
pub struct Signer {
    key: protocol::signing::SignatureKey,
    /// Who signs: the certificate's role (always `cloud-platform`) and name (normally
    /// [`DEFAULT_SIGNER_NAME`]).
    pub identity: Identity,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({}, key redacted)", self.identity)
    }
}

impl Signer {
    /// Loads a signer from PEM text: a PKCS#8 P-256 private key and its certificate (first one in
    /// the PEM). Fails with [`Error::SigningKey`] if the key does not belong to the certificate or
    /// the certificate is not a `cloud-platform` one.
    pub fn from_pem(key_pem: &str, cert_pem: &str) -> Result<Self> {
        let cert_der = protocol::pki::certs_from_pem(cert_pem, "signing certificate")?
            .first()
            .map(|c| c.to_vec())
            .ok_or_else(|| Error::SigningKey("the certificate file holds no certificate".into()))?;
        // Checks the key is P-256 PKCS#8 and belongs to the certificate.
        let key = protocol::signing::SignatureKey::from_pem(key_pem, cert_der.clone())?;
        let identity = protocol::pki::identity_from_certificate(&cert_der)?;
        if identity.role != Role::CloudPlatform {
            return Err(Error::SigningKey(format!(
                "the certificate is for {identity}; image provenance is signed with a cloud-platform certificate (e.g. named {DEFAULT_SIGNER_NAME})"
            )));
        }
        Ok(Self { key, identity })
    }

    /// [`Signer::from_pem`] from files; the key's PEM is zeroized after use.
    pub fn from_files(key: &Path, cert: &Path) -> Result<Self> {
        let key_pem = Zeroizing::new(fsx::read_string(key, "signing key")?);
        let cert_pem = fsx::read_string(cert, "signing certificate")?;
        Self::from_pem(&key_pem, &cert_pem)
    }

    /// Signs a provenance statement: its compact JSON becomes the payload of a [`PAYLOAD_TYPE`]
    /// envelope.
    pub fn sign(&self, statement: &Statement) -> Result<Envelope> {
        let payload = serde_json::to_vec(statement).map_err(|e| Error::json("encode the statement", e))?;
        Ok(self.sign_payload(PAYLOAD_TYPE, &payload))
    }

    /// A DSSE envelope over any payload (the allowlist uses its own payload type).
    pub fn sign_payload(&self, payload_type: &str, payload: &[u8]) -> Envelope {
        self.key.sign_dsse(payload_type, payload)
    }
}

/// What a successful verification established.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The identity of the certificate that signed, as checked against the [`TrustPolicy`].
    pub signer: Identity,
    /// The decoded statement, checked as described on [`verify`].
    pub statement: Statement,
}

/// Checks the envelope's signature and signer, then the statement: the required steps all
/// ran and succeeded, every security test passed, and each subject file in `dir` has the
/// recorded digest. The error names the first deviation.
pub fn verify(envelope_bytes: &[u8], dir: &Path, policy: &TrustPolicy) -> Result<Verified> {
    verify_with(envelope_bytes, &dir.display().to_string(), &|name: &str| Some(dir.join(name)), policy)
}

/// As `verify`, with `locate` mapping each subject name to the file that holds it (the
/// store keeps files under their digests).
pub fn verify_with(
    envelope_bytes: &[u8],
    subject: &str,
    locate: &dyn Fn(&str) -> Option<std::path::PathBuf>,
    policy: &TrustPolicy,
) -> Result<Verified> {
    let subject = subject.to_string();
    let refuse = |reason: String| Error::refused(subject.clone(), reason);
    let (signer, payload) = open_envelope(envelope_bytes, PAYLOAD_TYPE, &subject, policy)?;
    let statement: Statement = serde_json::from_slice(&payload)
        .map_err(|e| refuse(format!("the signed payload is not an in-toto statement: {e}")))?;
    if statement.statement_type != STATEMENT_TYPE || statement.predicate_type != PREDICATE_TYPE {
        return Err(refuse(format!(
            "statement type {} / predicate {} is not {STATEMENT_TYPE} / {PREDICATE_TYPE}",
            statement.statement_type, statement.predicate_type
        )));
    }
    let steps = &statement.predicate.skydd.steps;
    for required in REQUIRED_STEPS {
        match steps.iter().find(|s| s.name == *required) {
            None => return Err(refuse(format!("step {required} is not in the signed record"))),
            Some(s) if s.status != "ok" => {
                return Err(refuse(format!("step {required} did not succeed: {}", s.status)))
            }
            Some(_) => {}
        }
    }
    if let Some(bad) = steps.iter().find(|s| s.status != "ok") {
        return Err(refuse(format!("step {} did not succeed: {}", bad.name, bad.status)));
    }
    let tests = &statement.predicate.skydd.tests;
    if !tests.passed() {
        return Err(refuse(format!("security tests failed: {}", tests.violations().join("; "))));
    }
    if statement.subject.is_empty() {
        return Err(refuse("the statement names no subject".into()));
    }
    for s in &statement.subject {
        let expected = s.sha256().ok_or_else(|| refuse(format!("subject {} has no sha256", s.name)))?;
        if s.name.contains('/') || s.name.starts_with('.') {
            return Err(refuse(format!("subject name {:?} is not a plain file name", s.name)));
        }
        let path =
            locate(&s.name).ok_or_else(|| refuse(format!("{} is not present (archived or destroyed?)", s.name)))?;
        let actual = crate::debian::sha256_of_file(&path).map_err(|e| refuse(format!("subject {}: {e}", s.name)))?;
        if actual != expected {
            return Err(refuse(format!(
                "{} has sha256 {actual}, the signed record says {expected}: the image was changed after it was built",
                s.name
            )));
        }
    }
    Ok(Verified { signer, statement })
}

/// Checks a DSSE envelope's type, signature and signer ([`protocol::dsse::open_envelope`]) and
/// returns the signer and the payload.
pub fn open_envelope(
    envelope_bytes: &[u8],
    payload_type: &str,
    subject: &str,
    policy: &TrustPolicy,
) -> Result<(Identity, Vec<u8>)> {
    protocol::dsse::open_envelope(envelope_bytes, payload_type, subject, policy).map_err(refusal)
}

/// A refused envelope as this crate's [`Error::refused`], so `verify` and `allowlist --verify`
/// say "refused" alike.
pub(crate) fn refusal(error: protocol::Error) -> Error {
    match error {
        protocol::Error::Envelope { subject, reason } => Error::refused(subject, reason),
        other => Error::from(other),
    }
}

/// Decodes a statement from an envelope without verifying it (for display only).
pub fn statement_unverified(envelope_bytes: &[u8]) -> Result<Statement> {
    let payload = protocol::dsse::payload_unverified(envelope_bytes)?;
    serde_json::from_slice(&payload).map_err(|e| Error::json("in-toto statement", e))
}

/// Formats a time as RFC 3339 UTC (`2024-05-01T12:00:00Z`), as SLSA `startedOn`/`finishedOn` want;
/// falls back to the decimal seconds if formatting fails.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    let secs = t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .ok()
        .and_then(|d| d.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| secs.to_string())
}
