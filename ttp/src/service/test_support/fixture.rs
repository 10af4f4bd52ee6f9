//! The fixture of the key-release and integrity tests: a TTP with the recorded swtpm host enrolled and one
//! registered domain, and builders for the request's parts.

use std::sync::Arc;

use protocol::attest::QuoteEvidence;
use protocol::domain::{AccessMode, AclEntry, Descriptor};
use protocol::messages::{
    grant_digest, HeaderRecord, KeyReleaseRequest, KeyReleaseResponse, MountGrant, Placement, RegisterDomainRequest,
};
use protocol::pki::{Identity, Role};
use protocol::secret::SecretBytes;
use protocol::signing::{SignatureContext, SignatureKey, SignedEnvelope};
use serde::Deserialize;
use skydd_ca::CertificateAuthority;

use crate::attestation::{AttestationPolicy, HostRecord, ReferenceState};
use crate::error::{Error, Result};
use crate::service::test_support::key_of;
use crate::service::Ttp;
use crate::store::{now_unix, SqlStore, TtpStore};

/// The recorded swtpm evidence.
#[derive(Deserialize)]
struct Vectors {
    host: HostRecord,
    reference_state: ReferenceState,
    /// Hex of the nonce the quote is over.
    quote_nonce: String,
    quote: QuoteEvidence,
}

fn vectors() -> Vectors {
    serde_json::from_str(include_str!("../../../tests/vectors/attested_host.json")).expect("the recorded vectors parse")
}

/// The recorded host (its secure component's certificate name).
pub(crate) const HOST: &str = "compute-1";
/// A VM with `rw` in the domain's access list: the one the tests attach.
pub(crate) const VM: &str = "vm-a";
/// Another VM with `rw` access, for grants and placements of the wrong VM.
pub(crate) const OTHER_VM: &str = "vm-b";
/// A VM with `ro` access only.
pub(crate) const RO_VM: &str = "vm-ro";
/// The domain's owner.
pub(crate) const OWNER: &str = "dm-alice";

/// A TTP with the recorded host enrolled and one registered domain owned by [`OWNER`].
pub(crate) struct Fixture {
    pub(crate) ttp: Ttp,
    ca: (String, zeroize::Zeroizing<String>),
    pub(crate) owner: SignatureKey,
    /// The operator's placement authority (a cloud-platform certificate).
    pub(crate) operator: SignatureKey,
    pub(crate) nonce: Vec<u8>,
    pub(crate) quote: QuoteEvidence,
    pub(crate) descriptor: Descriptor,
    pub(crate) header: HeaderRecord,
}

impl Fixture {
    pub(crate) fn new() -> Self {
        Self::with_reference_state(|_| {})
    }

    /// As [`Fixture::new`], with the attestation policy's reference state changed. The
    /// store is SQLite in memory, or with `SKYDD_TTP_TEST_STORE=postgres` a fresh database
    /// on the test binary's PostgreSQL server (so every service test runs on both engines).
    pub(crate) fn with_reference_state(change: impl FnOnce(&mut ReferenceState)) -> Self {
        let store: Arc<dyn TtpStore> = match std::env::var("SKYDD_TTP_TEST_STORE").as_deref() {
            Ok("postgres") => {
                let url = skydd_testkit::postgres::Postgres::shared().create_database();
                let database = crate::store::Database::Postgres { url, pool_size: 4 };
                Arc::new(SqlStore::open_database(&database, crate::store::GroupCommit::On).unwrap())
            }
            _ => Arc::new(SqlStore::in_memory().unwrap()),
        };
        Self::on_store(store, change)
    }

    /// As [`Fixture::with_reference_state`], on `store` (an empty database).
    pub(crate) fn on_store(store: Arc<dyn TtpStore>, change: impl FnOnce(&mut ReferenceState)) -> Self {
        let vectors = vectors();
        assert_eq!(vectors.host.host_id, HOST);
        let mut state = vectors.reference_state;
        change(&mut state);
        let ca = CertificateAuthority::generate("cloud-ca").unwrap();
        let ttp = replica_of(&ca, state, store);
        ttp.store().put_host(HOST, &serde_json::to_string(&vectors.host).unwrap()).unwrap();
        let owner = key_of(&ca, Role::DomainManager, OWNER);
        let operator = key_of(&ca, Role::CloudPlatform, "cp-1");
        let acl = [(VM, AccessMode::Rw), (OTHER_VM, AccessMode::Rw), (RO_VM, AccessMode::Ro)]
            .map(|(vm_id, mode)| AclEntry { vm_id: vm_id.into(), mode })
            .to_vec();
        // Format 2, so the same domain serves the integrity tests (a format-1 domain has no root).
        let mut descriptor = Descriptor::new(OWNER, Default::default(), acl).unwrap();
        descriptor.volume_format = protocol::domain::VolumeFormat::V2;
        let header = register(&ttp, &owner, &descriptor, None);
        Self {
            ttp,
            ca,
            owner,
            operator,
            nonce: hex::decode(&vectors.quote_nonce).unwrap(),
            quote: vectors.quote,
            descriptor,
            header,
        }
    }

    /// Another TTP with the same K_TTP, signing key holder and policy over `store` (a store
    /// on the same database as the fixture's: a replica).
    pub(crate) fn replica(&self, store: Arc<dyn TtpStore>) -> Ttp {
        replica_of(&self.ca, vectors().reference_state, store)
    }

    /// Registers the next version of the domain with `policy` as its access policy (`None`:
    /// none) and makes it the header of the following requests.
    pub(crate) fn set_policy(&mut self, policy: Option<&str>) {
        let next = self.descriptor.next_version(|d| d.policy = policy.map(str::to_string)).unwrap();
        self.header = register(&self.ttp, &self.owner, &next, Some(self.header.registration.clone()));
        self.descriptor = next;
    }

    /// A signing key for `name` in `role` from the fixture's CA.
    pub(crate) fn key(&self, role: Role, name: &str) -> SignatureKey {
        key_of(&self.ca, role, name)
    }

    /// The recorded host's secure component, as the TLS layer identifies it.
    pub(crate) fn host(&self) -> Identity {
        Identity { name: HOST.into(), role: Role::SecureComponent }
    }

    /// Plants a challenge for `host_id` with `nonce`, as `Ttp::challenge` stores one; returns its id.
    pub(crate) fn plant_challenge(&self, host_id: &str, nonce: &[u8], expires_at: u64) -> String {
        let challenge_id = hex::encode(rand::random::<[u8; 16]>());
        self.ttp.store().put_challenge(&challenge_id, host_id, nonce, expires_at).unwrap();
        challenge_id
    }

    /// A fresh challenge for the recorded host over the recorded quote's nonce.
    pub(crate) fn challenge(&self) -> String {
        self.plant_challenge(HOST, &self.nonce, now_unix() + crate::service::CHALLENGE_TTL_SECS)
    }

    /// The owner's grant of `rw` on the domain to [`VM`], valid 10 minutes, with `change` applied.
    pub(crate) fn grant_with(&self, signer: &SignatureKey, change: impl FnOnce(&mut MountGrant)) -> SignedEnvelope {
        let mut grant = MountGrant {
            domain_id: self.descriptor.domain_id.clone(),
            vm_id: VM.into(),
            mode: AccessMode::Rw,
            expires_at: now_unix() + 600,
            nonce: rand::random(),
            issuer: OWNER.into(),
            purpose: String::new(),
            reason: String::new(),
        };
        change(&mut grant);
        signer.sign_envelope(SignatureContext::MountGrant, grant.encode())
    }

    /// A placement of `vm_id` on `host_id` for `grant`, signed by `signer`, dated `placed_at`.
    pub(crate) fn place(
        &self,
        signer: &SignatureKey,
        vm_id: &str,
        host_id: &str,
        grant: &SignedEnvelope,
        placed_at: u64,
    ) -> SignedEnvelope {
        let placement =
            Placement { vm_id: vm_id.into(), host_id: host_id.into(), grant_digest: grant_digest(grant), placed_at };
        signer.sign_envelope(SignatureContext::Placement, placement.encode())
    }

    /// A request that is granted: [`VM`] on [`HOST`], `rw`, fresh challenge, owner's grant,
    /// operator's placement made now.
    pub(crate) fn request(&self) -> KeyReleaseRequest {
        let grant = self.grant_with(&self.owner, |_| {});
        let placement = self.place(&self.operator, VM, HOST, &grant, now_unix());
        KeyReleaseRequest {
            host_id: HOST.into(),
            vm_id: VM.into(),
            mode: AccessMode::Rw,
            header: self.header.clone(),
            grant,
            placement,
            challenge_id: self.challenge(),
            quote: self.quote.clone(),
            launched_image: None,
        }
    }

    /// [`Fixture::request`] with another grant, placed by the operator for it.
    pub(crate) fn request_with_grant(&self, grant: SignedEnvelope) -> KeyReleaseRequest {
        let placement = self.place(&self.operator, VM, HOST, &grant, now_unix());
        KeyReleaseRequest { grant, placement, ..self.request() }
    }

    /// Enrolls `host_id` with the recorded host's TPM evidence (its AK and binding key), so
    /// that the recorded quote attests it as well: a second host for tests that need one.
    pub(crate) fn enroll_twin(&self, host_id: &str) {
        let host = HostRecord { host_id: host_id.into(), ..vectors().host };
        self.ttp.store().put_host(host_id, &serde_json::to_string(&host).unwrap()).unwrap();
    }

    /// A granted release of `vm_id` in `mode` to the enrolled `host_id`, with its own grant,
    /// placement and challenge, asked by that host's secure component.
    pub(crate) fn release_to(&self, host_id: &str, vm_id: &str, mode: AccessMode) -> KeyReleaseResponse {
        let grant = self.grant_with(&self.owner, |grant| {
            grant.vm_id = vm_id.into();
            grant.mode = mode;
        });
        let placement = self.place(&self.operator, vm_id, host_id, &grant, now_unix());
        let challenge_id = self.plant_challenge(host_id, &self.nonce, now_unix() + 60);
        let request = KeyReleaseRequest {
            host_id: host_id.into(),
            vm_id: vm_id.into(),
            mode,
            grant,
            placement,
            challenge_id,
            ..self.request()
        };
        self.ttp.release_key(&Identity { name: host_id.into(), role: Role::SecureComponent }, &request).unwrap()
    }

    /// Gives the recorded host a binding key made in software (the recorded one's template
    /// with a fresh RSA-2048 modulus) and returns its private half, so that a test can open
    /// what a release wraps; the quote still verifies with the recorded AK.
    pub(crate) fn software_binding_key(&self) -> openssl::rsa::Rsa<openssl::pkey::Private> {
        use tss_esapi::structures::{Public, PublicKeyRsa};
        use tss_esapi::traits::{Marshall, UnMarshall};
        let rsa = openssl::rsa::Rsa::generate(2048).unwrap();
        let Public::Rsa { object_attributes, name_hashing_algorithm, auth_policy, parameters, .. } =
            Public::unmarshall(&vectors().host.binding_public).unwrap()
        else {
            panic!("the recorded binding key is RSA");
        };
        let unique = PublicKeyRsa::try_from(rsa.n().to_vec()).unwrap();
        let public = Public::Rsa { object_attributes, name_hashing_algorithm, auth_policy, parameters, unique };
        let host = HostRecord { binding_public: public.marshall().unwrap(), ..vectors().host };
        self.ttp.store().put_host(HOST, &serde_json::to_string(&host).unwrap()).unwrap();
        rsa
    }

    pub(crate) fn release(&self, request: &KeyReleaseRequest) -> Result<KeyReleaseResponse> {
        self.ttp.release_key(&self.host(), request)
    }

    /// Asserts `request` from `actor` is refused with `code`, and that the refusal is the
    /// last audit record (a `key_release` with that outcome, in an intact chain).
    pub(crate) fn refused_for(&self, actor: &Identity, request: &KeyReleaseRequest, code: &str) -> Error {
        let error = match self.ttp.release_key(actor, request) {
            Ok(_) => panic!("the release was granted, expected {code}"),
            Err(error) => error,
        };
        assert_eq!(error.code(), code, "{error}");
        let record = self.ttp.store().audit_records(None).unwrap().pop().expect("an audit record");
        assert_eq!((record.event.as_str(), record.outcome.as_str()), ("key_release", code));
        assert_eq!(record.message, error.to_string());
        self.ttp.verify_audit_chain().unwrap();
        error
    }

    /// Asserts that [`Fixture::request`] with the placement `place` makes for its grant is
    /// refused with `code`.
    pub(crate) fn refused_placement(&self, place: impl FnOnce(&SignedEnvelope) -> SignedEnvelope, code: &str) -> Error {
        let request = self.request();
        let placement = place(&request.grant);
        self.refused(&KeyReleaseRequest { placement, ..request }, code)
    }

    /// [`Fixture::refused_for`] with the recorded host as the caller.
    pub(crate) fn refused(&self, request: &KeyReleaseRequest, code: &str) -> Error {
        self.refused_for(&self.host(), request, code)
    }
}

fn replica_of(ca: &(String, zeroize::Zeroizing<String>), state: ReferenceState, store: Arc<dyn TtpStore>) -> Ttp {
    Ttp::new(
        SecretBytes::from_slice_wiping(&mut [7u8; 32]),
        key_of(ca, Role::Ttp, "ttp-1"),
        vec![ca.0.clone()],
        AttestationPolicy { reference_states: vec![state], ..Default::default() },
        store,
    )
    .unwrap()
}

/// Registers `descriptor` (signed by `owner`) through the cloud platform; returns its header.
pub(crate) fn register(
    ttp: &Ttp,
    owner: &SignatureKey,
    descriptor: &Descriptor,
    previous: Option<SignedEnvelope>,
) -> HeaderRecord {
    let cloud = Identity { name: "cp-1".into(), role: Role::CloudPlatform };
    let signed = owner.sign_envelope(SignatureContext::Descriptor, descriptor.encode().unwrap());
    let request = RegisterDomainRequest { descriptor: signed.clone(), previous_registration: previous };
    let registration = ttp.register_domain(&cloud, &request).unwrap().registration;
    HeaderRecord { descriptor: signed, registration, rotation: None }
}

pub(crate) fn assert_mentions(error: &Error, text: &str) {
    assert!(error.to_string().contains(text), "expected '{text}' in: {error}");
}
