//! Format 2 (AES-XTS + sector tags + hash tree) against format 1 (AES-XTS alone), both as
//! [`SectorDevice`]s over the same in-memory volume in the same run, so the figure is the
//! engine's cost and not a disk's: `cargo bench -p skydd-volume --bench integrity`.
//! Env: INTEGRITY_BENCH_SECONDS (default 2 per case), INTEGRITY_BENCH_MIB (data size, 256).
//! Prints MB/s for each format, sequential 1 MiB and random 4 KiB, read and write, and the
//! ratio v2/v1 (goals from the format-2 work: ≥ 0.6 sequential, ≥ 0.5 random).

use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::integrity::ViolationKind;
use protocol::secret::SecretBytes;
use skydd_volume::device::{PlainDevice, SectorDevice};
use skydd_volume::integrity::tag::Tagger;
use skydd_volume::integrity::{Anchor, Authority, IntegrityVolume};
use skydd_volume::io::MemoryIo;
use skydd_volume::layout::DATA_OFFSET;
use skydd_volume::xts::XtsEngine;

/// Accepts every next epoch, as the TTP does (its latency is measured elsewhere).
struct Accepting(std::sync::Mutex<u64>);
impl Authority for Accepting {
    fn commit(&self, epoch: u64, _root: &[u8; 32]) -> Result<(), String> {
        let mut last = self.0.lock().map_err(|_| "poisoned")?;
        if epoch != *last + 1 {
            return Err(format!("epoch {epoch} after {last}"));
        }
        *last = epoch;
        Ok(())
    }
    fn report(&self, kind: ViolationKind, sector: Option<u64>) {
        panic!("unexpected violation {kind:?} at {sector:?}");
    }
}

fn engine() -> XtsEngine {
    let mut key = [0u8; 64];
    for (i, b) in key.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(37).wrapping_add(11);
    }
    XtsEngine::new(&SecretBytes::from_slice_wiping(&mut key)).expect("engine")
}

fn main() {
    let secs: f64 = std::env::var("INTEGRITY_BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(2.0);
    let mib: u64 = std::env::var("INTEGRITY_BENCH_MIB").ok().and_then(|s| s.parse().ok()).unwrap_or(256);
    let dur = Duration::from_secs_f64(secs);
    let sectors = mib * 256;

    let v1_io = Arc::new(MemoryIo::new(DATA_OFFSET + sectors * 4096));
    let v1 = PlainDevice::new(v1_io, engine(), sectors);
    let v2_io = Arc::new(MemoryIo::new(DATA_OFFSET + sectors * 4096));
    let tagger = Tagger::new(&SecretBytes::from_slice_wiping(&mut [7u8; 32]), "00112233445566778899aabbccddeeff")
        .expect("tagger");
    let authority = Arc::new(Accepting(std::sync::Mutex::new(0)));
    let (v2, _) =
        IntegrityVolume::open(v2_io, engine(), tagger, None::<Anchor>, false, authority).expect("format-2 volume");
    // Fill both so reads verify real tags, not the never-written shortcut.
    let mut chunk = vec![0x5au8; 1 << 20];
    for first in (0..sectors).step_by(256) {
        v1.write_sectors(first, &mut chunk.clone()).expect("fill v1");
        v2.write_sectors(first, &mut chunk).expect("fill v2");
        chunk.fill(0x5a);
    }
    v2.flush().expect("commit");

    println!("format 2 vs format 1 over the same in-memory volume ({mib} MiB), {secs} s per case");
    println!("{:<22} {:>12} {:>12} {:>8}", "case", "v1 MB/s", "v2 MB/s", "v2/v1");
    for (name, size, random, write) in [
        ("seq 1 MiB write", 1 << 20, false, true),
        ("seq 1 MiB read", 1 << 20, false, false),
        ("rand 4 KiB write", 4096, true, true),
        ("rand 4 KiB read", 4096, true, false),
    ] {
        let a = run(&v1, dur, size, random, write, sectors);
        let b = run(&v2, dur, size, random, write, sectors);
        println!("{name:<22} {a:>12.0} {b:>12.0} {:>8.2}", b / a);
    }
    // The ceiling: one core, one 4 KiB sector, the cipher alone and the tag alone.
    let xts_only = engine();
    let tagger = Tagger::new(&SecretBytes::from_slice_wiping(&mut [5u8; 32]), "00112233445566778899aabbccddeeff")
        .expect("tagger");
    let mut sector = vec![0x5au8; 4096];
    let xts_rate = per_core(dur, || xts_only.encrypt_sectors(7, &mut sector).expect("xts"));
    let tag_rate = per_core(dur, || {
        std::hint::black_box(tagger.entry(7, 1, &sector));
    });
    println!(
        "1 core, 4 KiB: AES-XTS {xts_rate:.0} MB/s, BLAKE3-keyed tag {tag_rate:.0} MB/s: \
         ceiling of v2/v1 for one pass of each = {:.2}",
        tag_rate / (xts_rate + tag_rate)
    );
    let started = Instant::now();
    let mut one = vec![1u8; 4096];
    let mut flushes = 0u32;
    while started.elapsed() < dur {
        v2.write_sectors(u64::from(flushes) % sectors, &mut one).expect("write");
        v2.flush().expect("flush");
        flushes += 1;
    }
    println!(
        "v2 flush (one dirty block, tree update, in-memory commit): {:.1} µs each",
        started.elapsed().as_secs_f64() * 1e6 / f64::from(flushes)
    );
}

/// MB/s of 4 KiB calls of `f` on this thread for `dur`.
fn per_core(dur: Duration, mut f: impl FnMut()) -> f64 {
    let (mut calls, started) = (0u64, Instant::now());
    while started.elapsed() < dur {
        for _ in 0..64 {
            f();
        }
        calls += 64;
    }
    calls as f64 * 4096.0 / started.elapsed().as_secs_f64() / 1e6
}

/// MB/s (10^6 bytes/s) of `size`-byte requests for `dur`.
fn run(device: &dyn SectorDevice, dur: Duration, size: usize, random: bool, write: bool, sectors: u64) -> f64 {
    let per = (size / 4096) as u64;
    let mut buf = vec![0x33u8; size];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = 0u64;
    let (mut bytes, started) = (0u64, Instant::now());
    while started.elapsed() < dur {
        for _ in 0..16 {
            let first = if random {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state % (sectors - per)
            } else {
                next = (next + per) % (sectors - per);
                next
            };
            if write {
                buf.fill(0x33);
                device.write_sectors(first, &mut buf).expect("write");
            } else {
                device.read_sectors(first, &mut buf).expect("read");
            }
            bytes += size as u64;
        }
    }
    bytes as f64 / started.elapsed().as_secs_f64() / 1e6
}
