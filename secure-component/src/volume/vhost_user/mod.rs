//! The vhost-user-blk backend: the plaintext sectors of a volume (the same engine as the
//! userspace backend, `volume::engine`) served straight to a qemu guest as a virtio block
//! device over a vhost-user socket (docs/VHOST-USER.md). No device-mapper, loop device or
//! FUSE on the host: the plaintext exists only in this process and in the guest.
//!
//! Per mapping: a listening unix socket `<socket_dir>/<name>.sock` (mode 0600, or handed to
//! the hypervisor's user by the driver), one thread accepting the frontend and answering
//! its vhost-user messages, and one worker thread answering the virtqueue. The
//! [`OpenVolume::device`] of a mapping is its socket; a hypervisor driver ([`crate::hypervisor`])
//! tells qemu to connect to it. The frontend gets one connection: when it hangs up (the
//! device was unplugged, or the VM ended) the mapping stops serving and reports stale.

mod blk;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use protocol::secret::SecretBytes;
use skydd_volume::device::SectorDevice;
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use super::engine::open_sector_device;
use super::{IntegrityOpen, OpenMode, OpenVolume, VolumeBackend};
use crate::error::{Error, Result};
use blk::BlkDevice;

/// Default directory of the vhost-user sockets (tmpfs on a host).
pub const DEFAULT_SOCKET_DIR: &str = "/run/skydd/vhost-user";

/// How long `close` waits for the serving threads to end after hanging up on the frontend.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// One served mapping.
struct Served {
    socket: PathBuf,
    mode: OpenMode,
    // Flushed (format 2: the final root committed) at close; the last reference to the engine
    // (and so its key schedule) goes with `blk` and the serving thread.
    device: Arc<dyn SectorDevice>,
    blk: Arc<BlkDevice>,
    // Set once the frontend connected: hangs up on it at close.
    connection: Arc<Mutex<Option<ShutdownHandle>>>,
    thread: JoinHandle<()>,
}

/// What the backend knows about one of its mappings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedStatus {
    /// The mapping name.
    pub name: String,
    /// The vhost-user socket the frontend connects to.
    pub socket: PathBuf,
    /// `None` while it serves (or waits for its frontend); otherwise why it stopped.
    pub stale: Option<String>,
}

/// The vhost-user-blk backend. One per process; mappings live as long as it does.
pub struct VhostUserBlkBackend {
    socket_dir: PathBuf,
    live: Mutex<HashMap<String, Served>>,
}

impl VhostUserBlkBackend {
    /// A backend listening in `socket_dir` (created if missing, mode 0711 so a hypervisor
    /// running as another user can reach a socket handed to it).
    pub fn new(socket_dir: impl Into<PathBuf>) -> Result<Self> {
        let socket_dir = socket_dir.into();
        std::fs::create_dir_all(&socket_dir)
            .map_err(|e| Error::io(format!("creating socket directory {}", socket_dir.display()), e))?;
        std::fs::set_permissions(&socket_dir, std::fs::Permissions::from_mode(0o711))
            .map_err(|e| Error::io(format!("setting the mode of {}", socket_dir.display()), e))?;
        Ok(Self { socket_dir, live: Mutex::new(HashMap::new()) })
    }

    /// Where the sockets are.
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// The socket of mapping `name` (whether or not it is open).
    pub fn socket_path(&self, name: &str) -> PathBuf {
        self.socket_dir.join(format!("{name}.sock"))
    }

    /// Every mapping of this process, serving or stale.
    pub fn list_detailed(&self) -> Result<Vec<ServedStatus>> {
        let live = self.lock()?;
        let mut out: Vec<ServedStatus> = live
            .iter()
            .map(|(name, s)| ServedStatus {
                name: name.clone(),
                socket: s.socket.clone(),
                stale: s.thread.is_finished().then(|| {
                    "its vhost-user frontend hung up (the device was unplugged or the VM ended); it serves no data"
                        .to_string()
                }),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, HashMap<String, Served>>> {
        self.live.lock().map_err(|_| Error::Volume("vhost-user backend state lock poisoned".into()))
    }

    /// Builds the sector device with `device` and starts serving it on its socket.
    fn serve(
        &self,
        name: &str,
        mode: OpenMode,
        device: impl FnOnce() -> Result<Arc<dyn SectorDevice>>,
    ) -> Result<OpenVolume> {
        super::userspace::validate_name(name)?;
        let mut live = self.lock()?;
        if live.contains_key(name) {
            return Err(Error::Volume(format!("vhost-user mapping {name} is already open")));
        }
        let socket = self.socket_path(name);
        let sector_device = device()?;
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let read_only = mode == OpenMode::ReadOnly;
        let blk = Arc::new(
            BlkDevice::new(sector_device.clone(), read_only, name, mem.clone())
                .map_err(|e| Error::io(format!("creating the vhost-user-blk device of {name}"), e))?,
        );
        let mut daemon = VhostUserDaemon::new(format!("vhost-user-{name}"), blk.clone(), mem)
            .map_err(|e| Error::Volume(format!("creating the vhost-user daemon of {name}: {e}")))?;
        // A socket left by an earlier process is unlinked first (`true`): nothing serves it.
        let mut listener = Listener::new(&socket, true)
            .map_err(|e| Error::Volume(format!("listening on {}: {e}", socket.display())))?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io(format!("setting the mode of {}", socket.display()), e))?;
        let connection: Arc<Mutex<Option<ShutdownHandle>>> = Arc::new(Mutex::new(None));
        let thread_connection = connection.clone();
        let thread_blk = blk.clone();
        let thread_name = name.to_string();
        let thread = std::thread::Builder::new()
            .name(format!("vhost-user {name}"))
            .spawn(move || {
                let name = thread_name;
                match daemon.start(&mut listener) {
                    Ok(()) => {
                        if let Ok(mut c) = thread_connection.lock() {
                            *c = daemon.shutdown_handle();
                        }
                        tracing::info!(%name, "vhost-user frontend connected");
                        match daemon.wait() {
                            Ok(()) => tracing::info!(%name, "vhost-user frontend hung up"),
                            Err(e) => tracing::info!(%name, reason = %e, "vhost-user connection ended"),
                        }
                    }
                    Err(e) => tracing::warn!(%name, error = %e, "vhost-user: accepting the frontend failed"),
                }
                thread_blk.stop_worker();
                // Dropping the daemon joins the queue worker and drops its device reference.
                drop(daemon);
            })
            .map_err(|e| Error::io(format!("starting the vhost-user thread of {name}"), e))?;
        tracing::info!(name, socket = %socket.display(), ?mode, "vhost-user-blk volume opened");
        live.insert(
            name.to_string(),
            Served { socket: socket.clone(), mode, device: sector_device, blk, connection, thread },
        );
        Ok(OpenVolume { name: name.to_string(), device: socket, mode })
    }

    fn close_mapping(&self, name: &str) -> Result<()> {
        let served = self
            .lock()?
            .remove(name)
            .ok_or_else(|| Error::Volume(format!("vhost-user mapping {name} is not open in this process")))?;
        // Normally the driver unplugged the device first and the frontend is gone already;
        // otherwise hang up on it, or wake the accept with a connection of our own.
        let deadline = Instant::now() + CLOSE_WAIT;
        while !served.thread.is_finished() && Instant::now() < deadline {
            let handle = served.connection.lock().ok().and_then(|c| c.clone());
            match handle {
                Some(h) => h.shutdown(),
                None => drop(UnixStream::connect(&served.socket)),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if !served.thread.is_finished() {
            let socket = served.socket.clone();
            self.lock()?.insert(name.to_string(), served);
            return Err(Error::Volume(format!(
                "closing {name}: the vhost-user thread serving {} did not end within {CLOSE_WAIT:?}",
                socket.display()
            )));
        }
        if served.thread.join().is_err() {
            tracing::warn!(name, "the vhost-user thread panicked");
        }
        // Every guest write has been answered; this commits what is still open (format 2: the
        // root at detach). A failure loses nothing: the next open settles those writes.
        if let Err(e) = served.device.flush() {
            tracing::warn!(name, error = %e, "final flush at close failed; the next open recovers these writes");
        }
        drop(served.blk);
        drop(served.device);
        let _ = std::fs::remove_file(&served.socket);
        tracing::info!(name, mode = ?served.mode, "vhost-user-blk volume closed");
        Ok(())
    }
}

impl VolumeBackend for VhostUserBlkBackend {
    fn kind(&self) -> &'static str {
        "vhost-user"
    }

    fn open(&self, name: &str, volume: &Path, key: &SecretBytes, mode: OpenMode) -> Result<OpenVolume> {
        self.serve(name, mode, || open_sector_device(name, volume, key, None, mode))
    }

    fn open_authenticated(
        &self,
        name: &str,
        volume: &Path,
        key: &SecretBytes,
        integrity: IntegrityOpen,
        mode: OpenMode,
    ) -> Result<OpenVolume> {
        self.serve(name, mode, || open_sector_device(name, volume, key, Some(integrity), mode))
    }

    fn live_device(&self, name: &str) -> Result<Arc<dyn SectorDevice>> {
        let live = self.lock()?;
        let served =
            live.get(name).ok_or_else(|| Error::Volume(format!("mapping {name} is not open in this process")))?;
        Ok(served.device.clone())
    }

    fn close(&self, name: &str) -> Result<()> {
        self.close_mapping(name)
    }

    fn list(&self) -> Result<Vec<OpenVolume>> {
        let live = self.lock()?;
        let mut out: Vec<OpenVolume> = live
            .iter()
            .filter(|(_, s)| !s.thread.is_finished())
            .map(|(name, s)| OpenVolume { name: name.clone(), device: s.socket.clone(), mode: s.mode })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}

impl Drop for VhostUserBlkBackend {
    fn drop(&mut self) {
        let names: Vec<String> = match self.live.lock() {
            Ok(l) => l.keys().cloned().collect(),
            Err(_) => return,
        };
        super::close_at_shutdown(self, names);
    }
}
