//! Compute hosts and instances are the operator's; an attach to a host that does not answer
//! is refused with the host named.

use protocol::cloud::{Attachment, ComputeHost, Instance, InstanceList};
use protocol::domain::AccessMode;

use crate::lab::{refusal, Lab, MIB};

/// The URL of a port nothing listens on.
fn closed_agent_url() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    format!("https://127.0.0.1:{port}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_operator_registers_and_lists_compute_hosts() {
    let lab = Lab::start().await;
    let (alice, operator) = (lab.manager("dm-alice"), lab.operator());
    let host = ComputeHost { id: "compute-1".into(), agent_url: closed_agent_url() };
    let (status, code, _) = refusal(alice.cp.post_json::<_, ComputeHost>("/v1/hosts", &host).await);
    assert_eq!((status, code.as_str()), (403, "forbidden"));
    let (status, code, _) = refusal(
        operator
            .post_json::<_, ComputeHost>(
                "/v1/hosts",
                &ComputeHost { id: "compute-2".into(), agent_url: "http://x".into() },
            )
            .await,
    );
    assert_eq!((status, code.as_str()), (400, "bad_request"));
    assert_eq!(operator.post_json::<_, ComputeHost>("/v1/hosts", &host).await.unwrap(), host);
    let hosts: serde_json::Value = operator.get_json("/v1/hosts").await.unwrap();
    assert_eq!(hosts["hosts"][0]["id"], "compute-1");
    // The topology is the operator's: a tenant sees neither hosts nor instances.
    let (status, code, _) = refusal(alice.cp.get_json::<serde_json::Value>("/v1/hosts").await);
    assert_eq!((status, code.as_str()), (403, "forbidden"));
    let (status, code, _) = refusal(alice.cp.get_json::<serde_json::Value>("/v1/instances").await);
    assert_eq!((status, code.as_str()), (403, "forbidden"));
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_operator_places_instances_on_registered_hosts() {
    let lab = Lab::start().await;
    let (alice, operator) = (lab.manager("dm-alice"), lab.operator());
    lab.place("compute-1", &closed_agent_url(), &[]).await;
    let (status, code, _) = refusal(
        operator
            .post_json::<_, Instance>("/v1/instances", &Instance { id: "vm-a".into(), host: "nowhere".into() })
            .await,
    );
    assert_eq!((status, code.as_str()), (404, "host_unknown"));
    // A tenant cannot place (or move) a VM, its own or another's.
    let (status, code, _) = refusal(
        alice
            .cp
            .post_json::<_, Instance>("/v1/instances", &Instance { id: "vm-a".into(), host: "compute-1".into() })
            .await,
    );
    assert_eq!((status, code.as_str()), (403, "forbidden"));
    for vm in ["vm-a", "vm-b", "vm-c"] {
        let i = Instance { id: vm.into(), host: "compute-1".into() };
        assert_eq!(operator.post_json::<_, Instance>("/v1/instances", &i).await.unwrap(), i);
    }
    println!("instances listed in pages");
    let page: InstanceList = operator.get_json("/v1/instances?limit=2").await.unwrap();
    assert_eq!(page.instances.len(), 2);
    assert_eq!(page.next_marker.as_deref(), Some("vm-b"));
    let page: InstanceList = operator.get_json("/v1/instances?limit=2&marker=vm-b").await.unwrap();
    assert_eq!((page.instances[0].id.as_str(), page.next_marker), ("vm-c", None));
    lab.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attach_to_a_host_that_does_not_answer_names_the_host() {
    let lab = Lab::start().await;
    let (alice, mallory) = (lab.manager("dm-alice"), lab.manager("dm-mallory"));
    let agent_url = closed_agent_url();
    lab.place("compute-1", &agent_url, &["vm-a"]).await;
    let d = alice.descriptor(&[("vm-a", AccessMode::Rw)]);
    let id = alice.create_domain(&d, MIB).await.unwrap().id;
    let (status, code, message) = refusal(alice.attach(&id, "vm-a", AccessMode::Rw).await);
    assert_eq!((status, code.as_str()), (502, "host_unreachable"));
    assert!(message.contains("compute-1") && message.contains(&agent_url), "{message}");
    assert!(alice.attachments(&id).await.is_empty(), "nothing recorded");
    assert_eq!(alice.get(&id).await.unwrap().status, "available");

    println!("an unknown instance, a caller who does not manage the domain, an unknown attachment");
    let (status, code, _) = refusal(alice.attach(&id, "vm-zz", AccessMode::Rw).await);
    assert_eq!((status, code.as_str()), (404, "instance_unknown"));
    let (status, code, _) = refusal(mallory.attach(&id, "vm-a", AccessMode::Rw).await);
    assert_eq!((status, code.as_str()), (403, "forbidden"));
    let (status, code, _) = refusal(alice.cp.delete_json::<Attachment>("/v1/attachments/0123").await);
    assert_eq!((status, code.as_str()), (404, "attachment_unknown"));
    lab.stop().await;
}
