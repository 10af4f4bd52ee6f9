//! Request bodies on every route of the TTP, the CP and a secure component: over every limit,
//! malformed, of the wrong shape, of the wrong content type, a nesting bomb (rows B1-B5, one
//! test each over the same route table), and path traversal in ids (B6). Every body route
//! answers its 4xx as `{"code": "bad_request", ...}`; a body-less route ignores a body and
//! never answers 5xx.

use super::*;

/// Sends `body` as `content_type` to every route; every body route answers one of
/// `expected` with `bad_request`, every route answers below 500 within 15 s.
async fn on_every_route(w: &World, id: &str, content_type: &str, body: Vec<u8>, expected: &[u16]) {
    let cloud = &w.cloud;
    let pki = &cloud.pki;
    let compute1 = &cloud.hosts[0];
    let d = Domains::create(w).await;
    let id_a = &d.id_a;
    let target_of = |url: &str| RawTarget {
        addr: url.trim_start_matches("https://").into(),
        ca: pki.dir.join("ca.pem"),
        cert: pki.dir.join("cloud-platform.pem"),
        key: pki.dir.join("cloud-platform-key.pem"),
    };
    let (ttp_t, cp_t, sc_t) = (target_of(&cloud.ttp.url), target_of(&cloud.cp_url), target_of(&compute1.agent_url));
    let fake = "0123456789abcdef0123456789abcdef";
    // (service, target, method, path, takes a JSON body)
    let routes: Vec<(&str, &RawTarget, &str, String, bool)> = vec![
        ("TTP", &ttp_t, "POST", "/v1/enrollments".into(), true),
        ("TTP", &ttp_t, "POST", "/v1/enrollments/proof".into(), true),
        ("TTP", &ttp_t, "POST", "/v1/challenges".into(), false),
        ("TTP", &ttp_t, "POST", "/v1/domains".into(), true),
        ("TTP", &ttp_t, "POST", format!("/v1/domains/{id_a}/delete"), true),
        ("TTP", &ttp_t, "GET", format!("/v1/domains/{id_a}/history"), false),
        ("TTP", &ttp_t, "POST", "/v1/key-releases".into(), true),
        ("TTP", &ttp_t, "GET", "/v1/health".into(), false),
        ("CP", &cp_t, "POST", "/v1/hosts".into(), true),
        ("CP", &cp_t, "GET", "/v1/hosts".into(), false),
        ("CP", &cp_t, "POST", "/v1/instances".into(), true),
        ("CP", &cp_t, "GET", "/v1/instances".into(), false),
        ("CP", &cp_t, "POST", "/v1/domains".into(), true),
        ("CP", &cp_t, "GET", "/v1/domains".into(), false),
        ("CP", &cp_t, "GET", format!("/v1/domains/{id_a}"), false),
        ("CP", &cp_t, "DELETE", format!("/v1/domains/{id_a}"), true),
        ("CP", &cp_t, "PUT", format!("/v1/domains/{id_a}/descriptor"), true),
        ("CP", &cp_t, "POST", "/v1/attachments".into(), true),
        ("CP", &cp_t, "GET", "/v1/attachments".into(), false),
        ("CP", &cp_t, "GET", format!("/v1/attachments/{fake}"), false),
        ("CP", &cp_t, "DELETE", format!("/v1/attachments/{fake}"), false),
        ("CP", &cp_t, "GET", "/v1/health".into(), false),
        ("SC", &sc_t, "GET", "/v1/attachments".into(), false),
        ("SC", &sc_t, "POST", "/v1/attachments".into(), true),
        ("SC", &sc_t, "DELETE", format!("/v1/attachments/{fake}"), false),
        ("SC", &sc_t, "GET", "/v1/health".into(), false),
    ];
    let mut seen = Vec::new();
    for (service, target, method, path, takes_body) in &routes {
        let t = Instant::now();
        let (target, method, path, body, content_type) =
            ((*target).clone(), method.to_string(), path.clone(), body.clone(), content_type.to_string());
        let label = format!("{service} {method} {path}");
        let answer =
            tokio::task::spawn_blocking(move || raw_request(&target, &method, &path, Some(&content_type), &body))
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("{id} {label}: {e}"));
        assert!(t.elapsed() < Duration::from_secs(15), "{id} {label} took {:?}", t.elapsed());
        assert!(
            answer.status < 500,
            "{id} {label}: HTTP {} {:?}",
            answer.status,
            String::from_utf8_lossy(&answer.body)
        );
        if *takes_body {
            assert!(
                expected.contains(&answer.status),
                "{id} {label}: HTTP {} (expected {expected:?}) {:?}",
                answer.status,
                String::from_utf8_lossy(&answer.body)
            );
            assert_eq!(error_code_of(&answer), "bad_request", "{id} {label}");
            seen.push(answer.status);
        } else if answer.status >= 400 {
            error_code_of(&answer); // a refusal still answers {code, message}
        }
    }
    seen.dedup();
    println!("{id}: HTTP {seen:?} bad_request on {} body routes", routes.iter().filter(|r| r.4).count());
}

/// B1: a body over every limit (2 MiB + 1 KiB) on every route: 413.
#[test]
fn b1_bodies_over_every_limit() {
    run(|w| async move {
        let mut oversized = b"{\"descriptor\":\"".to_vec();
        oversized.resize(oversized.len() + (2 << 20) + 1024, b'a');
        oversized.extend_from_slice(b"\"}");
        on_every_route(&w, "B1", "application/json", oversized, &[413]).await;
    });
}

/// B2: malformed JSON on every route: 400.
#[test]
fn b2_malformed_json() {
    run(|w| async move {
        on_every_route(&w, "B2", "application/json", b"{\"descriptor\": {\"message\": ".to_vec(), &[400]).await;
    });
}

/// B3: JSON of the wrong shape on every route: 422.
#[test]
fn b3_json_of_the_wrong_shape() {
    run(|w| async move {
        on_every_route(&w, "B3", "application/json", b"[1, 2, 3]".to_vec(), &[422]).await;
    });
}

/// B4: a non-JSON content type on every route: 415.
#[test]
fn b4_a_non_json_content_type() {
    run(|w| async move {
        on_every_route(&w, "B4", "text/plain", b"{}".to_vec(), &[415]).await;
    });
}

/// B5: a JSON nesting bomb (100k '[') on every route: 400 or 422 (serde's recursion limit),
/// no crash.
#[test]
fn b5_a_json_nesting_bomb() {
    run(|w| async move {
        on_every_route(&w, "B5", "application/json", vec![b'['; 100_000], &[400, 422]).await;
    });
}

/// B6: path traversal in ids (CP domain, TTP history, SC attachment).
#[test]
fn b6_path_traversal_in_ids() {
    run(|w| async move {
        let World { cloud, alice_cp, .. } = w;
        let pki = &cloud.pki;
        let compute1 = &cloud.hosts[0];
        let alice_ttp = pki.client("dm-alice", Role::Ttp, &cloud.ttp.url).unwrap();
        let traversal = "..%2F..%2F..%2Fetc%2Fpasswd";
        expect_code(alice_cp.get_json::<DomainView>(&format!("/v1/domains/{traversal}")).await, "domain_unknown");
        expect_code(
            alice_ttp.get_json::<HistoryResponse>(&format!("/v1/domains/{traversal}/history")).await,
            "domain_unknown",
        );
        let sc = pki.client("cloud-platform", Role::SecureComponent, &compute1.agent_url).unwrap();
        expect_code(sc.delete_json::<serde_json::Value>(&format!("/v1/attachments/{traversal}")).await, "bad_request");
    });
}
