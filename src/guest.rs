//! Commands inside a launched guest: the QEMU guest agent (`qemu-ga`, Debian package
//! `qemu-guest-agent`) that the `demo-vm` image runs as its init on the first serial port,
//! which the secure component's launcher exposes at `<qmp_dir>/<vm_id>.serial`
//! (docs/IMAGE-PIPELINE.md "The demo guest").
//!
//! The protocol is QMP's JSON over that port: `guest-sync-delimited` (answered after a 0xFF
//! byte, so whatever the firmware printed on the port before the agent ran is skipped), then
//! `guest-exec` of `/bin/sh -c SCRIPT` with its output captured and `guest-exec-status` until
//! it has exited.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine;
use serde_json::{json, Value};

/// How long a guest may take from launch until its agent answers (TCG on two shared cores:
/// half a minute alone, several minutes when other VMs load the cores; KVM: seconds).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// How long one command in the guest may run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// What a command in the guest did.
#[derive(Debug, Clone)]
pub struct Output {
    /// Its exit code (128 + the signal's number when a signal ended it).
    pub code: i64,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

/// A connection to one guest's agent.
pub struct GuestAgent {
    vm_id: String,
    stream: UnixStream,
    /// Bytes read but not yet parsed.
    pending: Vec<u8>,
    next_id: u64,
    /// From launch until the agent first answered.
    pub boot_time: Duration,
}

impl GuestAgent {
    /// Connects to the agent of `vm_id` on its serial socket `serial`, retrying the
    /// synchronisation until it answers (the guest is still booting) or [`BOOT_TIMEOUT`]
    /// after `launched`.
    pub fn connect(vm_id: &str, serial: &Path, launched: Instant) -> Result<Self> {
        let stream = loop {
            match UnixStream::connect(serial) {
                Ok(stream) => break stream,
                Err(e) if launched.elapsed() > BOOT_TIMEOUT => {
                    bail!("{vm_id}: cannot reach its serial port {}: {e}", serial.display())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        let mut agent =
            Self { vm_id: vm_id.to_string(), stream, pending: Vec::new(), next_id: 1, boot_time: Duration::ZERO };
        loop {
            if launched.elapsed() > BOOT_TIMEOUT {
                bail!("{vm_id}: its guest agent did not answer within {BOOT_TIMEOUT:?} of the launch");
            }
            if agent.sync(Duration::from_secs(2))? {
                agent.boot_time = launched.elapsed();
                return Ok(agent);
            }
        }
    }

    /// One `guest-sync-delimited` round: true when the agent answered within `wait`.
    fn sync(&mut self, wait: Duration) -> Result<bool> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = vec![0xff];
        request.extend_from_slice(
            json!({"execute": "guest-sync-delimited", "arguments": {"id": id}}).to_string().as_bytes(),
        );
        request.push(b'\n');
        self.stream.write_all(&request).with_context(|| format!("{}: write to its serial port", self.vm_id))?;
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            // The answer follows a 0xFF; everything before the last one is noise.
            if let Some(start) = self.pending.iter().rposition(|&b| b == 0xff) {
                let after = &self.pending[start + 1..];
                if let Some(end) = after.iter().position(|&b| b == b'\n') {
                    let answer: Option<Value> = serde_json::from_slice(&after[..end]).ok();
                    let rest = after[end + 1..].to_vec();
                    if answer.is_some_and(|a| a["return"] == json!(id)) {
                        self.pending = rest;
                        return Ok(true);
                    }
                    self.pending = rest;
                }
            }
            self.read_some(deadline)?;
        }
        Ok(false)
    }

    /// Reads what arrives before `deadline` into `pending`.
    fn read_some(&mut self, deadline: Instant) -> Result<()> {
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(10));
        self.stream.set_read_timeout(Some(left))?;
        let mut buf = [0u8; 8192];
        match self.stream.read(&mut buf) {
            Ok(0) => bail!("{}: its serial port closed (the VM stopped)", self.vm_id),
            Ok(n) => self.pending.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(e) => return Err(e).with_context(|| format!("{}: read its serial port", self.vm_id)),
        }
        Ok(())
    }

    /// Sends one command and returns its `return` value.
    fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        let request = json!({"execute": command, "arguments": arguments}).to_string() + "\n";
        self.stream.write_all(request.as_bytes()).with_context(|| format!("{}: send {command}", self.vm_id))?;
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                let Ok(answer) = serde_json::from_slice::<Value>(&line) else { continue };
                if let Some(error) = answer.get("error") {
                    bail!("{}: the guest agent refused {command}: {}", self.vm_id, error["desc"]);
                }
                if let Some(value) = answer.get("return") {
                    return Ok(value.clone());
                }
                continue;
            }
            if Instant::now() > deadline {
                bail!("{}: no answer to {command} within {COMMAND_TIMEOUT:?}", self.vm_id);
            }
            self.read_some(deadline)?;
        }
    }

    /// Runs `/bin/sh -c script` in the guest and waits for it.
    pub fn run(&mut self, script: &str) -> Result<Output> {
        let started =
            self.execute("guest-exec", json!({"path": "/bin/sh", "arg": ["-c", script], "capture-output": true}))?;
        let pid =
            started["pid"].as_i64().with_context(|| format!("{}: guest-exec gave no pid: {started}", self.vm_id))?;
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            let status = self.execute("guest-exec-status", json!({"pid": pid}))?;
            if status["exited"] == json!(true) {
                let text = |field: &str| -> Result<String> {
                    let encoded = status[field].as_str().unwrap_or_default();
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(encoded)
                        .with_context(|| format!("guest-exec-status {field} is not base64"))?;
                    Ok(String::from_utf8_lossy(&bytes).into_owned())
                };
                let code = match status["exitcode"].as_i64() {
                    Some(code) => code,
                    None => 128 + status["signal"].as_i64().unwrap_or(0),
                };
                return Ok(Output { code, stdout: text("out-data")?, stderr: text("err-data")? });
            }
            if Instant::now() > deadline {
                bail!("{}: `{script}` still runs after {COMMAND_TIMEOUT:?}", self.vm_id);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `script` and fails unless it exits 0; returns its standard output.
    pub fn sh(&mut self, script: &str) -> Result<String> {
        let output = self.run(script)?;
        if output.code != 0 {
            bail!("{}: `{script}` exited {}: {}{}", self.vm_id, output.code, output.stdout, output.stderr);
        }
        Ok(output.stdout)
    }
}
