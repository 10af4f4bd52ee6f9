//! Test agent that runs as PID 1's child inside the qemu VM of tests/dmcrypt_qemu.rs
//! (built and put into the guest's initramfs by tests/qemu/mod.rs).
//!
//! It drives the project's real `secure_component::volume::dmcrypt` backend (so the guest
//! exercises the same ioctl code a compute host runs) and a few helpers the tests need.
//! Protocol: one JSON request per line on the virtio-serial port named `skydd`, one JSON
//! response per line: `{"ok":true,...}` or `{"ok":false,"error":"..."}`.
//!
//! TEST ONLY: the `open` request carries the volume key hex-encoded over the serial line
//! (a local unix socket on the host side). It is decoded straight into a `SecretBytes` and
//! the request buffers are wiped; a production secure component never receives keys this way.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use protocol::secret::SecretBytes;
use secure_component::volume::dmcrypt::DmCryptBackend;
use secure_component::volume::{IntegrityOpen, OpenMode, VolumeBackend};
use serde::Deserialize;
use serde_json::{json, Value};
use skydd_volume::integrity::{Anchor, Authority};
use zeroize::Zeroize;

#[derive(Deserialize, Default)]
#[serde(default)]
struct Request {
    /// Echoed in the response so the host can match answers to requests.
    id: u64,
    op: String,
    name: String,
    path: String,
    key_hex: KeyHex,
    mode: String,
    argv: Vec<String>,
    offset: u64,
    bytes: usize,
    /// A protocol message relayed from the TTP on the host (challenges, nonces, wrapped keys).
    message: Value,
}

/// The hex key of an `open` request, wiped when the request is dropped.
#[derive(Deserialize, Default)]
#[serde(transparent)]
struct KeyHex(String);

impl Drop for KeyHex {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

fn main() {
    let port = std::env::args().nth(1).map(PathBuf::from).or_else(find_port);
    let Some(port) = port else {
        eprintln!("skydd-guest-agent: no virtio-serial port named skydd");
        std::process::exit(2);
    };
    let file = match OpenOptions::new().read(true).write(true).open(&port) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("skydd-guest-agent: opening {}: {e}", port.display());
            std::process::exit(2);
        }
    };
    let mut out = match file.try_clone() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("skydd-guest-agent: {e}");
            std::process::exit(2);
        }
    };
    let mut reader = BufReader::new(file);
    let mut backend: Option<DmCryptBackend> = None;
    let _ = writeln!(out, "{}", json!({"ok": true, "ready": true}));
    let mut line = String::new();
    loop {
        line.zeroize();
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => {
                // Host side not connected yet (or reconnecting): wait and retry.
                std::thread::sleep(std::time::Duration::from_millis(50));
                continue;
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("skydd-guest-agent: read: {e}");
                std::thread::sleep(std::time::Duration::from_millis(50));
                continue;
            }
        }
        if line.trim().is_empty() {
            continue;
        }
        let parsed: Result<Request, _> = serde_json::from_str(line.trim());
        line.zeroize();
        let id = parsed.as_ref().map(|r| r.id).unwrap_or(0);
        let mut response = match parsed {
            Ok(req) => {
                if req.op == "poweroff" {
                    let _ = writeln!(out, "{}", json!({"ok": true, "id": req.id}));
                    let _ = out.flush();
                    // SAFETY: sync and power off; this is PID 1's only job left.
                    unsafe {
                        libc::sync();
                        libc::reboot(libc::RB_POWER_OFF);
                    }
                    std::process::exit(0);
                }
                handle(&req, &mut backend).unwrap_or_else(|e| json!({"ok": false, "error": e}))
            }
            Err(e) => json!({"ok": false, "error": format!("bad request: {e}")}),
        };
        response["id"] = json!(id);
        let _ = writeln!(out, "{response}");
        let _ = out.flush();
    }
}

fn find_port() -> Option<PathBuf> {
    for entry in std::fs::read_dir("/sys/class/virtio-ports").ok()?.flatten() {
        let name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if name.trim() == "skydd" {
            return Some(Path::new("/dev").join(entry.file_name()));
        }
    }
    None
}

fn backend_of(backend: &mut Option<DmCryptBackend>) -> Result<&DmCryptBackend, String> {
    if backend.is_none() {
        *backend = Some(DmCryptBackend::new().map_err(|e| e.to_string())?);
    }
    backend.as_ref().ok_or_else(|| "no backend".to_string())
}

fn mode_json(m: OpenMode) -> &'static str {
    match m {
        OpenMode::ReadOnly => "ro",
        OpenMode::ReadWrite => "rw",
    }
}

fn handle(req: &Request, backend: &mut Option<DmCryptBackend>) -> Result<Value, String> {
    match req.op.as_str() {
        "ping" => {
            let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
            Ok(json!({"ok": true, "kernel": release.trim()}))
        }
        "dm_version" => Ok(json!({"ok": true, "version": backend_of(backend)?.dm_version()})),
        "open" => {
            let mut key = SecretBytes::zeroed(req.key_hex.0.len() / 2);
            hex::decode_to_slice(req.key_hex.0.as_bytes(), key.expose_mut())
                .map_err(|e| format!("key_hex is not valid hex: {e}"))?;
            let mode = match req.mode.as_str() {
                "ro" => OpenMode::ReadOnly,
                "rw" => OpenMode::ReadWrite,
                other => return Err(format!("mode must be ro or rw, not {other:?}")),
            };
            let v =
                backend_of(backend)?.open(&req.name, Path::new(&req.path), &key, mode).map_err(|e| e.to_string())?;
            Ok(json!({"ok": true, "name": v.name, "device": v.device, "mode": mode_json(v.mode)}))
        }
        // A format-2 volume read-only (docs/FORMAT.md "Which paths enforce it"): `key_hex` is
        // K || K_mac, `message` names the domain and the TTP's anchor {domain_id, epoch, root}.
        "open_v2_ro" => {
            let mut keys = SecretBytes::zeroed(req.key_hex.0.len() / 2);
            hex::decode_to_slice(req.key_hex.0.as_bytes(), keys.expose_mut())
                .map_err(|e| format!("key_hex is not valid hex: {e}"))?;
            if keys.len() != 96 {
                return Err(format!("key_hex must be K || K_mac (96 bytes), got {}", keys.len()));
            }
            let part = |range: std::ops::Range<usize>| {
                let mut k = SecretBytes::zeroed(range.len());
                k.expose_mut().copy_from_slice(&keys.expose()[range]);
                k
            };
            let (key, mac_key) = (part(0..64), part(64..96));
            let field = |name: &str| req.message.get(name).cloned().ok_or(format!("message lacks {name}"));
            let domain_id = field("domain_id")?.as_str().ok_or("domain_id is not a string")?.to_string();
            let epoch = field("epoch")?.as_u64().ok_or("epoch is not a number")?;
            let mut root = [0u8; 32];
            hex::decode_to_slice(field("root")?.as_str().ok_or("root is not a string")?, &mut root)
                .map_err(|e| format!("root is not 32 bytes of hex: {e}"))?;
            let integrity = IntegrityOpen {
                mac_key,
                domain_id,
                anchor: Some(Anchor { epoch, root }),
                authority: std::sync::Arc::new(GuestReports),
            };
            let mode = if req.mode == "rw" { OpenMode::ReadWrite } else { OpenMode::ReadOnly };
            let v = backend_of(backend)?
                .open_authenticated(&req.name, Path::new(&req.path), &key, integrity, mode)
                .map_err(|e| e.to_string())?;
            Ok(json!({"ok": true, "name": v.name, "device": v.device, "mode": mode_json(v.mode)}))
        }
        "integrity_reports" => {
            let reports = REPORTS.lock().map_err(|_| "reports lock poisoned")?.clone();
            Ok(json!({"ok": true, "reports": reports}))
        }
        // Reads `bytes` at `offset` of `path` after dropping the page cache: the kernel's
        // dm-verity checks every block it reads from below.
        "read_uncached" => {
            let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
            let f = std::fs::File::open(&req.path).map_err(|e| format!("open {}: {e}", req.path))?;
            let mut buf = vec![0u8; req.bytes.max(1)];
            match f.read_exact_at(&mut buf, req.offset) {
                Ok(()) => Ok(json!({"ok": true, "errno": null, "hex": hex::encode(&buf)})),
                Err(e) => Ok(json!({"ok": true, "errno": e.raw_os_error(), "error": e.to_string()})),
            }
        }
        "close" => {
            backend_of(backend)?.close(&req.name).map_err(|e| e.to_string())?;
            Ok(json!({"ok": true}))
        }
        "list" => {
            let list = backend_of(backend)?.list().map_err(|e| e.to_string())?;
            let vols: Vec<Value> =
                list.iter().map(|v| json!({"name": v.name, "device": v.device, "mode": mode_json(v.mode)})).collect();
            Ok(json!({"ok": true, "volumes": vols}))
        }
        "table" => {
            let t = backend_of(backend)?.table(&req.name).map_err(|e| e.to_string())?;
            Ok(json!({"ok": true, "table": t}))
        }
        "run" => {
            let (prog, args) = req.argv.split_first().ok_or("run needs argv")?;
            let out = Command::new(prog).args(args).output().map_err(|e| format!("running {prog}: {e}"))?;
            Ok(json!({
                "ok": true,
                "code": out.status.code().unwrap_or(-1),
                "stdout": String::from_utf8_lossy(&out.stdout),
                "stderr": String::from_utf8_lossy(&out.stderr),
            }))
        }
        "try_write" => {
            // Open for writing and write one 4096-byte block at `offset`; report each stage.
            let f = match OpenOptions::new().write(true).open(&req.path) {
                Ok(f) => f,
                Err(e) => {
                    return Ok(json!({"ok": true, "stage": "open", "errno": e.raw_os_error(), "error": e.to_string()}))
                }
            };
            let block = vec![0xA5u8; 4096];
            let r = f.write_all_at(&block, req.offset).and_then(|_| f.sync_all());
            match r {
                Ok(()) => Ok(json!({"ok": true, "stage": "written", "errno": null})),
                Err(e) => Ok(json!({"ok": true, "stage": "write", "errno": e.raw_os_error(), "error": e.to_string()})),
            }
        }
        "tpm_getrandom" => tpm_getrandom(if req.bytes == 0 { 16 } else { req.bytes }),
        "tpm_enroll_quote" => tpm_enroll_quote(&req.path),
        "tpm_read_pcrs" => tpm_flow(req, |tpm, _| {
            let pcrs = tpm.read_pcrs(&protocol::attest::PcrSelection::default_host()).map_err(|e| e.to_string())?;
            Ok(json!({"ok": true, "pcrs": pcrs.iter().map(|(i, d)| json!([i, hex::encode(d)])).collect::<Vec<_>>()}))
        }),
        "tpm_enrollment_request" => tpm_flow(req, |tpm, req| {
            let request = tpm
                .enrollment_request(&req.name, &protocol::attest::PcrSelection::default_host())
                .map_err(|e| e.to_string())?;
            Ok(json!({"ok": true, "request": request}))
        }),
        "tpm_enrollment_proof" => tpm_flow(req, |tpm, req| {
            let challenge: protocol::attest::CredentialChallenge =
                serde_json::from_value(req.message.clone()).map_err(|e| e.to_string())?;
            let proof = tpm.enrollment_proof(&challenge).map_err(|e| e.to_string())?;
            Ok(json!({"ok": true, "proof": proof}))
        }),
        "tpm_quote" => tpm_flow(req, |tpm, req| {
            let nonce: Relayed = serde_json::from_value(req.message.clone()).map_err(|e| e.to_string())?;
            let quote = tpm.quote(&nonce.bytes).map_err(|e| e.to_string())?;
            Ok(json!({"ok": true, "quote": quote}))
        }),
        // Decrypts a released key inside the TPM and answers only its SHA-256: the key itself
        // never crosses the serial line.
        "tpm_decrypt_digest" => tpm_flow(req, |tpm, req| {
            use sha2::Digest;
            let wrapped: Relayed = serde_json::from_value(req.message.clone()).map_err(|e| e.to_string())?;
            let key = tpm.decrypt_released_key(&wrapped.bytes).map_err(|e| e.to_string())?;
            Ok(json!({"ok": true, "key_sha256": hex::encode(sha2::Sha256::digest(key.expose())), "key_len": key.len()}))
        }),
        other => Err(format!("unknown op {other:?}")),
    }
}

/// What the format-2 volume reported (kind, sector), for the host to check; a read-only
/// mapping never commits.
static REPORTS: std::sync::Mutex<Vec<(String, Option<u64>)>> = std::sync::Mutex::new(Vec::new());

struct GuestReports;

impl Authority for GuestReports {
    fn commit(&self, epoch: u64, _root: &[u8; 32]) -> Result<(), String> {
        Err(format!("a read-only mapping does not commit (epoch {epoch})"))
    }
    fn report(&self, kind: skydd_volume::ViolationKind, sector: Option<u64>) {
        if let Ok(mut reports) = REPORTS.lock() {
            reports.push((kind.as_str().to_string(), sector));
        }
    }
}

/// Bytes relayed from the host as `{"bytes": "<base64>"}`.
#[derive(Deserialize)]
struct Relayed {
    #[serde(with = "protocol::b64")]
    bytes: Vec<u8>,
}

/// Runs `step` with the project's `HostTpm` over `device:/dev/tpmrm0`, its AK and binding
/// key kept in `req.path` (default /tmp/tpm-state) between steps.
fn tpm_flow(
    req: &Request,
    step: impl FnOnce(&mut secure_component::tpm::HostTpm, &Request) -> Result<Value, String>,
) -> Result<Value, String> {
    let dir = if req.path.is_empty() { "/tmp/tpm-state" } else { req.path.as_str() };
    let mut tpm =
        secure_component::tpm::HostTpm::open("device:/dev/tpmrm0", Path::new(dir)).map_err(|e| e.to_string())?;
    step(&mut tpm, req)
}

/// The project's `HostTpm` over `device:/dev/tpmrm0`: enrollment (EK certificate, AK and
/// PCR-bound binding key), then a quote by the AK over a fixed nonce.
fn tpm_enroll_quote(state_dir: &str) -> Result<Value, String> {
    use protocol::attest::PcrSelection;
    use secure_component::tpm::HostTpm;
    let dir = if state_dir.is_empty() { "/tmp/tpm-state" } else { state_dir };
    let mut tpm = HostTpm::open("device:/dev/tpmrm0", Path::new(dir)).map_err(|e| e.to_string())?;
    let req = tpm.enrollment_request("qemu-guest", &PcrSelection::default_host()).map_err(|e| e.to_string())?;
    let quote = tpm.quote(b"skydd-qemu-nonce").map_err(|e| e.to_string())?;
    Ok(json!({
        "ok": true,
        "ek_certificate_len": req.ek_certificate.len(),
        "ak_public_len": req.ak_public.len(),
        "binding_public_len": req.binding_public.len(),
        "quote_attest_len": quote.attest.len(),
        "quote_signature_len": quote.signature.len(),
        "pcr_count": quote.pcr_values.len(),
    }))
}

/// TPM2_GetRandom straight on /dev/tpmrm0 (TPM 2.0 Part 3, command code 0x17B).
fn tpm_getrandom(n: usize) -> Result<Value, String> {
    let n = n.min(32) as u16;
    let mut cmd = vec![0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7B];
    cmd.extend_from_slice(&n.to_be_bytes());
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tpmrm0")
        .map_err(|e| format!("opening /dev/tpmrm0: {e}"))?;
    f.write_all(&cmd).map_err(|e| format!("writing to /dev/tpmrm0: {e}"))?;
    let mut resp = vec![0u8; 4096];
    let len = f.read(&mut resp).map_err(|e| format!("reading /dev/tpmrm0: {e}"))?;
    resp.truncate(len);
    if len < 12 {
        return Err(format!("short TPM response of {len} bytes"));
    }
    let rc = u32::from_be_bytes([resp[6], resp[7], resp[8], resp[9]]);
    if rc != 0 {
        return Err(format!("TPM2_GetRandom returned 0x{rc:x}"));
    }
    let got = u16::from_be_bytes([resp[10], resp[11]]) as usize;
    let bytes = resp.get(12..12 + got).ok_or("truncated TPM2B_DIGEST")?;
    Ok(json!({"ok": true, "random": hex::encode(bytes)}))
}
