//! The `qemu` hypervisor driver: hot-plugs a vhost-user-blk disk ([`crate::volume::vhost_user`])
//! into a running qemu through its QMP monitor, `<qmp_dir>/<vm_id>.qmp` (qemu started with
//! `-qmp unix:<that path>,server=on,wait=off`), for hosts without libvirt and the all-in-one.
//!
//! Attach: `chardev-add` (a unix socket client of the mapping's vhost-user socket), then
//! `device_add vhost-user-blk-pci` on the first PCIe root port with nothing behind it (a q35
//! VM needs free `pcie-root-port`s to hot-plug into; on `pc` machines the root bus takes it).
//! Detach: `device_del`, waiting for qemu's `DEVICE_DELETED` (the guest has let go of the
//! device), then `chardev-remove`. The VM needs its memory shared with the backend
//! (`-object memory-backend-memfd,id=mem,size=...,share=on -numa node,memdev=mem`); a VM
//! without it refuses the device, and the error says so.
//!
//! The guest sees a virtio disk whose serial (`/sys/block/vdX/serial`) is the first 20
//! characters of the mapping name.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{HypervisorDriver, Placement};
use crate::error::{Error, Result};

const DRIVER: &str = "qemu";
/// A QMP command answers within this (device_add negotiates with the backend first).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a guest may take to let go of a device after `device_del` (TCG guests are slow).
const UNPLUG_TIMEOUT: Duration = Duration::from_secs(120);

fn hv(detail: impl Into<String>) -> Error {
    Error::Hypervisor { driver: DRIVER, detail: detail.into() }
}

/// The `qemu` driver (see the module documentation).
pub struct QemuDriver {
    qmp_dir: PathBuf,
    /// One hot-plug at a time per host: two attaches must not pick the same root port.
    lock: Mutex<()>,
}

impl QemuDriver {
    /// A driver finding VM `X`'s monitor at `<qmp_dir>/X.qmp`.
    pub fn new(qmp_dir: impl Into<PathBuf>) -> Self {
        Self { qmp_dir: qmp_dir.into(), lock: Mutex::new(()) }
    }

    /// The QMP socket of `vm_id`.
    pub fn qmp_path(&self, vm_id: &str) -> Result<PathBuf> {
        qmp_socket(&self.qmp_dir, vm_id)
    }

    fn connect(&self, vm_id: &str) -> Result<Qmp> {
        Qmp::connect(&self.qmp_path(vm_id)?)
    }
}

/// `<qmp_dir>/<vm_id>.qmp`, for a VM id that can name a file there.
pub fn qmp_socket(qmp_dir: &Path, vm_id: &str) -> Result<PathBuf> {
    let ok = !vm_id.is_empty()
        && vm_id.len() <= 100
        && !vm_id.starts_with('.')
        && vm_id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !ok {
        return Err(hv(format!(
            "VM id {vm_id:?} cannot name a QMP socket (1-100 characters of A-Z a-z 0-9 - _ . not starting with '.')"
        )));
    }
    Ok(qmp_dir.join(format!("{vm_id}.qmp")))
}

/// The qemu device id of a placement (and, with `-chr`, its chardev id).
fn device_id(placement: &Placement) -> String {
    format!("skydd-{}", placement.domain_id)
}

fn chardev_id(device: &str) -> String {
    format!("{device}-chr")
}

impl HypervisorDriver for QemuDriver {
    fn kind(&self) -> &'static str {
        DRIVER
    }

    fn attach(&self, placement: &Placement) -> Result<String> {
        let _guard = self.lock.lock().map_err(|_| hv("driver lock poisoned"))?;
        let mut qmp = self.connect(&placement.vm_id)?;
        let id = device_id(placement);
        let chr = chardev_id(&id);
        if qmp.peripherals()?.contains(&id) {
            return Err(hv(format!("VM {} already has a device {id}", placement.vm_id)));
        }
        let socket = placement.device.to_str().ok_or_else(|| hv("the vhost-user socket path is not UTF-8"))?;
        qmp.execute(
            "chardev-add",
            json!({"id": chr, "backend": {"type": "socket", "data": {
                "addr": {"type": "unix", "data": {"path": socket}}, "server": false}}}),
        )?;
        let mut args = json!({"driver": "vhost-user-blk-pci", "id": id, "chardev": chr, "num-queues": 1});
        if let Some(port) = qmp.free_root_port()? {
            args["bus"] = json!(port);
        }
        if let Err(e) = qmp.execute("device_add", args) {
            let _ = qmp.execute("chardev-remove", json!({"id": chr}));
            return Err(hv(format!(
                "plugging {} into VM {} failed: {e} (the VM needs shared memory: -object \
                 memory-backend-memfd,id=mem,share=on -numa node,memdev=mem; and a free pcie-root-port on q35)",
                placement.device.display(),
                placement.vm_id
            )));
        }
        tracing::info!(vm = %placement.vm_id, device = %id, "vhost-user-blk disk hot-plugged");
        Ok(id)
    }

    fn detach(&self, placement: &Placement, location: &str) -> Result<()> {
        let _guard = self.lock.lock().map_err(|_| hv("driver lock poisoned"))?;
        let path = self.qmp_path(&placement.vm_id)?;
        if !path.exists() {
            // The VM is gone, and its devices with it.
            tracing::info!(vm = %placement.vm_id, "no QMP socket: the VM is gone, nothing to unplug");
            return Ok(());
        }
        let mut qmp = Qmp::connect(&path)?;
        if qmp.peripherals()?.iter().any(|p| p == location) {
            qmp.execute("device_del", json!({"id": location}))?;
            qmp.wait_deleted(location, UNPLUG_TIMEOUT)?;
        }
        match qmp.execute("chardev-remove", json!({"id": chardev_id(location)})) {
            Ok(_) => {}
            // Already gone (an earlier detach got this far).
            Err(e) if e.to_string().contains("not found") => {}
            Err(e) => return Err(e),
        }
        tracing::info!(vm = %placement.vm_id, device = %location, "vhost-user-blk disk unplugged");
        Ok(())
    }

    fn check(&self, placement: &Placement, location: &str) -> Result<Option<String>> {
        let path = self.qmp_path(&placement.vm_id)?;
        if !path.exists() {
            return Ok(Some(format!("VM {} has no QMP socket at {} (not running)", placement.vm_id, path.display())));
        }
        let mut qmp = Qmp::connect(&path)?;
        Ok(if qmp.peripherals()?.iter().any(|p| p == location) {
            None
        } else {
            Some(format!("VM {} has no device {location}", placement.vm_id))
        })
    }
}

/// One QMP session (JSON lines over the monitor socket).
pub(crate) struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events that arrived while waiting for a command's answer.
    events: Vec<Value>,
}

impl Qmp {
    pub(crate) fn connect(path: &Path) -> Result<Self> {
        let stream = UnixStream::connect(path)
            .map_err(|e| hv(format!("connecting to the QMP monitor {}: {e}", path.display())))?;
        stream.set_read_timeout(Some(COMMAND_TIMEOUT)).map_err(|e| Error::io("setting a QMP read timeout", e))?;
        let writer = stream.try_clone().map_err(|e| Error::io("cloning the QMP socket", e))?;
        let mut qmp = Self { reader: BufReader::new(stream), writer, events: Vec::new() };
        let greeting = qmp.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(hv(format!("{} did not greet like a QMP monitor: {greeting}", path.display())));
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).map_err(|e| hv(format!("reading from the QMP monitor: {e}")))?;
        if n == 0 {
            return Err(hv("the QMP monitor closed the connection"));
        }
        serde_json::from_str(line.trim()).map_err(|e| hv(format!("the QMP monitor sent something not JSON ({e})")))
    }

    /// Runs `command`; its `return` value, or its `error` as an [`Error::Hypervisor`].
    pub(crate) fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        let request = json!({"execute": command, "arguments": arguments});
        self.writer
            .write_all(format!("{request}\n").as_bytes())
            .map_err(|e| hv(format!("writing to the QMP monitor: {e}")))?;
        loop {
            let message = self.read_message()?;
            if message.get("event").is_some() {
                self.events.push(message);
            } else if let Some(value) = message.get("return") {
                return Ok(value.clone());
            } else if let Some(error) = message.get("error") {
                return Err(hv(format!(
                    "{command}: {} ({})",
                    error["desc"].as_str().unwrap_or("no description"),
                    error["class"].as_str().unwrap_or("no class")
                )));
            }
        }
    }

    /// The ids of the VM's user-created devices (`/machine/peripheral`).
    fn peripherals(&mut self) -> Result<Vec<String>> {
        let list = self.execute("qom-list", json!({"path": "/machine/peripheral"}))?;
        Ok(list
            .as_array()
            .map(|a| a.iter().filter_map(|p| p["name"].as_str().map(str::to_string)).collect())
            .unwrap_or_default())
    }

    /// The id of the first PCI bridge (a q35 `pcie-root-port`) with no device behind it;
    /// `None` when the VM has none (a `pc` machine hot-plugs on its root bus).
    fn free_root_port(&mut self) -> Result<Option<String>> {
        let buses = self.execute("query-pci", json!({}))?;
        let mut ports = Vec::new();
        for bus in buses.as_array().into_iter().flatten() {
            collect_free_bridges(&bus["devices"], &mut ports);
        }
        Ok(ports.into_iter().next())
    }

    /// Waits for `DEVICE_DELETED` of `id`, polling the device list too (bounded).
    fn wait_deleted(&mut self, id: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let deleted = |e: &Value| e["event"] == "DEVICE_DELETED" && e["data"]["device"] == id;
            if self.events.iter().any(deleted) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(hv(format!(
                    "the guest did not release device {id} within {timeout:?} after device_del (is it still mounted?)"
                )));
            }
            // Polling also collects the events that arrive meanwhile.
            if !self.peripherals()?.iter().any(|p| p == id) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Bridges in `devices` (a `query-pci` device list) with nothing behind them, depth first.
fn collect_free_bridges(devices: &Value, out: &mut Vec<String>) {
    for device in devices.as_array().into_iter().flatten() {
        let Some(bridge) = device.get("pci_bridge") else { continue };
        let behind = &bridge["devices"];
        let empty = behind.as_array().is_none_or(|d| d.is_empty());
        match device["qdev_id"].as_str() {
            Some(id) if empty && !id.is_empty() => out.push(id.to_string()),
            _ => collect_free_bridges(behind, out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_bridges_from_query_pci() {
        let devices = json!([
            {"qdev_id": "", "class_info": {"class": 1536}},
            {"qdev_id": "rp0", "pci_bridge": {"bus": {"number": 1}, "devices": [{"qdev_id": "disk0"}]}},
            {"qdev_id": "rp1", "pci_bridge": {"bus": {"number": 2}, "devices": []}},
            {"qdev_id": "rp2", "pci_bridge": {"bus": {"number": 3}}}
        ]);
        let mut out = Vec::new();
        collect_free_bridges(&devices, &mut out);
        assert_eq!(out, vec!["rp1".to_string(), "rp2".to_string()]);
    }

    #[test]
    fn vm_ids_are_checked() {
        let driver = QemuDriver::new("/run/skydd/qmp");
        assert_eq!(driver.qmp_path("vm-a").expect("valid"), PathBuf::from("/run/skydd/qmp/vm-a.qmp"));
        for bad in ["", "../x", "a/b", ".hidden"] {
            assert!(driver.qmp_path(bad).is_err(), "{bad}");
        }
    }
}
