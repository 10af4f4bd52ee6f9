//! Throughput of the userspace AES-256-XTS engine beside `openssl speed`, measured in the
//! same run on the same machine: `cargo bench -p skydd-volume --bench xts`.
//! Env: XTS_BENCH_SECONDS (default 3). Prints GB/s (10^9 bytes/s) and the ratios.

use std::process::Command;
use std::time::{Duration, Instant};

use protocol::secret::SecretBytes;
use skydd_volume::xts::XtsEngine;

fn main() {
    let secs: f64 = std::env::var("XTS_BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let dur = Duration::from_secs_f64(secs);
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);

    let mut key = [0u8; 64];
    for (i, b) in key.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(37).wrapping_add(11);
    }
    let engine = XtsEngine::new(&SecretBytes::from_slice_wiping(&mut key)).expect("engine");

    // Single core, 4 KiB per call (the same shape as `openssl speed -bytes 4096`).
    let mut sector = vec![0x5au8; 4096];
    let one = measure(dur, 4096, |i| engine.encrypt_sectors(i, &mut sector).expect("encrypt"));
    let mut sector = vec![0x5au8; 4096];
    let one_dec = measure(dur, 4096, |i| engine.decrypt_sectors(i, &mut sector).expect("decrypt"));
    let mut key2 = [0u8; 64];
    for (i, b) in key2.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(37).wrapping_add(11);
    }
    let ossl_engine = XtsEngine::new_openssl_only(&SecretBytes::from_slice_wiping(&mut key2)).expect("engine");
    let mut sector = vec![0x5au8; 4096];
    let one_ossl = measure(dur, 4096, |i| ossl_engine.encrypt_sectors(i, &mut sector).expect("encrypt"));
    // All cores: 4 MiB requests, split across the rayon pool.
    let mut big = vec![0x5au8; 4 << 20];
    let all = measure(dur, big.len(), |i| engine.encrypt_sectors(i * 1024, &mut big).expect("encrypt"));

    let ossl_one = openssl_speed(secs, None);
    let ossl_all = openssl_speed(secs, Some(cores));

    println!("implementation: {}", engine.implementation());
    println!("engine 1 core  encrypt 4 KiB:   {one:.2} GB/s");
    println!("engine (OpenSSL path forced) 1 core encrypt 4 KiB: {one_ossl:.2} GB/s");
    println!("engine 1 core  decrypt 4 KiB:   {one_dec:.2} GB/s");
    println!("engine {cores} cores encrypt 4 MiB:   {all:.2} GB/s");
    match ossl_one {
        Some(o) => println!("openssl speed 1 core  4 KiB:     {o:.2} GB/s   ratio engine/openssl = {:.2}", one / o),
        None => println!("openssl speed 1 core: unavailable"),
    }
    match ossl_all {
        Some(o) => println!("openssl speed -multi {cores} 4 KiB:  {o:.2} GB/s   ratio engine/openssl = {:.2}", all / o),
        None => println!("openssl speed -multi: unavailable"),
    }
}

/// Runs `f(i)` with i = 0, 1, 2, ... for `dur`; returns GB/s for `bytes` per call.
fn measure(dur: Duration, bytes: usize, mut f: impl FnMut(u64)) -> f64 {
    for i in 0..64 {
        f(i);
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < dur {
        for _ in 0..64 {
            f(n);
            n += 1;
        }
    }
    (n as f64 * bytes as f64) / start.elapsed().as_secs_f64() / 1e9
}

/// `openssl speed -evp aes-256-xts -bytes 4096 -seconds N [-multi M]` in GB/s.
fn openssl_speed(secs: f64, multi: Option<usize>) -> Option<f64> {
    let mut cmd = Command::new("openssl");
    cmd.args(["speed", "-evp", "aes-256-xts", "-bytes", "4096", "-seconds"]).arg(format!("{}", secs.ceil() as u64));
    if let Some(m) = multi {
        cmd.args(["-multi", &m.to_string()]);
    }
    let out = cmd.output().ok()?;
    parse_openssl_speed(&String::from_utf8_lossy(&out.stdout))
}

/// The last line starting with the cipher name (single: "AES-256-XTS  6200994.68k";
/// -multi: "evp  6200994.68k"), in 1000s of bytes per second.
fn parse_openssl_speed(text: &str) -> Option<f64> {
    text.lines()
        .rev()
        .find(|l| l.starts_with("AES-256-XTS") || l.starts_with("aes-256-xts") || l.starts_with("evp"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.trim_end_matches('k').parse::<f64>().ok())
        .map(|k| k * 1000.0 / 1e9)
}
