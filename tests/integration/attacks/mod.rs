//! The attack matrix: the parties are built to distrust each other, and
//! each attack below goes through a PUBLIC interface of the all-in-one cloud (the HTTPS APIs
//! of the TTP, the cloud platform (CP) and the secure components (SC), the volume files the
//! CP stores, TLS itself) and asserts the refusal, its specific code, and — where the TTP
//! decides — the TTP's audit record of it.
//!
//! | id  | attacker        | attack                                                                  | refused with | test |
//! |-----|-----------------|-------------------------------------------------------------------------|--------------|------|
//! | C1  | cloud platform  | edits the ACL in a volume header (adds a VM), keeps the owner signature  | `descriptor_signature_invalid` (audited) | `cloud_platform::c1_an_acl_edited_in_the_header_is_refused` |
//! | C2  | cloud platform  | replays the old header after a revoke                                   | `version_rollback` (audited) | `cloud_platform::c2_a_rolled_back_header_is_refused` |
//! | C3  | cloud platform  | swaps the whole header of domain B into domain A's volume               | `grant_mismatch` (audited) | `cloud_platform::c3_another_domains_header_is_refused` |
//! | C4  | cloud platform  | splices domain B's registration under domain A's descriptor             | `registration_mismatch` (audited) | `cloud_platform::c4_a_spliced_registration_is_refused` |
//! | C5  | cloud platform  | forges a registration with its own key                                  | `registration_mismatch` (audited) | `cloud_platform::c5_a_registration_the_cp_signs_is_refused` |
//! | C6  | cloud platform  | bumps the version of an owner-signed descriptor and registers it        | `descriptor_signature_invalid` (audited) | `cloud_platform::c6_a_version_bumped_by_the_cp_is_refused` |
//! | C7  | cloud platform  | re-uses the owner's grant for vm-a to attach vm-b                       | `grant_mismatch` (audited) | `cloud_platform::c7_a_grant_for_another_vm_is_refused` |
//! | C12 | cloud platform  | replays a grant it forwarded once, after the owner detached the VM      | `grant_replayed` (audited) | `cloud_platform::c12_a_replayed_grant_is_refused` |
//! | C13 | anyone with a TTP-role certificate | signs a registration (its own r) for a domain | `registration_mismatch` (audited) | `cloud_platform::c13_a_registration_signed_by_another_ttp_identity_is_refused` |
//! | C11 | cloud platform  | points the SC at another file (a host file; domain B's volume) with A's header | `bad_request` (SC; no key released) | `cloud_platform::c11_the_sc_refuses_another_file_for_a_volume` |
//! | C8  | compute host B  | forwards an attach: asks for a key claiming host A's id                 | `forbidden` (audited) | `hosts::c8_a_host_asking_as_another_host_is_refused` |
//! | C9  | compute host B  | sends host A's quote over its own challenge                             | `quote_invalid` (audited) | `hosts::c9_another_hosts_quote_is_refused` |
//! | C10 | compute host B  | uses a challenge issued to host A                                       | `challenge_invalid` (audited) | `hosts::c10_another_hosts_challenge_is_refused` |
//! | H1  | compute host    | replays an old quote with a fresh challenge id                          | `challenge_invalid` (audited) | `hosts::h1_an_old_quote_with_a_fresh_challenge_is_refused` |
//! | H2  | compute host    | PCRs changed after enrollment (an unapproved module)                    | `pcr_mismatch` (audited) | `hosts::h2_changed_pcrs_after_enrollment_are_refused` |
//! | H3  | compute host    | enrolls with another host's binding key                                 | `binding_key_invalid` (audited) | `enrollment::h3_another_hosts_binding_key_is_refused` |
//! | H4  | compute host    | enrolls a software RSA key (openssl) marshalled as TPMT_PUBLIC          | `binding_key_invalid` (audited) | `enrollment::h4_a_software_binding_key_is_refused` |
//! | H5  | compute host    | enrolls with a Certify signed by another TPM's AK                       | `binding_key_invalid` (audited) | `enrollment::h5_a_certify_by_another_tpm_is_refused` |
//! | H6  | compute host    | replays a Certify from an earlier enrollment                            | `challenge_invalid` (audited) | `enrollment::h6_a_replayed_certify_is_refused` |
//! | H7  | compute host    | presents another TPM's EK public beside its EK certificate              | `ek_mismatch` (audited) | `enrollment::h7_another_tpms_ek_public_is_refused` |
//! | H8  | compute host    | enrolls under another host's name                                       | `forbidden` (audited) | `enrollment::h8_enrolling_under_another_hosts_name_is_refused` |
//! | H9  | compute host    | enrolls a binding key bound to untrusted PCR values                     | `binding_policy_untrusted` (audited) | `enrollment::h9_a_binding_key_bound_to_untrusted_pcrs_is_refused` |
//! | H10 | unenrolled host | asks for a key release                                                  | `host_unknown` (audited) | `hosts::h10_an_unenrolled_host_is_refused` |
//! | H11 | stolen host TLS key | a second genuine TPM (same vendor CA) enrolls as an enrolled host   | `ek_pinned` (audited, names both EKs) | `pinning::a_second_genuine_tpm_claiming_a_host` |
//! | H12 | compute host    | enrolls an EK already enrolled under another host id                    | `ek_in_use` (audited) | `pinning::a_second_genuine_tpm_claiming_a_host` |
//! | H13 | operator        | replaces a host's TPM (`ttp host replace`), then the new TPM enrolls     | `ok`, once (audited `host_replace`; the enrollment names old and new EK) | `pinning::a_second_genuine_tpm_claiming_a_host` |
//! | H14 | operator / host | a resettable PCR (16, 23) in the policy or in an enrollment's selection | `pcr_resettable` (TTP refuses to start; enrollment audited) | `pinning::a_pcr_16_reset_is_refused_in_policy_and_selection` |
//! | H15 | compute host    | a replaced secure-component binary (measured start-up)                  | `binding_policy_untrusted` at enrollment; `pcr_mismatch` at release, and the TPM refuses to decrypt | `pinning::a_replaced_secure_component_binary` |
//! | D1  | domain manager  | attaches another owner's domain through the CP                          | `forbidden` (CP; never reaches the TTP) | `domain_managers::d1_attaching_another_owners_domain_is_refused` |
//! | D2  | domain manager  | changes the ACL of a domain only shared with it                         | `owner_mismatch` (CP) | `domain_managers::d2_d3_d4_a_shared_manager_cannot_change_or_delete` |
//! | D3  | domain manager  | deletes a domain only shared with it, through the CP                    | `owner_mismatch` (CP) | `domain_managers::d2_d3_d4_a_shared_manager_cannot_change_or_delete` |
//! | D4  | domain manager  | deletes another owner's domain directly at the TTP                      | `owner_mismatch` (audited) | `domain_managers::d2_d3_d4_a_shared_manager_cannot_change_or_delete` |
//! | D5  | domain manager  | creates a domain naming another owner, through the CP                   | `owner_mismatch` (CP) | `domain_managers::d5_d6_a_domain_naming_another_owner_is_refused` |
//! | D6  | domain manager  | signs a descriptor naming another owner, registered directly            | `descriptor_signature_invalid` (audited) | `domain_managers::d5_d6_a_domain_naming_another_owner_is_refused` |
//! | D7  | domain manager  | grants a mount of a domain it does not manage                           | `grant_signer_not_authorized` (audited) | `domain_managers::d7_a_grant_for_a_domain_not_managed_is_refused` |
//! | D8  | domain manager  | signs a grant that names another issuer                                 | `grant_signature_invalid` (audited) | `domain_managers::d8_a_grant_naming_another_issuer_is_refused` |
//! | D9  | domain manager  | reads another owner's viewing history                                   | `forbidden` | `domain_managers::d9_reading_another_owners_history_is_refused` |
//! | D10 | domain manager  | calls the TTP's key release with its certificate                        | `forbidden` (audited) | `domain_managers::d10_a_domain_manager_at_the_key_release_is_refused` |
//! | D11 | domain manager  | creates a domain with an existing domain's id                           | `domain_exists` (CP) | `domain_managers::d11_a_domain_with_an_existing_id_is_refused` |
//! | T1  | anyone          | TLS without a client certificate (TTP, CP, SC)                          | `net::Error::Tls` + server HandshakeFailure "no client certificate presented" | `tls::t1_tls_without_a_client_certificate_is_refused` |
//! | T2  | anyone          | TLS with a certificate of a foreign CA                                  | `net::Error::Tls` + HandshakeFailure "not issued by a trusted CA" | `tls::t2_t5_a_foreign_ca_certificate_is_refused` |
//! | T3  | anyone          | TLS with an expired certificate (of a trusted partner CA)               | `net::Error::Tls` + HandshakeFailure "expired" | `tls::t3_t4_an_expired_certificate_is_refused` |
//! | T4  | anyone          | a descriptor signed with an expired certificate                         | `descriptor_signature_invalid` (audited) | `tls::t3_t4_an_expired_certificate_is_refused` |
//! | T5  | anyone          | a grant signed with a foreign-CA certificate of the owner's name         | `grant_signature_invalid` (audited) | `tls::t2_t5_a_foreign_ca_certificate_is_refused` |
//! | T6  | domain manager  | calls a secure component (wrong role for that server)                   | `net::Error::Tls` (role refused) | `tls::t6_a_domain_manager_at_a_secure_component_is_refused` |
//! | T7  | anyone          | TLS 1.2 only (OpenSSL client)                                           | handshake refused (protocol version) | `tls::t7_tls_1_2_is_refused` |
//! | T8  | TTP impostor    | a CP certificate answering where the TTP is expected                    | `net::Error::Tls` (server role refused by the client) | `tls::t8_a_cp_answering_as_the_ttp_is_refused` |
//! | T9  | domain manager  | TLS with a certificate the CA revoked while the cloud runs (TTP, CP)     | `net::Error::Tls` + "certificate is revoked" (after one 2 s file watch: 1.6–2.1 s seen) | `tls::t9_t10_a_certificate_revoked_while_the_cloud_runs` |
//! | T10 | domain manager  | a mount grant signed before its signer's certificate was revoked         | `grant_signature_invalid` "certificate is revoked" (audited) | `tls::t9_t10_a_certificate_revoked_while_the_cloud_runs` |
//! | T11 | partner CA      | issues a cloud-platform certificate; its root may issue only domain managers and one named host | `net::Error::Tls` + HandshakeFailure naming the root, the role and the allowed roles | `tls::t11_t12_a_partner_root_issues_only_the_roles_and_hosts_it_is_allowed` |
//! | T12 | partner CA      | issues a secure-component certificate for a host outside its allowance  | `net::Error::Tls` + HandshakeFailure (same words); the allowed host and a partner domain manager are served | `tls::t11_t12_a_partner_root_issues_only_the_roles_and_hosts_it_is_allowed` |
//! | B1  | anyone          | bodies over every limit (2 MiB + 1 KiB) on every route of TTP, CP, SC    | 413 `bad_request` JSON on every body route | `bodies::b1_bodies_over_every_limit` |
//! | B2  | anyone          | malformed JSON on every route                                           | 400 `bad_request` JSON on every body route | `bodies::b2_malformed_json` |
//! | B3  | anyone          | JSON of the wrong shape on every route                                  | 422 `bad_request` JSON on every body route | `bodies::b3_json_of_the_wrong_shape` |
//! | B4  | anyone          | a non-JSON content type on every route                                  | 415 `bad_request` JSON on every body route | `bodies::b4_a_non_json_content_type` |
//! | B5  | anyone          | a JSON nesting bomb (100k '[') on every route                           | 422 `bad_request` JSON (serde's recursion limit), no crash | `bodies::b5_a_json_nesting_bomb` |
//! | B6  | anyone          | path traversal in ids (`../../etc/passwd`)                              | 404 `domain_unknown` / 400 `bad_request` | `bodies::b6_path_traversal_in_ids` |
//! | I2  | domain manager  | re-registers another tenant's VM on another host (POST /v1/instances)    | `forbidden` (CP; placement is the operator's) | `tenants::i2_i8_a_tenant_cannot_move_list_or_name_another_tenant` |
//! | I3  | domain manager  | a second rw attach of a domain, or a ro one beside a rw one              | `single_writer` (CP, 409) | `tenants::i3_a_second_writer_is_refused` |
//! | I4  | domain manager  | declares more than its quota of volume bytes (8 x 1 TiB sparse, then one more) | `quota_exceeded` (CP, 403) | `tenants::i4_a_quota_exceeded_is_refused` |
//! | I5  | domain manager  | a grant valid beyond i64::MAX (its used mark would be purged at once)    | `grant_too_long` (audited) | `tenants::i5_a_grant_valid_forever_is_refused` |
//! | I6  | operator/tenant | VM ids `..`, `.`, `-x`                                                   | `bad_request` at placement; no key released | `tenants::i6_vm_ids_that_are_path_components_are_refused` |
//! | I8  | domain manager  | lists every tenant's hosts/instances; reads a refusal naming an owner    | `forbidden`; the owner is not named | `tenants::i2_i8_a_tenant_cannot_move_list_or_name_another_tenant` |
//! | P1  | compute host B  | asks for vm-a's key with the CP's placement of vm-a on host A            | `placement_mismatch` (audited) | `hosts::p1_another_hosts_placement_is_refused` |
//! | P2  | domain manager  | signs a placement of a VM on a host itself                              | `placement_invalid` (audited) | `hosts::p2_a_placement_signed_by_a_tenant_is_refused` |
//! | P3  | compute host    | a CP placement made for another grant                                   | `placement_mismatch` (audited) | `hosts::p3_a_placement_for_another_grant_is_refused` |
//! | P4  | compute host    | a CP placement older than 300 s                                         | `placement_invalid` (audited) | `hosts::p4_a_stale_placement_is_refused` |
//! | X1  | cloud platform  | edits the access policy in a volume header (widens it), keeps the owner signature | `descriptor_signature_invalid` (audited) | `policies::x1_a_policy_edited_by_the_cp_is_refused` |
//! | X2  | domain manager  | a break-glass (purpose `emergency`) grant without a reason               | `break_glass_reason_missing` (audited as `break_glass_release`) | `policies::x2_break_glass_needs_a_reason_and_the_owner_is_notified` |
//!
//! The TTP and the SC limit bodies to 1 MiB, the CP to 2 MiB; B1 exceeds both.
//! Routes without a request body ignore a body (they answer as without one, never 5xx,
//! never hang); that is checked for every such route in B1–B5 too.
//!
//! Revocation is by the cloud CA's revocation list (`crl.pem`, docs/PKI.md "Revocation"),
//! which every party of the lab checks (T9, T10); there is no OCSP.//!
//! Each row (or a few rows that build on one another, named together) is its own `#[test]`.
//! They share ONE all-in-one cloud, started on first use on a runtime of its own
//! ([`run`]); each test makes its own domains, VMs' grants and identities, so none depends on
//! another having run. Rows that change what they attack use a part no other row touches:
//! H2 changes the measured state of compute-3 (which runs no other row's VM), H9 that of a
//! TPM of its own, T9 revokes dm-frank (only T10 uses it), I4 fills dm-erin's quota.

mod bodies;
mod cloud_platform;
mod domain_managers;
mod enrollment;
mod hosts;
mod pinning;
mod policies;
mod raw;
mod tenants;
mod tls;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use net::{Role, TlsFiles};
use protocol::attest::{CredentialChallenge, EnrollmentProof, EnrollmentRequest, PcrSelection};
use protocol::cloud::{
    Attachment, CreateAttachmentRequest, CreateDomainRequest, DeleteDomainBody, DomainView, Instance, InstanceList,
    UpdateDomainRequest,
};
use protocol::domain::{AccessMode, AclEntry, Descriptor};
use protocol::format;
use protocol::messages::{
    AuditRecord, ChallengeResponse, DeleteDomainRequest, HeaderRecord, HistoryResponse, KeyReleaseRequest,
    KeyReleaseResponse, RegisterDomainRequest, RegisterDomainResponse, Registration,
};
use protocol::signing::{SignatureContext, SignatureKey, SignedEnvelope};
use raw::{client_with, connector, error_code_of, expired_certificate, raw_request, RawTarget};
use skydd::cloud::{AllInOne, Layout};
use skydd::lab::{DomainManager, LabHost, LabPki, Operator, RunningTtp};
use skydd_ca::{CertificateAuthority, Validity};
use skydd_testkit::audit::{assert_audited_n, records as audit_records};
use skydd_testkit::now_unix;
use skydd_testkit::refusal::{expect_code, ttp_code as enroll_code};
use skydd_testkit::shared::{at_exit, Shared};
use tokio_util::sync::CancellationToken;

// ---- the shared cloud ------------------------------------------------------------------------------

/// The demo's cloud plus what lets each attack stand alone: compute-3 (vm-h2) is the host whose
/// measured state H2 changes (no other VM runs there), and dm-erin is the manager whose quota
/// I4 uses up.
const ATTACK_LAYOUT: Layout<'static> = Layout {
    hosts: &[("compute-1", &["vm-a"]), ("compute-2", &["vm-b", "vm-c"]), ("compute-3", &["vm-h2"])],
    managers: &["dm-alice", "dm-bob", "dm-erin"],
};

/// The all-in-one cloud every attack runs against, and the directory it lives in.
struct Cloud {
    cloud: AllInOne,
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for Cloud {
    type Target = AllInOne;

    fn deref(&self) -> &AllInOne {
        &self.cloud
    }
}

/// One cloud for every attack, started on first use on a runtime of its own (so that it
/// outlives each test) and stopped when the test binary exits. The attacks take turns: each
/// counts the audit records it adds to the TTP's one chain.
static CLOUD: OnceLock<Shared<Cloud>> = OnceLock::new();

extern "C" fn stop_the_cloud() {
    if let Some(shared) = CLOUD.get() {
        shared.stop(|Cloud { cloud, _dir }| async move {
            cloud.stop().await;
            drop(_dir);
        });
    }
}

/// Runs one attack on the shared cloud, on the cloud's runtime, in its turn.
fn run<F: std::future::Future<Output = ()>>(attack: impl FnOnce(World) -> F) {
    let shared = CLOUD.get_or_init(|| {
        at_exit(stop_the_cloud);
        Shared::start(async {
            let dir = tempfile::tempdir().expect("a directory for the cloud");
            let cloud = AllInOne::start(dir.path(), &ATTACK_LAYOUT, &mut |line| println!(".. {line}"))
                .await
                .expect("start the all-in-one cloud");
            Cloud { cloud, _dir: dir }
        })
    });
    shared.run(|cloud| attack(World::new(cloud)));
}

/// The parties every attack starts from: the cloud, its two tenants, the CP's identities.
struct World {
    cloud: Arc<Cloud>,
    alice: DomainManager,
    bob: DomainManager,
    alice_cp: net::Client,
    bob_cp: net::Client,
    bob_ttp: net::Client,
    cp_ttp: net::Client,
    /// The all-in-one CP's own certificate: the placements it signs for each attach.
    op: Operator,
    c1_ttp: net::Client,
    c2_ttp: net::Client,
}

impl World {
    fn new(cloud: Arc<Cloud>) -> Self {
        let pki = &cloud.pki;
        let (ttp_url, cp_url) = (cloud.ttp.url.clone(), cloud.cp_url.clone());
        assert_eq!((cloud.hosts[0].id.as_str(), cloud.hosts[1].id.as_str()), ("compute-1", "compute-2"));
        Self {
            alice: signer(pki, "dm-alice"),
            bob: signer(pki, "dm-bob"),
            alice_cp: pki.client("dm-alice", Role::CloudPlatform, &cp_url).unwrap(),
            bob_cp: pki.client("dm-bob", Role::CloudPlatform, &cp_url).unwrap(),
            bob_ttp: pki.client("dm-bob", Role::Ttp, &ttp_url).unwrap(),
            cp_ttp: pki.client("cloud-platform", Role::Ttp, &ttp_url).unwrap(),
            op: Operator::of(pki, "cloud-platform").unwrap(),
            c1_ttp: pki.client("compute-1", Role::Ttp, &ttp_url).unwrap(),
            c2_ttp: pki.client("compute-2", Role::Ttp, &ttp_url).unwrap(),
            cloud,
        }
    }
}

/// Two fresh domains of dm-alice for one attack. Domain A: vm-a rw, vm-b ro. Domain B: vm-a rw.
struct Domains {
    desc_a: Descriptor,
    view_a: DomainView,
    desc_b: Descriptor,
    view_b: DomainView,
    id_a: String,
    id_b: String,
    /// Domain A's volume file, as the CP stores it.
    path_a: PathBuf,
    /// The header in force on domain A's volume.
    header_a: HeaderRecord,
    /// dm-alice's grant of domain A to vm-a, rw.
    grant_a: SignedEnvelope,
}

impl Domains {
    async fn create(w: &World) -> Self {
        let (desc_a, view_a) =
            create_domain(&w.alice_cp, &w.alice, &[("vm-a", AccessMode::Rw), ("vm-b", AccessMode::Ro)]).await;
        let (desc_b, view_b) = create_domain(&w.alice_cp, &w.alice, &[("vm-a", AccessMode::Rw)]).await;
        let (id_a, id_b) = (desc_a.domain_id.clone(), desc_b.domain_id.clone());
        let path_a = volume_path(&w.cloud, &id_a);
        assert!(path_a.exists(), "{}", path_a.display());
        let header_a = view_a.header.clone();
        let grant_a = w.alice.grant(&id_a, "vm-a", AccessMode::Rw, 300);
        Self { desc_a, view_a, desc_b, view_b, id_a, id_b, path_a, header_a, grant_a }
    }
}

// ---- helpers: refusals and the audit log -------------------------------------------------------

/// The newest audit record is the refusal just seen, of `event`, and the chain verifies.
fn assert_audited(ttp: &ttp::service::Ttp, before: usize, event: &str, code: &str) -> AuditRecord {
    let record = assert_audited_n(ttp, before, 1, event, code);
    ttp.verify_audit_chain().expect("the audit chain verifies");
    record
}

/// `cp` attaches `vm` to `domain_id` in `mode` with the owner's grant for exactly that: the
/// TTP refuses with `code`, audited as the one record the attempt added; returns the
/// refusal's message and record.
async fn refused_attach(
    ttp: &ttp::service::Ttp,
    cp: &net::Client,
    owner: &DomainManager,
    domain_id: &str,
    vm: &str,
    mode: AccessMode,
    code: &str,
) -> (String, AuditRecord) {
    let before = audit_records(ttp).len();
    let message = expect_code(attach(cp, domain_id, vm, mode, owner.grant(domain_id, vm, mode, 300)).await, code);
    (message, assert_audited(ttp, before, "key_release", code))
}

/// `client` asks the TTP's key release for `request`: refused with `code`, audited as the one
/// record the attempt added (and the chain verifies); returns the refusal's message and record.
async fn refused_release(
    ttp: &ttp::service::Ttp,
    client: &net::Client,
    request: &KeyReleaseRequest,
    code: &str,
) -> (String, AuditRecord) {
    let before = audit_records(ttp).len();
    let message = expect_code(client.post_json::<_, KeyReleaseResponse>("/v1/key-releases", request).await, code);
    (message, assert_audited(ttp, before, "key_release", code))
}

/// dm-alice's viewing history of `domain_id` (at the TTP) holds a refusal with `code`.
async fn assert_in_history(cloud: &AllInOne, domain_id: &str, code: &str) {
    let alice_ttp = cloud.pki.client("dm-alice", Role::Ttp, &cloud.ttp.url).unwrap();
    let history: HistoryResponse =
        alice_ttp.get_json(&format!("/v1/domains/{domain_id}/history")).await.expect("alice reads her history");
    let outcomes: Vec<&str> = history.records.iter().map(|r| r.outcome.as_str()).collect();
    assert!(outcomes.contains(&code), "the history of {domain_id} lacks {code}: {outcomes:?}");
}

/// A TLS refusal seen by the client (`Tls`), or the close that a refused handshake can turn
/// into when the kernel resets the connection before the alert is read.
fn expect_tls_refusal<T: std::fmt::Debug>(result: Result<T, net::Error>) -> String {
    match result {
        Err(net::Error::Tls { reason, .. }) => reason,
        Err(net::Error::Connect { reason, .. }) if reason.contains("closed the connection") => {
            format!("connection closed: {reason}")
        }
        // hyper reports a connection the server closed right after refusing the handshake as
        // "connection was not ready" when the close wins the race with the alert (seen in CI).
        Err(net::Error::Request { detail, .. })
            if detail.contains("connection was not ready") || detail.contains("connection closed") =>
        {
            format!("connection closed during the handshake: {detail}")
        }
        other => panic!("expected a TLS refusal, got {other:?}"),
    }
}

// ---- helpers: identities -----------------------------------------------------------------------

/// A signer from certificate files already in the lab's PKI directory (not re-issued).
fn signer(pki: &LabPki, name: &str) -> DomainManager {
    let material = TlsFiles::in_dir(&pki.dir, name).load().unwrap();
    let der = protocol::pki::certs_from_pem(&material.cert_pem, "certificate").unwrap()[0].to_vec();
    DomainManager { name: name.into(), key: SignatureKey::from_pem(&material.key_pem, der).unwrap() }
}

fn signer_from_pems(name: &str, cert_pem: &str, key_pem: &str) -> DomainManager {
    let der = protocol::pki::certs_from_pem(cert_pem, "certificate").unwrap()[0].to_vec();
    DomainManager { name: name.into(), key: SignatureKey::from_pem(key_pem, der).unwrap() }
}

// ---- helpers: domains and volumes ---------------------------------------------------------------

async fn create_domain(
    cp: &net::Client,
    owner: &DomainManager,
    acl: &[(&str, AccessMode)],
) -> (Descriptor, DomainView) {
    let descriptor = owner.new_domain(&[("department", "cardiology")], acl).unwrap();
    let view: DomainView = cp
        .post_json(
            "/v1/domains",
            &CreateDomainRequest { descriptor: owner.sign_descriptor(&descriptor).unwrap(), size_bytes: 16 << 20 },
        )
        .await
        .expect("create a domain");
    (descriptor, view)
}

async fn update_domain(cp: &net::Client, owner: &DomainManager, next: &Descriptor) -> DomainView {
    cp.put_json(
        &format!("/v1/domains/{}/descriptor", next.domain_id),
        &UpdateDomainRequest { descriptor: owner.sign_descriptor(next).unwrap() },
    )
    .await
    .expect("update the domain")
}

async fn attach(
    cp: &net::Client,
    domain_id: &str,
    vm: &str,
    mode: AccessMode,
    grant: SignedEnvelope,
) -> Result<Attachment, net::Error> {
    cp.post_json(
        "/v1/attachments",
        &CreateAttachmentRequest { domain_id: domain_id.into(), instance_id: vm.into(), mode, grant },
    )
    .await
}

fn volume_path(cloud: &AllInOne, domain_id: &str) -> PathBuf {
    cloud.dir.join("cloud-platform").join("volumes").join(format!("{domain_id}.vol"))
}

/// What a malicious cloud platform does with the files it stores: writes `record` as the
/// newest header slot of the volume (next sequence number, valid checksum).
fn plant_header(path: &Path, record: &HeaderRecord) {
    let file = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut area = vec![0u8; format::HEADER_AREA_SIZE];
    file.read_exact_at(&mut area, 0).unwrap();
    let active = format::decode_header_area(&area).unwrap();
    let (slot, seq) = format::next_slot_for_update(Some(&active)).unwrap();
    file.write_all_at(&format::encode_slot(seq, &record.encode()).unwrap(), format::slot_offset(slot)).unwrap();
    file.sync_all().unwrap();
}

/// A key-release request built by hand by a compute host's identity.
async fn quote_for(host: &skydd::cloud::ComputeNode, nonce: &[u8]) -> protocol::attest::QuoteEvidence {
    let nonce = nonce.to_vec();
    host.service.attested_host().tpm.run(move |tpm| tpm.quote(&nonce)).await.unwrap()
}

#[allow(clippy::too_many_arguments)]
fn release_request(
    operator: &Operator,
    host_id: &str,
    vm: &str,
    mode: AccessMode,
    header: &HeaderRecord,
    grant: &SignedEnvelope,
    challenge: &ChallengeResponse,
    quote: protocol::attest::QuoteEvidence,
) -> KeyReleaseRequest {
    KeyReleaseRequest {
        host_id: host_id.into(),
        vm_id: vm.into(),
        mode,
        header: header.clone(),
        grant: grant.clone(),
        // The placement the CP would have made for this VM on this host: the attacks below
        // fail on something else (or, for P1-P4, on a placement replaced afterwards).
        placement: operator.place(vm, host_id, grant),
        challenge_id: challenge.challenge_id.clone(),
        quote,
        launched_image: None,
    }
}

async fn next_failure(
    failures: &mut tokio::sync::mpsc::UnboundedReceiver<net::HandshakeFailure>,
) -> net::HandshakeFailure {
    tokio::time::timeout(Duration::from_secs(10), failures.recv())
        .await
        .expect("the server reports the failed handshake")
        .unwrap()
}

trait DeleteWithBody {
    async fn request_json_delete(&self, domain_id: &str, signer: &DomainManager) -> Result<DomainView, net::Error>;
}

impl DeleteWithBody for net::Client {
    /// `DELETE /v1/domains/{id}` with the signed deletion as its body (net::Client's
    /// `delete_json` sends none), through the generic request.
    async fn request_json_delete(&self, domain_id: &str, signer: &DomainManager) -> Result<DomainView, net::Error> {
        let body = DeleteDomainBody { deletion: signer.deletion(domain_id) };
        self.request_json("DELETE".parse().unwrap(), &format!("/v1/domains/{domain_id}"), Some(&body)).await
    }
}
