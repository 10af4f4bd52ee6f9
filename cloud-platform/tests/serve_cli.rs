//! The real `cloud-platform serve` binary: starts from a TOML file with flag overrides,
//! answers a domain manager over mutual TLS, and refuses to start with a certificate of the
//! wrong role, saying which.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use net::{Role, TlsFiles};

fn cp(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cloud-platform")).args(args).output().unwrap()
}

fn issue(ca: &str, role: &str, name: &str) {
    let o = cp(&["ca", "issue", "--dir", ca, "--role", role, "--name", name]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn write_config(path: &Path, ca: &Path, name: &str, data_dir: &Path) {
    let text = format!(
        "data_dir = {:?}\nca = [{:?}]\ncert = {:?}\nkey = {:?}\nttp_url = \"https://127.0.0.1:9\"\n",
        data_dir,
        ca.join("ca.pem"),
        ca.join(format!("{name}.pem")),
        ca.join(format!("{name}-key.pem"))
    );
    std::fs::write(path, text).unwrap();
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_over_mtls_and_refuses_a_wrong_role() {
    let d = tempfile::tempdir().unwrap();
    let ca = d.path().join("ca");
    let ca_s = ca.to_str().unwrap();
    assert!(cp(&["ca", "init", "--dir", ca_s]).status.success());
    issue(ca_s, "cloud-platform", "cp-1");
    issue(ca_s, "domain-manager", "dm-alice");
    issue(ca_s, "ttp", "ttp-1");

    println!("a TTP certificate cannot run the cloud platform");
    let wrong = d.path().join("wrong.toml");
    write_config(&wrong, &ca, "ttp-1", &d.path().join("cp-wrong"));
    let o = cp(&["serve", "--config", wrong.to_str().unwrap(), "--listen", "127.0.0.1:0"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    println!("  {err}");
    assert!(err.contains("has role ttp, the cloud platform needs a cloud-platform certificate"), "{err}");

    println!("serve with --listen and --data-dir overriding the file");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = d.path().join("cp.toml");
    write_config(&config, &ca, "cp-1", &d.path().join("ignored"));
    let data_dir = d.path().join("cp-data");
    let child = Command::new(env!("CARGO_BIN_EXE_cloud-platform"))
        .args(["serve", "--config", config.to_str().unwrap(), "--listen", &format!("127.0.0.1:{port}")])
        .args(["--data-dir", data_dir.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _child = Killed(child);
    let tls = TlsFiles::in_dir(&ca, "dm-alice").client_config(Role::CloudPlatform).unwrap();
    let client = net::Client::new(&format!("https://127.0.0.1:{port}"), tls).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let list: protocol::cloud::DomainList = loop {
        match client.get_json("/v1/domains").await {
            Ok(list) => break list,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("the cloud platform did not answer: {e}"),
        }
    };
    assert!(list.domains.is_empty());
    assert!(data_dir.join("cp.sqlite").exists(), "--data-dir took effect");
    assert!(data_dir.join("volumes").is_dir());
    assert!(!d.path().join("ignored").exists());
}
