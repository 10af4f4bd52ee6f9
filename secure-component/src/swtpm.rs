//! A software TPM (swtpm) per simulated compute host: manufactured with an EK certificate
//! from a local CA (swtpm_setup + swtpm_localca), then served on loopback TCP for the
//! `swtpm:` TCTI, or on a unix control socket for qemu's `-tpmdev emulator`.
//!
//! Layout of a state directory:
//! - `tpm/`                 the TPM's persistent state (tpm2-00.permall)
//! - `localca/`             the local CA (root + issuer) unless a shared CA dir was given
//! - `swtpm_setup.conf`, `swtpm-localca.conf`   per-directory configs, so nothing depends on
//!   /etc or /var/lib state
//! - `swtpm.log`            swtpm's log
//!
//! A state directory that already holds a manufactured TPM is reused as is (a restarted
//! host keeps its EK, its PCR-bound keys stay loadable).

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// File names swtpm_localca uses inside its state directory.
const ROOT_CERT: &str = "swtpm-localca-rootca-cert.pem";
const ISSUER_CERT: &str = "issuercert.pem";

/// How long to wait for swtpm to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A running swtpm process; killed and reaped on drop.
pub struct Swtpm {
    child: Option<Child>,
    state_dir: PathBuf,
    ca_dir: PathBuf,
    port: u16,
    ctrl_socket: Option<PathBuf>,
}

/// `swtpm`, started so that it inherits no file descriptor of this process but stdio
/// ([`crate::tpm::close_inherited_fds_on_exec`]).
fn swtpm_command() -> Command {
    let mut command = Command::new("swtpm");
    crate::tpm::close_inherited_fds_on_exec(&mut command);
    command
}

impl Swtpm {
    /// Manufactures (first time only) and starts a TPM in `state_dir`, with its own local CA
    /// in `state_dir/localca`, served on free loopback TCP ports P (TPM) and P+1 (control).
    pub fn start(state_dir: &Path) -> Result<Swtpm> {
        Self::start_with_ca(state_dir, &state_dir.join("localca"))
    }

    /// Like [`Swtpm::start`], but the EK certificate is issued by the local CA in `ca_dir`,
    /// so several simulated hosts can share one CA (one trusted root at the TTP).
    pub fn start_with_ca(state_dir: &Path, ca_dir: &Path) -> Result<Swtpm> {
        let tpm_dir = manufacture(state_dir, ca_dir)?;
        // A port picked by the kernel can be taken again before swtpm binds it: retry.
        let mut last_error = None;
        for _ in 0..5 {
            let port = free_port_pair()?;
            let mut child = swtpm_command()
                .arg("socket")
                .arg("--tpm2")
                .arg("--tpmstate")
                .arg(format!("dir={}", tpm_dir.display()))
                .arg("--server")
                .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
                .arg("--flags")
                .arg("not-need-init,startup-clear")
                .arg("--log")
                .arg(format!("file={},level=1", state_dir.join("swtpm.log").display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| Error::io("starting swtpm (is the swtpm package installed?)", e))?;
            match wait_tcp_ready(&mut child, port + 1) {
                Ok(()) => {
                    return Ok(Swtpm {
                        child: Some(child),
                        state_dir: state_dir.to_path_buf(),
                        ca_dir: ca_dir.to_path_buf(),
                        port,
                        ctrl_socket: None,
                    })
                }
                Err(e) => {
                    stop_child(&mut child);
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| Error::Swtpm("swtpm did not start".into())))
    }

    /// Manufactures (first time only) and starts a TPM for qemu: the control channel is the
    /// returned unix socket (`-chardev socket,id=chrtpm,path=<it> -tpmdev
    /// emulator,id=tpm0,chardev=chrtpm -device tpm-tis,tpmdev=tpm0`); qemu initialises the
    /// TPM itself. [`Swtpm::tcti`] is meaningless for such an instance.
    pub fn start_for_qemu(state_dir: &Path) -> Result<(Swtpm, PathBuf)> {
        let ca_dir = state_dir.join("localca");
        let tpm_dir = manufacture(state_dir, &ca_dir)?;
        let socket = state_dir.join("swtpm-ctrl.sock");
        // A stale socket from a killed run would make swtpm fail to bind.
        let _ = std::fs::remove_file(&socket);
        let mut child = swtpm_command()
            .arg("socket")
            .arg("--tpm2")
            .arg("--tpmstate")
            .arg(format!("dir={}", tpm_dir.display()))
            .arg("--ctrl")
            .arg(format!("type=unixio,path={}", socket.display()))
            .arg("--log")
            .arg(format!("file={},level=1", state_dir.join("swtpm.log").display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::io("starting swtpm (is the swtpm package installed?)", e))?;
        let deadline = Instant::now() + READY_TIMEOUT;
        while !socket.exists() {
            if let Some(message) = exited(&mut child) {
                return Err(Error::Swtpm(message));
            }
            if Instant::now() > deadline {
                stop_child(&mut child);
                return Err(Error::Swtpm(format!(
                    "control socket {} did not appear within {:?}",
                    socket.display(),
                    READY_TIMEOUT
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let swtpm = Swtpm {
            child: Some(child),
            state_dir: state_dir.to_path_buf(),
            ca_dir,
            port: 0,
            ctrl_socket: Some(socket.clone()),
        };
        Ok((swtpm, socket))
    }

    /// The TCTI string for tss-esapi / tpm2-tools: `swtpm:host=127.0.0.1,port=P`.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// The TPM command port (the control port is this + 1); 0 for a qemu instance.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The unix control socket of a qemu instance.
    pub fn ctrl_socket(&self) -> Option<&Path> {
        self.ctrl_socket.as_deref()
    }

    /// The directory holding this TPM's state (`tpm/`), its log and its setup files.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The certificates the EK certificate chains to, DER encoded: `[root CA, issuing CA]`.
    /// A verifier trusts the root and may use the issuer as an intermediate (or trust both).
    pub fn ek_ca_certificates(&self) -> Result<Vec<Vec<u8>>> {
        ca_certificates_der(&self.ca_dir)
    }

    /// The swtpm process id (for tests that want to be sure it is gone).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child);
        }
        if let Some(socket) = &self.ctrl_socket {
            let _ = std::fs::remove_file(socket);
        }
    }
}

/// The CA certificates (DER, `[root, issuer]`) of a swtpm_localca directory.
pub fn ca_certificates_der(ca_dir: &Path) -> Result<Vec<Vec<u8>>> {
    [ROOT_CERT, ISSUER_CERT]
        .iter()
        .map(|name| {
            let path = ca_dir.join(name);
            let pem = std::fs::read(&path)
                .map_err(|e| Error::io(format!("reading swtpm local CA certificate {}", path.display()), e))?;
            pem_to_der(&pem).ok_or_else(|| Error::Swtpm(format!("{} holds no PEM certificate", path.display())))
        })
        .collect()
}

/// Decodes the first `CERTIFICATE` block of a PEM file.
fn pem_to_der(pem: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(pem).ok()?;
    let begin = "-----BEGIN CERTIFICATE-----";
    let end = "-----END CERTIFICATE-----";
    let start = text.find(begin)? + begin.len();
    let stop = start + text[start..].find(end)?;
    let body: String = text[start..stop].chars().filter(|c| !c.is_whitespace()).collect();
    base64_decode(&body)
}

/// Minimal standard-base64 decoder (the crate has no base64 dependency of its own).
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        match c {
            b'A'..=b'Z' => Some((c - b'A') as u32),
            b'a'..=b'z' => Some((c - b'a' + 26) as u32),
            b'0'..=b'9' => Some((c - b'0' + 52) as u32),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    }
    let bytes = text.trim_end_matches('=').as_bytes();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for &c in bytes {
        acc = (acc << 6) | value(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// Runs swtpm_setup once for `state_dir` (skipped when the TPM state already exists) and
/// returns the TPM state directory.
fn manufacture(state_dir: &Path, ca_dir: &Path) -> Result<PathBuf> {
    let tpm_dir = state_dir.join("tpm");
    if tpm_dir.join("tpm2-00.permall").exists() {
        return Ok(tpm_dir);
    }
    for dir in [&tpm_dir, &ca_dir.to_path_buf()] {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    }
    let localca_conf = state_dir.join("swtpm-localca.conf");
    let localca_options = state_dir.join("swtpm-localca.options");
    let setup_conf = state_dir.join("swtpm_setup.conf");
    let write = |path: &Path, text: String| {
        std::fs::write(path, text).map_err(|e| Error::io(format!("writing {}", path.display()), e))
    };
    write(
        &localca_conf,
        format!(
            "statedir = {ca}\nsigningkey = {ca}/signkey.pem\nissuercert = {ca}/{ISSUER_CERT}\ncertserial = {ca}/certserial\n",
            ca = ca_dir.display()
        ),
    )?;
    write(&localca_options, "--platform-manufacturer Skydd\n--platform-version 2.1\n--platform-model swtpm\n".into())?;
    write(
        &setup_conf,
        format!(
            "create_certs_tool = /usr/bin/swtpm_localca\ncreate_certs_tool_config = {}\ncreate_certs_tool_options = {}\nactive_pcr_banks = sha256\n",
            localca_conf.display(),
            localca_options.display()
        ),
    )?;
    let output = Command::new("swtpm_setup")
        .arg("--tpm2")
        .arg("--tpmstate")
        .arg(&tpm_dir)
        .arg("--create-ek-cert")
        .arg("--create-platform-cert")
        .arg("--pcr-banks")
        .arg("sha256")
        .arg("--config")
        .arg(&setup_conf)
        .arg("--overwrite")
        .arg("--logfile")
        .arg(state_dir.join("swtpm_setup.log"))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::io("running swtpm_setup (is swtpm-tools installed?)", e))?;
    if !output.status.success() {
        let log = std::fs::read_to_string(state_dir.join("swtpm_setup.log")).unwrap_or_default();
        return Err(Error::Swtpm(format!(
            "swtpm_setup for {} failed ({}): {}{}",
            tpm_dir.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim(),
            last_lines(&log, 5)
        )));
    }
    Ok(tpm_dir)
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" / ")
}

/// A port P such that P and P+1 are both free on loopback right now.
fn free_port_pair() -> Result<u16> {
    for _ in 0..50 {
        let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .map_err(|e| Error::io("binding a loopback port", e))?;
        let port = listener.local_addr().map_err(|e| Error::io("reading a bound port", e))?.port();
        if port < u16::MAX && TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port + 1))).is_ok() {
            return Ok(port);
        }
    }
    Err(Error::Swtpm("found no two adjacent free loopback ports".into()))
}

/// Waits until swtpm accepts a connection on the control port (it binds the TPM port
/// before the control port).
fn wait_tcp_ready(child: &mut Child, ctrl_port: u16) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Some(message) = exited(child) {
            return Err(Error::Swtpm(message));
        }
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, ctrl_port));
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::Swtpm(format!(
                "swtpm did not accept connections on 127.0.0.1:{ctrl_port} within {READY_TIMEOUT:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// If the child has exited, a message with its status and stderr.
fn exited(child: &mut Child) -> Option<String> {
    match child.try_wait() {
        Ok(Some(status)) => {
            let mut stderr = String::new();
            if let Some(mut pipe) = child.stderr.take() {
                let _ = pipe.read_to_string(&mut stderr);
            }
            Some(format!("swtpm exited at start ({status}): {}", stderr.trim()))
        }
        _ => None,
    }
}

/// SIGTERM (swtpm saves its volatile state), then SIGKILL if it lingers; always reaps.
fn stop_child(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        if let Ok(pid) = i32::try_from(child.id()) {
            // SAFETY: plain kill(2) on our own child's pid; it is not reaped yet so the pid
            // cannot have been reused.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
    }
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decodes_standard_alphabet() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("aGk=").unwrap(), b"hi");
        assert!(base64_decode("a$b").is_none());
    }
}
