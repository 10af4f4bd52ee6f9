#!/usr/bin/env bash
# The demo's story across the lab's nodes, with the domain-manager CLI on the controller and
# each VM's view checked on its compute host. Runs where it can reach every node:
#   vagrant mode: on the KVM host, in vagrant/ (each step through `vagrant ssh NODE`);
#   chroot mode:  on the machine holding the chroots, SKYDD_LAB_CHROOTS="node=DIR ...".
# Every claim is checked; the first failed check stops the story with a non-zero exit.
set -euo pipefail
SKYDD_LAB_MODE="${SKYDD_LAB_MODE:-vagrant}"
LAB_VMS="${SKYDD_LAB_VMS:-vm-a=compute-1 vm-b=compute-2 vm-c=compute-2}"
RECORD="patient 0001: cardiology, echocardiogram 2026-03-14, EF 55%"
step=0

say() { printf '    %s\n' "$*"; }
headline() { step=$((step + 1)); printf '\n[%d] %s\n' "$step" "$*"; }
fail() { printf 'DEMO FAILED at step %d: %s\n' "$step" "$*" >&2; exit 1; }

# on NODE SCRIPT: runs SCRIPT as root with bash on NODE; prints its stdout.
on() {
  local node="$1" script="$2" pair root=""
  if [ "$SKYDD_LAB_MODE" = vagrant ]; then
    vagrant ssh "$node" -c "sudo bash -c $(printf '%q' "$script")" -- -q
    return
  fi
  for pair in ${SKYDD_LAB_CHROOTS:-}; do
    [ "${pair%%=*}" = "$node" ] && root="${pair#*=}"
  done
  [ -n "$root" ] || fail "no chroot for node $node in SKYDD_LAB_CHROOTS"
  chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root bash -c "$script"
}

# dm MANAGER ARGS...: the domain-manager CLI on the controller as MANAGER.
dm() {
  local who="$1"
  shift
  on controller "domain-manager --config /root/.config/skydd/$who.toml $(printf '%q ' "$@")"
}

# crypt_mappings HOST: "name READ-ONLY|READ-WRITE" of every skydd-* dm-crypt mapping on HOST,
# after checking that no table there carries a key (only a logon key's name) (vagrant mode).
# shellcheck disable=SC2016 # the script runs on HOST, its variables are HOST's
crypt_mappings() {
  on "$1" 'set -e
    for m in $(dmsetup ls --target crypt | awk "/^skydd-/ {print \$1}"); do
      for t in "$(dmsetup table "$m")" "$(dmsetup table --showkeys "$m")"; do
        case "$t" in *":logon:skydd:$m "*) ;; *) echo "KEY-NOT-IN-KEYRING $m"; continue ;; esac
        if printf "%s" "$t" | grep -Eq "[0-9a-fA-F]{64}"; then echo "KEY-IN-TABLE $m"; fi
      done
      if dmsetup info "$m" | grep -q "READ-ONLY"; then echo "$m READ-ONLY"; else echo "$m READ-WRITE"; fi
    done'
}

host_of() {
  local pair
  for pair in $LAB_VMS; do [ "${pair%%=*}" = "$1" ] && { printf '%s' "${pair#*=}"; return; }; done
  fail "no host for $1"
}

headline "dm-alice creates a domain: cardiology records; vm-a may read and write, vm-b may only read"
# Format 2, the default (tags and a hash tree the TTP anchors). On the booted nodes
# backend = "auto" opens it read-write with the userspace engine beside dm-crypt (no kernel
# target keeps its tags for writes) and read-only with dm-verity under dm-crypt
# (docs/DMCRYPT.md "Format 2, read-write"); a format-1 domain shows dm-crypt read-write below.
FORMAT="${SKYDD_LAB_FORMAT:-2}"
created="$(dm dm-alice --json domain create --format "$FORMAT" --meta department=cardiology --vm vm-a:rw --vm vm-b:ro --size 64M)"
id="$(printf '%s\n' "$created" | sed -n 's/^  "id": "\(.*\)",*$/\1/p' | head -n 1)"
[ -n "$id" ] || fail "no domain id in: $created"
say "domain $id (format $FORMAT), version 1, registered with the TTP (the cloud platform never sees its key)"

headline "vm-a (on $(host_of vm-a)) attaches read-write and writes a patient record"
attached="$(dm dm-alice --json attach "$id" --vm vm-a --mode rw)"
device="$(printf '%s\n' "$attached" | sed -n 's/^  "device": "\(.*\)",*$/\1/p' | head -n 1)"
say "device $device"
if [ "$SKYDD_LAB_MODE" = vagrant ] && [ "$FORMAT" = 2 ]; then
  # dm-crypt cannot keep format 2's tags for writes: the engine serves it, FUSE + loop,
  # inside the same hardened unit (SystemCallFilter, DevicePolicy=closed).
  case "$device" in /dev/loop*) ;; *) fail "vm-a's format-2 read-write device $device is not the engine's loop device" ;; esac
  on "$(host_of vm-a)" "grep -q 'skydd-$id-vm-a [^ ]* fuse' /proc/mounts" \
    || fail "no FUSE mount of the engine for vm-a on $(host_of vm-a)"
  [ -z "$(crypt_mappings "$(host_of vm-a)")" ] || fail "a dm-crypt mapping opened a format-2 volume read-write"
  say "backend \"auto\": the userspace engine beside dm-crypt serves it (FUSE + $device) under the hardened unit"
fi
on "$(host_of vm-a)" "printf '%s' '$RECORD' > /var/lib/skydd/vms/vm-a/$id/record.txt && sync" || fail "vm-a cannot write"
say "vm-a wrote $(printf '%s' "$RECORD" | wc -c) bytes"

headline "vm-a detaches (ext4 is not a cluster file system); vm-b (on $(host_of vm-b)) attaches read-only and reads"
dm dm-alice detach "$id" --vm vm-a >/dev/null
if [ "$SKYDD_LAB_MODE" = vagrant ]; then
  if on "$(host_of vm-a)" "grep -q 'skydd-$id-vm-a [^ ]* fuse' /proc/mounts"; then fail "the engine's FUSE mount is left on $(host_of vm-a)"; fi
  say "$(host_of vm-a): the engine's mount and loop device are gone"
fi
dm dm-alice attach "$id" --vm vm-b --mode ro >/dev/null
if [ "$SKYDD_LAB_MODE" = vagrant ]; then
  maps="$(crypt_mappings "$(host_of vm-b)")"
  case "$maps" in *KEY-*) fail "a dm-crypt table on $(host_of vm-b) is not keyring-backed: $maps" ;; esac
  case "$maps" in *" READ-ONLY") ;; *) fail "vm-b's read-only grant did not give a read-only mapping: $maps" ;; esac
  if [ "$FORMAT" = 2 ]; then
    on "$(host_of vm-b)" "dmsetup ls --target verity | grep -q '^skyddv-'" \
      || fail "no dm-verity mapping under vm-b's format-2 read-only mapping on $(host_of vm-b)"
    say "$(host_of vm-b): $maps over dm-verity (the read-only grant is a read-only, verified mapping)"
  else
    say "$(host_of vm-b): $maps (the read-only grant is a read-only mapping)"
  fi
fi
got="$(on "$(host_of vm-b)" "cat /var/lib/skydd/vms/vm-b/$id/record.txt")"
[ "$got" = "$RECORD" ] || fail "vm-b read '$got'"
say "vm-b reads what vm-a wrote: two hosts' TPMs received the same domain key from the TTP"

headline "vm-b tries to write"
if out="$(on "$(host_of vm-b)" "echo x > /var/lib/skydd/vms/vm-b/$id/tamper.txt" 2>&1)"; then
  fail "vm-b wrote to a read-only attachment"
fi
case "$out" in *"Read-only file system"*) say "refused: Read-only file system (a read-only block device below ext4)" ;; *) fail "vm-b's write failed, but not as read-only: $out" ;; esac

headline "the cloud operator looks at the raw volume on the controller"
if on controller "grep -c -F '$RECORD' /var/lib/skydd-cp/volumes/$id.vol" >/dev/null 2>&1; then
  fail "the record is readable in the raw volume"
fi
say "no plaintext in /var/lib/skydd-cp/volumes/$id.vol"

headline "dm-alice revokes vm-b; vm-b tries to attach again"
dm dm-alice domain revoke "$id" --vm vm-b >/dev/null
if on "$(host_of vm-b)" "grep -q ' /var/lib/skydd/vms/vm-b/$id ' /proc/mounts"; then fail "vm-b is still mounted after the revocation"; fi
say "the cloud platform detached vm-b at once"
if out="$(dm dm-alice attach "$id" --vm vm-b --mode ro 2>&1)"; then fail "vm-b attached after revocation"; fi
say "refused: $(printf '%s' "$out" | head -n 1)"

headline "dm-alice grants vm-c read-only and shares the domain with dm-bob, who attaches vm-c"
dm dm-alice domain grant "$id" --vm vm-c:ro >/dev/null
dm dm-alice domain share "$id" --with dm-bob >/dev/null
if out="$(dm dm-bob attach "$id" --vm vm-c --mode rw 2>&1)"; then fail "dm-bob attached vm-c read-write"; fi
say "dm-bob asks read-write: refused: $(printf '%s' "$out" | head -n 1)"
dm dm-bob attach "$id" --vm vm-c --mode ro >/dev/null
got="$(on "$(host_of vm-c)" "cat /var/lib/skydd/vms/vm-c/$id/record.txt")"
[ "$got" = "$RECORD" ] || fail "vm-c read '$got'"
say "vm-c reads the record"

headline "dm-alice reads the viewing history from the TTP"
history="$(dm dm-alice domain history "$id")"
printf '%s\n' "$history" | sed 's/^/    /'
# Columns: #, time, event, outcome, vm, host, by.
releases="$(printf '%s\n' "$history" | awk '$3 == "key_release" && $4 == "ok"' | wc -l)"
refusals="$(printf '%s\n' "$history" | awk '$3 == "key_release" && $4 != "ok"' | wc -l)"
[ "$releases" -ge 3 ] || fail "expected at least 3 key releases (vm-a, vm-b, vm-c) in the history, found $releases"
[ "$refusals" -ge 2 ] || fail "expected at least 2 refusals (vm-b revoked, vm-c rw) in the history, found $refusals"
say "$releases key releases and $refusals refusals, each with its VM, host and code"

if [ "$SKYDD_LAB_MODE" = vagrant ]; then
  headline "a format-1 domain (encryption alone): vm-a opens it read-write through dm-crypt"
  created="$(dm dm-alice --json domain create --format 1 --meta department=radiology --vm vm-a:rw --size 64M)"
  plain_id="$(printf '%s\n' "$created" | sed -n 's/^  "id": "\(.*\)",*$/\1/p' | head -n 1)"
  [ -n "$plain_id" ] || fail "no domain id in: $created"
  attached="$(dm dm-alice --json attach "$plain_id" --vm vm-a --mode rw)"
  device="$(printf '%s\n' "$attached" | sed -n 's/^  "device": "\(.*\)",*$/\1/p' | head -n 1)"
  case "$device" in /dev/dm-*|/dev/mapper/*) ;; *) fail "vm-a's format-1 device $device is not a device-mapper device" ;; esac
  maps="$(crypt_mappings "$(host_of vm-a)")"
  case "$maps" in *KEY-*) fail "a dm-crypt table on $(host_of vm-a) is not keyring-backed: $maps" ;; esac
  printf '%s\n' "$maps" | grep -q "READ-WRITE" || fail "no read-write dm-crypt mapping on $(host_of vm-a): $maps"
  say "dm-crypt mapping (backend \"auto\" chose dm-crypt): $maps; its table names a logon key, never the key"
  on "$(host_of vm-a)" "printf '%s' '$RECORD' > /var/lib/skydd/vms/vm-a/$plain_id/record.txt && sync" || fail "vm-a cannot write"
  dm dm-alice detach "$plain_id" --vm vm-a >/dev/null
  [ -z "$(crypt_mappings "$(host_of vm-a)")" ] || fail "a dm-crypt mapping is left on $(host_of vm-a) after the detach"
  on "$(host_of vm-a)" "journalctl -u skydd-secure-component -o cat --no-pager | grep -q 'key wiped'" \
    || fail "the secure component on $(host_of vm-a) did not log a key wipe"
  say "$(host_of vm-a): vm-a wrote through dm-crypt; key wipe, mapping removed at detach"
fi

headline "cleaning up: detach vm-c"
dm dm-bob detach "$id" --vm vm-c >/dev/null
if [ "$SKYDD_LAB_MODE" = vagrant ]; then
  [ -z "$(crypt_mappings "$(host_of vm-c)")" ] || fail "a dm-crypt mapping is left on $(host_of vm-c) after the detach"
  say "no dm-crypt mapping left on $(host_of vm-c)"
fi
printf '\nthe story ran across the lab: domain %s\n' "$id"
