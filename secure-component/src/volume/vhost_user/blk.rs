//! One virtio-blk device (virtio 1.x, section 5.2) served over vhost-user from a
//! [`SectorDevice`]: the guest's requests arrive on one virtqueue in guest memory the
//! frontend (qemu) shares with us, and are answered from the volume's plaintext sectors.
//!
//! The device advertises a 4096-byte logical block (`blk_size`), the volume's sector, so a
//! Linux guest only sends whole sectors; requests that are not sector-aligned anyway (the
//! virtio sector unit is 512 bytes) are served by read-modify-write. `VIRTIO_BLK_T_FLUSH`
//! is [`SectorDevice::flush`] (format 2: the root committed to the TTP), and a read-only
//! attachment offers `VIRTIO_BLK_F_RO`, so the guest kernel refuses writes itself; writes
//! that arrive anyway fail with `VIRTIO_BLK_S_IOERR`.

use std::io::{self, Read, Write};
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use skydd_volume::device::SectorDevice;
use skydd_volume::layout::SECTOR_SIZE;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringState, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

/// Guest memory as the vhost-user frontend maps it to us (no dirty-page bitmap: no migration).
pub(super) type Memory = GuestMemoryAtomic<GuestMemoryMmap<()>>;
type Vring = VringRwLock<Memory>;

/// The virtio sector unit of `sector` in requests and `capacity`, whatever `blk_size` says.
const VIRTIO_SECTOR: u64 = 512;
/// Ring size offered to the frontend.
const QUEUE_SIZE: usize = 256;
/// Data descriptors per request (`seg_max`): Linux then sends up to this many segments.
const SEG_MAX: u32 = 126;
/// The request header: type (le32), reserved (le32), sector (le64).
const HEADER_LEN: usize = 16;

/// The vhost-user-blk device of one mapping.
pub(super) struct BlkDevice {
    device: Arc<dyn SectorDevice>,
    read_only: bool,
    serial: Vec<u8>,
    mem: Mutex<Memory>,
    event_idx: AtomicBool,
    exit_consumer: EventConsumer,
    exit_notifier: EventNotifier,
}

impl BlkDevice {
    /// A device over `device`; `serial` (at most 20 bytes are used) is what the guest reads
    /// in `/sys/block/vdX/serial`.
    pub(super) fn new(device: Arc<dyn SectorDevice>, read_only: bool, serial: &str, mem: Memory) -> io::Result<Self> {
        let (exit_consumer, exit_notifier) = new_event_consumer_and_notifier(EventFlag::NONBLOCK)?;
        let mut serial = serial.as_bytes().to_vec();
        serial.truncate(VIRTIO_BLK_ID_BYTES as usize);
        Ok(Self {
            device,
            read_only,
            serial,
            mem: Mutex::new(mem),
            event_idx: AtomicBool::new(false),
            exit_consumer,
            exit_notifier,
        })
    }

    /// Tells the queue worker thread to end (after the frontend hung up or at close).
    pub(super) fn stop_worker(&self) {
        if let Err(e) = self.exit_notifier.notify() {
            tracing::warn!(error = %e, "vhost-user-blk: signalling the queue worker to exit failed");
        }
    }

    fn memory(&self) -> GuestMemoryLoadGuard<GuestMemoryMmap<()>> {
        match self.mem.lock() {
            Ok(m) => m.memory(),
            Err(poisoned) => poisoned.into_inner().memory(),
        }
    }

    /// The virtio-blk configuration space (virtio 1.x 5.2.4), little-endian, as far as we
    /// fill it; the rest reads as zero.
    fn config_space(&self) -> [u8; 64] {
        let mut c = [0u8; 64];
        let capacity = self.device.data_sectors() * (SECTOR_SIZE as u64 / VIRTIO_SECTOR);
        c[0..8].copy_from_slice(&capacity.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        // num_queues (used with VIRTIO_BLK_F_MQ only, harmless otherwise).
        c[34..36].copy_from_slice(&1u16.to_le_bytes());
        c
    }

    /// Takes every available request off the ring, answers it, and notifies the guest.
    fn process_queue(&self, vring: &mut VringState<Memory>, mem: &GuestMemoryLoadGuard<GuestMemoryMmap<()>>) -> bool {
        let mut used_any = false;
        while let Some(chain) = vring.get_queue_mut().pop_descriptor_chain(mem.clone()) {
            let head = chain.head_index();
            let used_len = self.execute(chain, mem);
            if let Err(e) = vring.get_queue_mut().add_used(mem.deref(), head, used_len) {
                tracing::error!(error = ?e, "vhost-user-blk: add_used failed; the ring is broken");
                break;
            }
            used_any = true;
        }
        if used_any {
            let notify = !self.event_idx.load(Ordering::Acquire)
                || vring.get_queue_mut().needs_notification(mem.deref()).unwrap_or(true);
            if notify {
                if let Err(e) = vring.signal_used_queue() {
                    tracing::error!(error = %e, "vhost-user-blk: signalling the guest failed");
                }
            }
        }
        used_any
    }

    /// Runs one request; returns the number of bytes written into guest memory (data and
    /// status), 0 for a chain too broken to carry a status.
    fn execute(
        &self,
        chain: DescriptorChain<GuestMemoryLoadGuard<GuestMemoryMmap<()>>>,
        mem: &GuestMemoryLoadGuard<GuestMemoryMmap<()>>,
    ) -> u32 {
        let (mut reader, mut writer) = match (chain.clone().reader(mem.deref()), chain.writer(mem.deref())) {
            (Ok(r), Ok(w)) => (r, w),
            _ => {
                tracing::warn!("vhost-user-blk: a descriptor chain outside guest memory; dropped");
                return 0;
            }
        };
        let writable = writer.available_bytes();
        if writable == 0 {
            tracing::warn!("vhost-user-blk: a request without a status byte; dropped");
            return 0;
        }
        let mut status_writer = match writer.split_at(writable - 1) {
            Ok(s) => s,
            Err(_) => return 0,
        };
        let (status, data_written) = match self.request(&mut reader, &mut writer) {
            Ok(written) => (VIRTIO_BLK_S_OK, written),
            Err(RequestError::Unsupported(kind)) => {
                tracing::debug!(kind, "vhost-user-blk: unsupported request type");
                (VIRTIO_BLK_S_UNSUPP, 0)
            }
            Err(RequestError::Failed(why)) => {
                tracing::warn!(%why, "vhost-user-blk: request failed");
                (VIRTIO_BLK_S_IOERR, 0)
            }
        };
        if status_writer.write_all(&[status as u8]).is_err() {
            return 0;
        }
        (data_written + 1) as u32
    }

    fn request(&self, reader: &mut impl Read, writer: &mut (impl Write + Available)) -> Result<usize, RequestError> {
        let mut header = [0u8; HEADER_LEN];
        reader.read_exact(&mut header).map_err(|e| RequestError::Failed(format!("reading the request header: {e}")))?;
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&header[8..16]);
        let offset = u64::from_le_bytes(sector)
            .checked_mul(VIRTIO_SECTOR)
            .ok_or_else(|| RequestError::Failed("sector number overflows".into()))?;
        match kind {
            VIRTIO_BLK_T_IN => {
                let mut data = vec![0u8; writer.available()];
                self.read_at(offset, &mut data)?;
                writer.write_all(&data).map_err(|e| RequestError::Failed(format!("writing to guest memory: {e}")))?;
                Ok(data.len())
            }
            VIRTIO_BLK_T_OUT => {
                if self.read_only {
                    return Err(RequestError::Failed("write to a read-only attachment".into()));
                }
                let mut data = Vec::new();
                reader
                    .read_to_end(&mut data)
                    .map_err(|e| RequestError::Failed(format!("reading from guest memory: {e}")))?;
                self.write_at(offset, &mut data)?;
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                self.device.flush().map_err(|e| RequestError::Failed(format!("flush: {e}")))?;
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let n = self.serial.len().min(writer.available());
                writer
                    .write_all(&self.serial[..n])
                    .map_err(|e| RequestError::Failed(format!("writing the serial: {e}")))?;
                Ok(n)
            }
            other => Err(RequestError::Unsupported(other)),
        }
    }

    /// The sectors covering `[offset, offset + len)`: (first sector, sector count).
    fn covering(&self, offset: u64, len: usize) -> Result<(u64, u64), RequestError> {
        let sector = SECTOR_SIZE as u64;
        let end = offset.checked_add(len as u64).ok_or_else(|| RequestError::Failed("request overflows".into()))?;
        let (first, last) = (offset / sector, end.div_ceil(sector));
        if last > self.device.data_sectors() {
            return Err(RequestError::Failed(format!(
                "bytes {offset}..{end} are past the end of the {}-sector volume",
                self.device.data_sectors()
            )));
        }
        Ok((first, last - first))
    }

    fn read_at(&self, offset: u64, out: &mut [u8]) -> Result<(), RequestError> {
        if out.is_empty() {
            return Ok(());
        }
        let (first, count) = self.covering(offset, out.len())?;
        let engine = |e: skydd_volume::Error| RequestError::Failed(format!("reading sectors: {e}"));
        if offset.is_multiple_of(SECTOR_SIZE as u64) && out.len().is_multiple_of(SECTOR_SIZE) {
            return self.device.read_sectors(first, out).map_err(engine);
        }
        let mut whole = vec![0u8; count as usize * SECTOR_SIZE];
        self.device.read_sectors(first, &mut whole).map_err(engine)?;
        let start = (offset - first * SECTOR_SIZE as u64) as usize;
        out.copy_from_slice(&whole[start..start + out.len()]);
        Ok(())
    }

    fn write_at(&self, offset: u64, data: &mut [u8]) -> Result<(), RequestError> {
        if data.is_empty() {
            return Ok(());
        }
        let (first, count) = self.covering(offset, data.len())?;
        let engine = |e: skydd_volume::Error| RequestError::Failed(format!("writing sectors: {e}"));
        if offset.is_multiple_of(SECTOR_SIZE as u64) && data.len().is_multiple_of(SECTOR_SIZE) {
            return self.device.write_sectors(first, data).map_err(engine);
        }
        // Read-modify-write of the partial sectors (one queue and one worker thread: no
        // other request can interleave).
        let mut whole = vec![0u8; count as usize * SECTOR_SIZE];
        self.device.read_sectors(first, &mut whole).map_err(engine)?;
        let start = (offset - first * SECTOR_SIZE as u64) as usize;
        whole[start..start + data.len()].copy_from_slice(data);
        self.device.write_sectors(first, &mut whole).map_err(engine)
    }
}

/// Why a request was not done: the status the guest gets.
enum RequestError {
    /// `VIRTIO_BLK_S_UNSUPP`: a request type this device does not offer.
    Unsupported(u32),
    /// `VIRTIO_BLK_S_IOERR`, with what went wrong (logged, never shown to the guest).
    Failed(String),
}

/// How many bytes a guest-memory writer can still take.
trait Available {
    fn available(&self) -> usize;
}

impl<B: vm_memory::bitmap::BitmapSlice> Available for virtio_queue::Writer<'_, B> {
    fn available(&self) -> usize {
        self.available_bytes()
    }
}

impl VhostUserBackend for BlkDevice {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        1
    }

    fn max_queue_size(&self) -> usize {
        QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        let mut features = (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        features
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let space = self.config_space();
        let (start, end) = (offset as usize, offset as usize + size as usize);
        // The frontend reads the size of its own config struct; past ours reads as zero.
        let mut out = vec![0u8; size as usize];
        if start < space.len() {
            let n = end.min(space.len()) - start;
            out[..n].copy_from_slice(&space[start..start + n]);
        }
        out
    }

    fn update_memory(&self, mem: Memory) -> io::Result<()> {
        match self.mem.lock() {
            Ok(mut m) => *m = mem,
            Err(poisoned) => *poisoned.into_inner() = mem,
        }
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match (self.exit_consumer.try_clone(), self.exit_notifier.try_clone()) {
            (Ok(c), Ok(n)) => Some((c, n)),
            _ => None,
        }
    }

    fn handle_event(&self, device_event: u16, evset: EventSet, vrings: &[Vring], _thread_id: usize) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("vhost-user-blk: unexpected event set {evset:?}")));
        }
        let Some(vring) = vrings.get(device_event as usize) else {
            return Err(io::Error::other(format!("vhost-user-blk: event for unknown queue {device_event}")));
        };
        let mut vring = vring.get_mut();
        let mem = self.memory();
        if !self.event_idx.load(Ordering::Acquire) {
            self.process_queue(&mut vring, &mem);
            return Ok(());
        }
        // With EVENT_IDX the guest notifies only on the transition from empty: keep taking
        // requests until re-enabling notifications finds nothing new.
        loop {
            vring.get_queue_mut().disable_notification(mem.deref()).map_err(io::Error::other)?;
            self.process_queue(&mut vring, &mem);
            if !vring.get_queue_mut().enable_notification(mem.deref()).map_err(io::Error::other)? {
                break;
            }
        }
        Ok(())
    }
}
