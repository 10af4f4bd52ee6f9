#!/usr/bin/env bash
# fio on ext4 over the userspace-encrypted volume (FUSE + our AES-XTS engine + loop) beside
# ext4 over an unencrypted file on a loop device, measured in the same run, with ratios.
# Needs root, fio, /dev/fuse, loop devices. Usage: scripts/fio-compare.sh [WORKDIR]
# Env: RUNTIME (s per job, default 10), SIZE_MIB (volume size, default 2048),
#      FILE_MIB (fio file size, default 1024),
#      FORMAT (1 or 2, the userspace volume's format, default 1),
#      PEER (plain: an unencrypted loop file, the default; v1: a format-1 userspace volume,
#            to measure what format 2 costs over format 1 in the same run; threads1: the
#            same volume format served by ONE FUSE thread, the backend as it was),
#      FUSE_THREADS (the measured volume's FUSE threads; default: the backend's, 4).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/var/tmp/skydd-fio}
RUNTIME=${RUNTIME:-10}
SIZE_MIB=${SIZE_MIB:-2048}
FILE_MIB=${FILE_MIB:-1024}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)

cargo build --release -q -p secure-component --example userspace_volume
BIN=target/release/examples/userspace_volume

PLAIN_LOOP=""
cleanup() {
    set +e
    mountpoint -q "$WORK/plain.mnt" && umount "$WORK/plain.mnt"
    [ -n "$PLAIN_LOOP" ] && losetup -d "$PLAIN_LOOP"
    if [ -n "${ENC_PID:-}" ] && kill -0 "$ENC_PID" 2>/dev/null; then
        exec 3>&-
        wait "$ENC_PID"
    fi
    if [ -n "${PEER_PID:-}" ] && kill -0 "$PEER_PID" 2>/dev/null; then
        exec 4>&-
        wait "$PEER_PID"
    fi
    rm -rf "$WORK/enc.img" "$WORK/plain.img" "$WORK/peer.img" "$WORK/state" "$WORK/peer-state" "$WORK"/*.mnt \
        "$WORK/enc.fifo" "$WORK/peer.fifo"
}
trap cleanup EXIT
rm -rf "$WORK/enc.img" "$WORK/plain.img" "$WORK/peer.img" "$WORK/state" "$WORK/peer-state" "$WORK"/*.mnt \
    "$WORK/enc.fifo" "$WORK/peer.fifo"
mkdir -p "$WORK/enc.mnt" "$WORK/plain.mnt"

FORMAT=${FORMAT:-1}
PEER=${PEER:-plain}
# Encrypted: the helper keeps the volume open until its stdin (a fifo we hold) closes.
mkfifo "$WORK/enc.fifo"
SKYDD_FUSE_THREADS=${FUSE_THREADS:-} SKYDD_FORMAT=$FORMAT "$BIN" "$WORK/enc.img" "$SIZE_MIB" "$WORK/enc.mnt" "$WORK/state" <"$WORK/enc.fifo" >"$WORK/enc.log" 2>&1 &
ENC_PID=$!
exec 3>"$WORK/enc.fifo"
for _ in $(seq 1 300); do grep -q READY "$WORK/enc.log" 2>/dev/null && break; sleep 0.2; done
grep -q READY "$WORK/enc.log" || { cat "$WORK/enc.log"; exit 1; }

if [ "$PEER" = v1 ] || [ "$PEER" = threads1 ]; then
    # v1: a format-1 userspace volume (same engine, same FUSE path, no tags).
    # threads1: the same format with one FUSE thread.
    mkfifo "$WORK/peer.fifo"
    if [ "$PEER" = v1 ]; then PEER_FORMAT=1; PEER_THREADS=""; else PEER_FORMAT=$FORMAT; PEER_THREADS=1; fi
    SKYDD_FUSE_THREADS=$PEER_THREADS SKYDD_FORMAT=$PEER_FORMAT "$BIN" "$WORK/peer.img" "$SIZE_MIB" "$WORK/plain.mnt" "$WORK/peer-state" 3>&- \
        <"$WORK/peer.fifo" >"$WORK/peer.log" 2>&1 &
    PEER_PID=$!
    exec 4>"$WORK/peer.fifo"
    for _ in $(seq 1 300); do grep -q READY "$WORK/peer.log" 2>/dev/null && break; sleep 0.2; done
    grep -q READY "$WORK/peer.log" || { cat "$WORK/peer.log"; exit 1; }
    if [ "$PEER" = v1 ]; then PEER_NAME="format-1 volume"; else PEER_NAME="format-$FORMAT volume, 1 FUSE thread"; fi
else
    # Plain: same size, same file system, 4096-byte loop sectors like the encrypted side.
    truncate -s "${SIZE_MIB}M" "$WORK/plain.img"
    PLAIN_LOOP=$(losetup -f --show --sector-size 4096 "$WORK/plain.img")
    mkfs.ext4 -q -F -b 4096 -E lazy_itable_init=0,lazy_journal_init=0 "$PLAIN_LOOP"
    mount "$PLAIN_LOOP" "$WORK/plain.mnt"
    PEER_NAME="plain loop"
fi

run() { # dir name rw bs
    local dir=$1 name=$2 rw=$3 bs=$4 direct=1
    # O_DIRECT on ext4 works on both sides; fall back to buffered if the fs refuses it.
    fio --name="$name" --directory="$dir" --filename=fio.dat --size="${FILE_MIB}M" \
        --rw="$rw" --bs="$bs" --direct=$direct --ioengine=libaio --iodepth=16 --numjobs=1 \
        --time_based --runtime="$RUNTIME" --ramp_time=1 --end_fsync=1 \
        --output-format=json >"$WORK/$name.json" 2>"$WORK/$name.err" || {
        direct=0
        fio --name="$name" --directory="$dir" --filename=fio.dat --size="${FILE_MIB}M" \
            --rw="$rw" --bs="$bs" --direct=0 --ioengine=psync --numjobs=1 \
            --time_based --runtime="$RUNTIME" --ramp_time=1 --end_fsync=1 \
            --output-format=json >"$WORK/$name.json"
    }
    python3 - "$WORK/$name.json" "$rw" "$direct" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
side = "read" if "read" in sys.argv[2] else "write"
s = j[side]
print(f'{s["bw_bytes"]/1e6:.1f} {s["iops"]:.0f} {sys.argv[3]}')
PY
}

printf '| workload | %s MB/s (IOPS) | format-%s userspace volume MB/s (IOPS) | ratio |\n' "$PEER_NAME" "$FORMAT"
printf '|---|---|---|---|\n'
for spec in "seq-write write 1M" "seq-read read 1M" "rand-write randwrite 4k" "rand-read randread 4k"; do
    set -- $spec
    p=$(run "$WORK/plain.mnt" "plain-$1" "$2" "$3")
    e=$(run "$WORK/enc.mnt" "enc-$1" "$2" "$3")
    set -- "$1 ($3, direct=${e##* })" $p $e
    ratio=$(python3 -c "print(f'{$5/$2:.2f}' if $2 else 'n/a')")
    printf '| %s | %s (%s) | %s (%s) | %s |\n' "$1" "$2" "$3" "$5" "$6" "$ratio"
done
