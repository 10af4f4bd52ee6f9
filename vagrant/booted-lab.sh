#!/usr/bin/env bash
# The three-node lab booted for real, on a machine of its own making: a network namespace
# holds libvirtd, virtlogd, every guest, swtpm, dnsmasq and the lab's networks (vagrant-libvirt's
# management network and 10.77.0.0/24), and a private mount namespace gives that libvirtd its
# own /etc/libvirt, /run/libvirt, /var/lib/libvirt, /var/log/libvirt and /var/lib/swtpm-localca
# (copies or empty directories under target/lab-booted/). Nothing outside loopback and that namespace is reachable from the lab;
# at the end every process in the namespace is stopped and the namespace and state removed.
#
#   bash vagrant/booted-lab.sh [all]    boxes (if missing), debs, namespace, lab.sh all, teardown
#   bash vagrant/booted-lab.sh boot     namespace, `vagrant up compute-1` only, teardown
#   bash vagrant/booted-lab.sh clean    teardown of a run that was interrupted
# Run as root. KEEP=1 leaves the namespace and guests up (clean later with `clean`).
# SKYDD_LAB_LIBVIRT_DRIVER=qemu (default: TCG emulation) or kvm.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
NS=skydd-lab
state="$root/target/lab-booted"
t0="${BOOTED_LAB_T0:-$(date +%s)}"
export BOOTED_LAB_T0="$t0"
stamp() { printf '[booted-lab %ss] %s\n' "$(( $(date +%s) - t0 ))" "$*"; }

# --- inside: the network namespace and a private mount namespace -----------------------
if [ "${1:-}" = --inside ]; then
  shift
  what="$1"
  mount --make-rprivate /
  for d in run lib log swtpm-localca; do install -d "$state/$d"; done
  # libvirtd's configuration too: the pool, networks and domains it defines stay in $state.
  cp -a /etc/libvirt "$state/etc"
  # On a machine where libvirtd never ran (no systemd: nothing made /run/libvirt) the mount
  # points may be missing; empty directories are all this leaves outside the namespace.
  install -d /run/libvirt /var/lib/libvirt /var/log/libvirt /var/lib/swtpm-localca
  mount --bind "$state/etc" /etc/libvirt
  mount -t tmpfs -o mode=0755 tmpfs /run/libvirt
  mount --bind "$state/lib" /var/lib/libvirt
  mount --bind "$state/log" /var/log/libvirt
  mount --bind "$state/swtpm-localca" /var/lib/swtpm-localca
  install -d -m 0711 /var/lib/libvirt/images /var/lib/libvirt/boot
  install -d -m 0751 -o libvirt-qemu -g libvirt-qemu /var/lib/libvirt/qemu
  chown tss:root /var/lib/swtpm-localca
  chmod 0750 /var/lib/swtpm-localca
  virtlogd -d
  libvirtd -d
  for _ in $(seq 1 100); do [ -S /run/libvirt/libvirt-sock ] && break; sleep 0.1; done
  [ -S /run/libvirt/libvirt-sock ] || { echo "libvirtd did not open its socket" >&2; exit 1; }
  virsh -q pool-define-as default dir --target /var/lib/libvirt/images >/dev/null
  virsh -q pool-start default >/dev/null
  stamp "libvirtd $(libvirtd --version | awk '{print $NF}') up in namespace $NS (driver $SKYDD_LAB_LIBVIRT_DRIVER)"
  cd "$here"
  case "$what" in
    boot)
      mkdir -p .lab/volumes
      vagrant up compute-1 --no-provision
      stamp "compute-1 booted and answers ssh"
      vagrant ssh compute-1 -c 'uname -r; systemctl is-system-running; ls -l /dev/tpmrm0; sudo dmsetup version' -- -q
      ;;
    all)
      # The nodes boot side by side (the compute hosts' setup waits for the controller's PKI).
      SKYDD_LAB_PARALLEL=1 bash "$here/lab.sh" all
      stamp "the story ran across the booted lab"
      ;;
  esac
  [ -n "${KEEP:-}" ] || vagrant destroy -f
  exit 0
fi

[ "$(id -u)" -eq 0 ] || { echo "booted-lab: run as root (network namespace, mounts)" >&2; exit 1; }

# Every process of the run lives in the namespace: stop them by id, then remove it.
teardown() {
  local pids=() p args
  if ip netns list | grep -qE "^$NS( |$)"; then
    read -r -a pids < <(ip netns pids "$NS" | tr '\n' ' ') || true
  fi
  # virtiofsd sandboxes itself in namespaces of its own, so it is not among the namespace's
  # pids: the ones serving this lab's folders are found by their source directory.
  for p in /proc/[0-9]*; do
    args="$({ tr '\0' ' ' < "$p/cmdline"; } 2>/dev/null)" || continue
    case "$args" in */virtiofsd\ *"source=$here/"*) pids+=("${p#/proc/}") ;; esac
  done
  if [ "${#pids[@]}" -gt 0 ]; then
    kill -TERM "${pids[@]}" 2>/dev/null || true
    for _ in $(seq 1 75); do
      for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && break; p=""; done
      [ -z "$p" ] && break
      sleep 0.2
    done
    kill -KILL "${pids[@]}" 2>/dev/null || true
  fi
  ip netns list | grep -qE "^$NS( |$)" && ip netns del "$NS"
  rm -rf "$state" "$here/.vagrant" "$here/.lab/pki" "$here/.lab/hosts" "$here/.lab/ready" \
    "$here/.lab/volumes" "$here/.lab/tpm-vendor-ca" "$here/.lab/custodians"
}

case "${1:-all}" in
  clean) teardown; stamp "cleaned"; exit 0 ;;
  all|boot) ;;
  *) echo "usage: $0 [all|boot|clean]" >&2; exit 2 ;;
esac
what="${1:-all}"
for tool in vagrant libvirtd virtlogd virsh dnsmasq swtpm qemu-system-x86_64; do
  command -v "$tool" >/dev/null || { echo "booted-lab: $tool missing (scripts/install-deps.sh)" >&2; exit 1; }
done
[ -f /usr/share/ovmf/OVMF.fd ] || { echo "booted-lab: /usr/share/ovmf/OVMF.fd missing (apt-get install ovmf)" >&2; exit 1; }
vagrant plugin list | grep -q vagrant-libvirt || { echo "booted-lab: vagrant-libvirt missing" >&2; exit 1; }
# /dev/kvm can exist and still not run a guest (on the CI machines a nested guest's kernel
# stalls right after decompression), so emulation is the default; SKYDD_LAB_LIBVIRT_DRIVER=kvm
# where hardware virtualization works.
SKYDD_LAB_LIBVIRT_DRIVER="${SKYDD_LAB_LIBVIRT_DRIVER:-qemu}"
export SKYDD_LAB_LIBVIRT_DRIVER
teardown
on_exit() {
  local rc=$?
  [ -n "${KEEP:-}" ] || teardown
  stamp "done (exit $rc)"
  exit "$rc"
}
trap on_exit EXIT

# Boxes and packages are made outside the namespace (mmdebstrap fetches Debian packages).
for box in controller compute-host; do
  if ! vagrant box list | grep -q "^skydd/$box "; then
    [ "$what" = boot ] && [ "$box" = controller ] && continue
    stamp "building box skydd/$box"
    bash "$here/build-boxes.sh" "$box"
  fi
done
[ "$what" = boot ] || [ -n "$(ls "$here/.lab/debs"/*.deb 2>/dev/null)" ] || bash "$here/lab.sh" debs
stamp "boxes and debs ready"

ip netns add "$NS"
ip -n "$NS" link set lo up
# vagrant's progress bars are carriage-return updates: one line each, the bars dropped.
ip netns exec "$NS" unshare --mount --propagation private bash "$0" --inside "$what" 2>&1 \
  | stdbuf -o0 tr '\r' '\n' | grep --line-buffered -v 'Progress: [0-9]*%'
