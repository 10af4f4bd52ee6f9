//! What the access policy costs a key release: `Ttp::release_key` on a domain with a 50-rule
//! policy against the same TTP's release on a domain with the access list alone, in one run
//! and interleaved (rounds alternate, so both see the same machine), and the policy's
//! decision alone (`AccessPolicies::decide` on the kept compiled policy). Figures in
//! docs/PERFORMANCE.md "Access policies". Ignored by default; run it in release mode:
//!
//! ```text
//! cargo test --release -p ttp --lib service::policy::bench -- --ignored --nocapture
//! ```

use std::time::{Duration, Instant};

use protocol::domain::AccessMode;
use protocol::messages::KeyReleaseRequest;

use super::{AccessPolicies, ReleaseFacts};
use crate::service::test_support::fixture::Fixture;

const ROUNDS: usize = 10;
const RELEASES_PER_ROUND: usize = 200;

/// A 50-rule policy shaped like a hospital's: 44 permits of other VMs, studies and purposes
/// that do not apply, 5 forbids that do not apply, and the one permit that does (last).
pub(crate) fn fifty_rules() -> String {
    let mut text = String::new();
    for i in 0..44 {
        text.push_str(&format!(
            "@id(\"study-{i}\") permit (principal == Vm::\"vm-study-{i}\", action, resource) \
             when {{ context.purpose == \"research\" && context.now >= {} && context.now < {} && \
                     resource.hasTag(\"department\") && resource.getTag(\"department\") == \"ward-{i}\" }};\n",
            1_700_000_000 + i * 86_400,
            1_800_000_000 + i * 86_400
        ));
    }
    for i in 0..5 {
        text.push_str(&format!(
            "@id(\"forbid-{i}\") forbid (principal, action, resource) \
             when {{ context.grant_signer == \"dm-revoked-{i}\" || context.host.id == \"quarantined-{i}\" }};\n"
        ));
    }
    text.push_str(
        "@id(\"care\") permit (principal, action, resource) \
         when { context.grant_lifetime_seconds <= 3600 && context.reason == \"\" };\n",
    );
    text
}

fn premade(f: &Fixture, n: usize) -> Vec<KeyReleaseRequest> {
    (0..n).map(|_| f.request()).collect()
}

/// Median of the rounds' per-release times.
fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn time_releases(f: &Fixture, requests: &[KeyReleaseRequest]) -> Duration {
    let started = Instant::now();
    for request in requests {
        f.release(request).expect("granted");
    }
    started.elapsed() / requests.len() as u32
}

#[test]
#[ignore = "a benchmark: run in release mode with --ignored --nocapture"]
fn a_fifty_rule_policy_against_the_access_list_alone() {
    let acl_only = Fixture::new();
    let mut with_policy = Fixture::new();
    with_policy.set_policy(Some(&fifty_rules()));
    let (mut acl_times, mut policy_times) = (Vec::new(), Vec::new());
    for round in 0..=ROUNDS {
        let (a, p) = (premade(&acl_only, RELEASES_PER_ROUND), premade(&with_policy, RELEASES_PER_ROUND));
        let (acl, policy) = if round % 2 == 0 {
            let acl = time_releases(&acl_only, &a);
            (acl, time_releases(&with_policy, &p))
        } else {
            let policy = time_releases(&with_policy, &p);
            (time_releases(&acl_only, &a), policy)
        };
        if round > 0 {
            // Round 0 warms both up (and compiles the policy once).
            acl_times.push(acl);
            policy_times.push(policy);
        }
    }
    let (acl, policy) = (median(acl_times), median(policy_times));

    // The policy's decision alone, on the kept compiled policy.
    let policies = AccessPolicies::new().unwrap();
    let descriptor = &with_policy.descriptor;
    let facts = ReleaseFacts {
        vm_id: "vm-a",
        mode: AccessMode::Rw,
        now: crate::store::now_unix(),
        purpose: "",
        reason: "",
        grant_signer: "dm-alice",
        grant_signer_affiliation: None,
        grant_lifetime_seconds: 600,
        host_id: "compute-1",
    };
    let started = Instant::now();
    policies.decide(descriptor, &[1; 32], &facts, None, None).unwrap().expect("permitted");
    let first = started.elapsed();
    let n = 5000;
    let started = Instant::now();
    for _ in 0..n {
        policies.decide(descriptor, &[1; 32], &facts, None, None).unwrap().expect("permitted");
    }
    let decide = started.elapsed() / n;
    println!(
        "Ttp::release_key, one caller, SQLite in memory, median of {ROUNDS} interleaved rounds of {RELEASES_PER_ROUND}:"
    );
    println!("  access list alone        {:>8.1} us per release", acl.as_secs_f64() * 1e6);
    println!("  access list + 50 rules   {:>8.1} us per release", policy.as_secs_f64() * 1e6);
    println!("  ratio                    {:>8.3}x", policy.as_secs_f64() / acl.as_secs_f64());
    println!(
        "AccessPolicies::decide, 50 rules: {:.1} us per decision on the kept policy; the first (parse, validate, decide) {:.1} us",
        decide.as_secs_f64() * 1e6,
        first.as_secs_f64() * 1e6
    );
}
