//! TLS and certificates: no certificate, a foreign CA, an expired certificate, the wrong
//! role, TLS 1.2, a certificate revoked while the cloud runs, a partner root issuing beyond
//! its limit (rows T1-T12). The tests that
//! watch the server's handshake failures use a federated TTP replica of their own ([`Partner`]).

use super::*;

/// A federated TTP replica: the same TTP identity, trusting the lab CA and a partner CA
/// (whose key the test holds, to make an expired certificate), with its handshake failures
/// observed. Stopped on drop.
struct Partner {
    service: Arc<ttp::service::Ttp>,
    url: String,
    failures: tokio::sync::mpsc::UnboundedReceiver<net::HandshakeFailure>,
    ca_pem: String,
    ca_key: zeroize::Zeroizing<String>,
    lab_ca_pem: String,
    stop: CancellationToken,
}

impl Partner {
    async fn start(cloud: &AllInOne, tag: &str) -> Self {
        Self::start_limited(cloud, tag, None).await
    }

    /// [`Partner::start`] with the partner root limited to `allow` (`None`: every role).
    async fn start_limited(cloud: &AllInOne, tag: &str, allow: Option<Vec<protocol::pki::RoleAllowance>>) -> Self {
        let pki = &cloud.pki;
        let extra = cloud.dir.join("extra").join(tag);
        std::fs::create_dir_all(&extra).unwrap();
        let (ca_pem, ca_key) = CertificateAuthority::generate("partner-ca").unwrap();
        let partner_ca_file = extra.join("partner-ca.pem");
        std::fs::write(&partner_ca_file, &ca_pem).unwrap();
        let partner_dir = extra.join("partner-ttp");
        let custodians = ttp::master_key::create_version(
            &partner_dir,
            &Default::default(),
            ttp::master_key::Custodians { shares: 3, threshold: 2 },
        )
        .unwrap();
        let ttp_files = TlsFiles::in_dir(&pki.dir, "ttp-1");
        let partner_config = ttp::config::TtpConfig {
            listen: "127.0.0.1:0".into(),
            data_dir: partner_dir.clone(),
            ca: vec![pki.dir.join("ca.pem").into(), net::TrustedRootFile { file: partner_ca_file.clone(), allow }],
            crl: Vec::new(),
            cert: ttp_files.cert.clone(),
            key: ttp_files.key.clone(),
            attestation: cloud.dir.join("attestation.toml"),
            registration_replicas: Vec::new(),
            limits: Default::default(),
            database_url: None,
            database_pool_size: 16,
            group_commit: true,
            master_key: Default::default(),
            trusted_launch: None,
        };
        let (service, partner_tls) =
            ttp::server::build_with_shares(&partner_config, &custodians.shares).expect("build the partner TTP");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://127.0.0.1:{}", listener.local_addr().unwrap().port());
        let (failures_tx, failures) = tokio::sync::mpsc::unbounded_channel::<net::HandshakeFailure>();
        let stop = CancellationToken::new();
        tokio::spawn(net::serve_with(
            listener,
            partner_tls,
            ttp::http::router(service.clone()),
            net::ServeOptions { failures: Some(failures_tx), ..Default::default() },
            stop.clone(),
        ));
        Self { service, url, failures, ca_pem, ca_key, lab_ca_pem: pki.ca_pem().to_string(), stop }
    }
}

impl Drop for Partner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// T1: TLS without a client certificate (TTP, CP, SC).
#[test]
fn t1_tls_without_a_client_certificate_is_refused() {
    run(|w| async move {
        let World { cloud, .. } = w;
        let mut p = Partner::start(&cloud, "t1").await;
        let compute1 = &cloud.hosts[0];
        // T1: no client certificate, at the partner TTP (observed) and at the TTP, CP and SC.
        let bare = |role: Role, url: &str| {
            net::Client::with_timeout(
                url,
                protocol::pki::client_config_without_certificate(std::slice::from_ref(&p.lab_ca_pem), &[], role)
                    .unwrap(),
                Duration::from_secs(20),
            )
            .unwrap()
        };
        expect_tls_refusal(bare(Role::Ttp, &p.url).post_json::<_, ChallengeResponse>("/v1/challenges", &()).await);
        let failure = next_failure(&mut p.failures).await;
        assert_eq!(failure.reason, "no client certificate presented");
        assert!(failure.peer.ip().is_loopback());
        expect_tls_refusal(
            bare(Role::Ttp, &cloud.ttp.url).post_json::<_, ChallengeResponse>("/v1/challenges", &()).await,
        );
        expect_tls_refusal(bare(Role::CloudPlatform, &cloud.cp_url).get_json::<serde_json::Value>("/v1/domains").await);
        expect_tls_refusal(
            bare(Role::SecureComponent, &compute1.agent_url).get_json::<serde_json::Value>("/v1/attachments").await,
        );
    });
}

/// T2 and T5: a certificate of a foreign CA on TLS (T2) and as the signer of a grant (T5).
#[test]
fn t2_t5_a_foreign_ca_certificate_is_refused() {
    run(|w| async move {
        let d = Domains::create(&w).await;
        let World { cloud, op, c1_ttp, .. } = w;
        let mut p = Partner::start(&cloud, "t2").await;
        let ttp = cloud.ttp.service.clone();
        let compute1 = &cloud.hosts[0];
        let Domains { id_a, header_a, .. } = d;
        // T2: a certificate named dm-alice from a foreign CA.
        let (rogue_ca, rogue_key) = CertificateAuthority::generate("rogue-ca").unwrap();
        let rogue_alice =
            CertificateAuthority::issue(&rogue_ca, &rogue_key, Role::DomainManager, "dm-alice", Validity::Days(30))
                .unwrap();
        expect_tls_refusal(
            client_with(
                std::slice::from_ref(&p.lab_ca_pem),
                &rogue_alice.cert_pem,
                &rogue_alice.key_pem,
                Role::Ttp,
                &p.url,
            )
            .get_json::<HistoryResponse>(&format!("/v1/domains/{id_a}/history"))
            .await,
        );
        let failure = next_failure(&mut p.failures).await;
        assert!(failure.reason.contains("not issued by a trusted CA"), "{}", failure.reason);
        expect_tls_refusal(
            client_with(
                std::slice::from_ref(&p.lab_ca_pem),
                &rogue_alice.cert_pem,
                &rogue_alice.key_pem,
                Role::CloudPlatform,
                &cloud.cp_url,
            )
            .get_json::<DomainView>(&format!("/v1/domains/{id_a}"))
            .await,
        );

        // T5: a grant signed with that certificate (the name is right, the CA is not).
        let rogue_signer = signer_from_pems("dm-alice", &rogue_alice.cert_pem, &rogue_alice.key_pem);
        let challenge: ChallengeResponse = c1_ttp.post_json("/v1/challenges", &()).await.unwrap();
        let quote = quote_for(compute1, &challenge.nonce).await;
        let request = release_request(
            &op,
            "compute-1",
            "vm-a",
            AccessMode::Rw,
            &header_a,
            &rogue_signer.grant(&id_a, "vm-a", AccessMode::Rw, 300),
            &challenge,
            quote,
        );
        let (message, _) = refused_release(&ttp, &c1_ttp, &request, "grant_signature_invalid").await;
        assert!(message.contains("not issued by a trusted CA"), "{message}");
    });
}

/// T3 and T4: an expired certificate of a trusted partner CA on TLS (T3) and as the signer of a descriptor (T4).
#[test]
fn t3_t4_an_expired_certificate_is_refused() {
    run(|w| async move {
        let d = Domains::create(&w).await;
        let World { cloud, .. } = w;
        let mut p = Partner::start(&cloud, "t3").await;
        let pki = &cloud.pki;
        let id_a = d.id_a;
        // T3: an expired certificate of the trusted partner CA, on TLS.
        let (expired_cert, expired_key) = expired_certificate(&p.ca_pem, &p.ca_key, Role::DomainManager, "dm-carol");
        let trust = [p.lab_ca_pem.clone()];
        expect_tls_refusal(
            client_with(&trust, &expired_cert, &expired_key, Role::Ttp, &p.url)
                .get_json::<HistoryResponse>(&format!("/v1/domains/{id_a}/history"))
                .await,
        );
        let failure = next_failure(&mut p.failures).await;
        assert!(failure.reason.contains("expired"), "{}", failure.reason);

        // T4: a descriptor signed with it, registered at the partner TTP by the CP; a
        // descriptor of a valid partner certificate is accepted there (the control).
        let carol = signer_from_pems("dm-carol", &expired_cert, &expired_key);
        let cp_partner = pki.client("cloud-platform", Role::Ttp, &p.url).unwrap();
        let dave_id =
            CertificateAuthority::issue(&p.ca_pem, &p.ca_key, Role::DomainManager, "dm-dave", Validity::Days(30))
                .unwrap();
        let dave = signer_from_pems("dm-dave", &dave_id.cert_pem, &dave_id.key_pem);
        let good = dave.new_domain(&[], &[("vm-a", AccessMode::Rw)]).unwrap();
        let _: RegisterDomainResponse = cp_partner
            .post_json(
                "/v1/domains",
                &RegisterDomainRequest {
                    descriptor: dave.sign_descriptor(&good).unwrap(),
                    previous_registration: None,
                },
            )
            .await
            .expect("a valid partner-CA signer is accepted");
        let stale = carol.new_domain(&[], &[("vm-a", AccessMode::Rw)]).unwrap();
        let before = audit_records(&p.service).len();
        let result = cp_partner
            .post_json::<_, RegisterDomainResponse>(
                "/v1/domains",
                &RegisterDomainRequest {
                    descriptor: carol.sign_descriptor(&stale).unwrap(),
                    previous_registration: None,
                },
            )
            .await;
        let message = expect_code(result, "descriptor_signature_invalid");
        assert!(message.contains("expired"), "{message}");
        assert_audited(&p.service, before, "register", "descriptor_signature_invalid");
    });
}

/// T11 and T12: a partner root limited to domain managers and one named host
/// (docs/PKI.md "Federation") issues a cloud-platform certificate (T11) and a
/// secure-component certificate for a host outside its allowance (T12); the TTP refuses both
/// in the handshake, naming the root, the role and what the root may issue. The partner's
/// domain manager and its named host are served (the control).
#[test]
fn t11_t12_a_partner_root_issues_only_the_roles_and_hosts_it_is_allowed() {
    run(|w| async move {
        let World { cloud, .. } = w;
        let allow = vec![
            protocol::pki::RoleAllowance::role(Role::DomainManager),
            protocol::pki::RoleAllowance::named(Role::SecureComponent, &["partner-compute-07"]).unwrap(),
        ];
        let mut p = Partner::start_limited(&cloud, "t11", Some(allow)).await;
        let trust = [p.lab_ca_pem.clone()];
        let partner_issues = |role: Role, name: &str| {
            CertificateAuthority::issue(&p.ca_pem, &p.ca_key, role, name, Validity::Days(30)).unwrap()
        };
        let allowed = "which may issue only domain-manager; secure-component named partner-compute-07";
        for (row, role, name) in
            [("T11", Role::CloudPlatform, "cp-partner"), ("T12", Role::SecureComponent, "partner-compute-99")]
        {
            let id = partner_issues(role, name);
            let result = client_with(&trust, &id.cert_pem, &id.key_pem, Role::Ttp, &p.url)
                .post_json::<_, ChallengeResponse>("/v1/challenges", &())
                .await;
            println!("   {row} client: {}", expect_tls_refusal(result));
            let failure = next_failure(&mut p.failures).await;
            assert_eq!(
                failure.reason,
                format!(
                    "client certificate of {name:?} (role {role}) is issued by trusted root \"partner-ca\" (trusted CA #2), {allowed}"
                )
            );
        }
        // The control: the partner's domain manager and its named host get through TLS.
        let dave = partner_issues(Role::DomainManager, "dm-dave");
        let history = client_with(&trust, &dave.cert_pem, &dave.key_pem, Role::Ttp, &p.url)
            .get_json::<HistoryResponse>("/v1/domains/no-such-domain/history")
            .await;
        assert!(!matches!(history, Err(net::Error::Tls { .. })), "dm-dave is refused in TLS: {history:?}");
        let host = partner_issues(Role::SecureComponent, "partner-compute-07");
        // Past TLS, the TTP itself answers: this host has not enrolled here (yet).
        let challenge = client_with(&trust, &host.cert_pem, &host.key_pem, Role::Ttp, &p.url)
            .post_json::<_, ChallengeResponse>("/v1/challenges", &())
            .await;
        let message = expect_code(challenge, "host_unknown");
        assert!(message.contains("partner-compute-07"), "{message}");
    });
}

/// T7: TLS 1.2 only.
#[test]
fn t7_tls_1_2_is_refused() {
    run(|w| async move {
        let World { cloud, .. } = w;
        let mut p = Partner::start(&cloud, "t7").await;
        let pki = &cloud.pki;
        // T7: TLS 1.2 only.
        let target = RawTarget {
            addr: p.url.trim_start_matches("https://").into(),
            ca: pki.dir.join("ca.pem"),
            cert: pki.dir.join("cloud-platform.pem"),
            key: pki.dir.join("cloud-platform-key.pem"),
        };
        let tcp = std::net::TcpStream::connect(&target.addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let error = match connector(&target, true).connect("127.0.0.1", tcp) {
            Ok(_) => panic!("a TLS 1.2 handshake must be refused"),
            Err(e) => e.to_string(),
        };
        let failure = next_failure(&mut p.failures).await;
        println!("   client: {error}");
        assert!(
            failure.reason.contains("TLS 1.3") || failure.reason.to_lowercase().contains("version"),
            "{}",
            failure.reason
        );
    });
}

/// T6: a domain manager calls a secure component (the server refuses the client's role).
#[test]
fn t6_a_domain_manager_at_a_secure_component_is_refused() {
    run(|w| async move {
        let World { cloud, .. } = w;
        let reason = expect_tls_refusal(
            cloud
                .pki
                .client("dm-alice", Role::SecureComponent, &cloud.hosts[0].agent_url)
                .unwrap()
                .get_json::<serde_json::Value>("/v1/attachments")
                .await,
        );
        println!("   client: {reason}");
    });
}

/// T8: a CP answers where a TTP is expected (the client refuses the server's role).
#[test]
fn t8_a_cp_answering_as_the_ttp_is_refused() {
    run(|w| async move {
        let World { cloud, .. } = w;
        let reason = expect_tls_refusal(
            cloud
                .pki
                .client("compute-1", Role::Ttp, &cloud.cp_url)
                .unwrap()
                .post_json::<_, ChallengeResponse>("/v1/challenges", &())
                .await,
        );
        assert!(reason.contains("cloud-platform"), "{reason}");
    });
}

/// T9 and T10: the CA revokes a certificate while the cloud runs: its TLS (T9), then a grant it signed before (T10); in sequence, T10 needs the revocation of T9.
#[test]
fn t9_t10_a_certificate_revoked_while_the_cloud_runs() {
    run(|w| async move {
        let World { cloud, alice, alice_cp, op, c1_ttp, .. } = w;
        let pki = &cloud.pki;
        let ttp = cloud.ttp.service.clone();
        let compute1 = &cloud.hosts[0];
        // T9: the CA revokes dm-frank's certificate (key compromise) while the cloud runs:
        // the TTP and the CP refuse its handshakes once the list is published, no restart.
        pki.issue(Role::DomainManager, "dm-frank").unwrap();
        let frank = signer(pki, "dm-frank");
        // Domain F: alice's, shared with dm-frank (who may grant mounts of it).
        let mut desc_f = alice.new_domain(&[("department", "radiology")], &[("vm-a", AccessMode::Rw)]).unwrap();
        desc_f.shared_with.push("dm-frank".into());
        let view_f: DomainView = alice_cp
            .post_json(
                "/v1/domains",
                &CreateDomainRequest { descriptor: alice.sign_descriptor(&desc_f).unwrap(), size_bytes: 16 << 20 },
            )
            .await
            .expect("create domain F");
        let id_f = desc_f.domain_id.clone();
        // Signed before the revocation; T10 presents it afterwards.
        let grant_f = frank.grant(&id_f, "vm-a", AccessMode::Rw, 300);
        let frank_ttp = || pki.client("dm-frank", Role::Ttp, &cloud.ttp.url).unwrap();
        frank_ttp()
            .get_json::<HistoryResponse>(&format!("/v1/domains/{id_f}/history"))
            .await
            .expect("dm-frank is served before the revocation");
        pki.revoke("dm-frank", protocol::pki::RevocationReason::KeyCompromise).unwrap();
        let published = Instant::now();
        let _reason = loop {
            // A new client each time: every try is a new handshake.
            match frank_ttp().get_json::<HistoryResponse>(&format!("/v1/domains/{id_f}/history")).await {
                Ok(_) if published.elapsed() < Duration::from_secs(5) => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Ok(_) => panic!("the TTP still serves dm-frank 5 s after its revocation was published"),
                Err(e) => break expect_tls_refusal(Err::<(), _>(e)),
            }
        };
        let _applied_after = published.elapsed();
        // The CP watches its files on its own 2 s clock: it may apply the list up to 2 s
        // after the TTP did (seen in CI), so it gets the same 5 s.
        let _cp_reason = loop {
            match pki
                .client("dm-frank", Role::CloudPlatform, &cloud.cp_url)
                .unwrap()
                .get_json::<DomainView>(&format!("/v1/domains/{id_f}"))
                .await
            {
                Ok(_) if published.elapsed() < Duration::from_secs(5) => {
                    tokio::time::sleep(Duration::from_millis(100)).await
                }
                Ok(_) => panic!("the CP still serves dm-frank 5 s after its revocation was published"),
                Err(e) => break expect_tls_refusal(Err::<(), _>(e)),
            }
        };
        let _cp_applied_after = published.elapsed();

        // T10: the grant dm-frank signed before its revocation, presented by compute-1; the
        // same request with alice's grant is served (the control: only the signer changed).
        let challenge: ChallengeResponse = c1_ttp.post_json("/v1/challenges", &()).await.unwrap();
        let quote = quote_for(compute1, &challenge.nonce).await;
        let request =
            release_request(&op, "compute-1", "vm-a", AccessMode::Rw, &view_f.header, &grant_f, &challenge, quote);
        let (message, _) = refused_release(&ttp, &c1_ttp, &request, "grant_signature_invalid").await;
        assert!(message.contains("certificate is revoked"), "{message}");
        let challenge: ChallengeResponse = c1_ttp.post_json("/v1/challenges", &()).await.unwrap();
        let quote = quote_for(compute1, &challenge.nonce).await;
        let request = release_request(
            &op,
            "compute-1",
            "vm-a",
            AccessMode::Rw,
            &view_f.header,
            &alice.grant(&id_f, "vm-a", AccessMode::Rw, 300),
            &challenge,
            quote,
        );
        let _: KeyReleaseResponse =
            c1_ttp.post_json("/v1/key-releases", &request).await.expect("the owner's grant is served");
    });
}
