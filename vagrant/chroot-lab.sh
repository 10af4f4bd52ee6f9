#!/usr/bin/env bash
# Runs the lab's provisioning scripts for real without KVM: each node is a Debian 12 chroot
# (mmdebstrap, cached in target/lab-cache/bookworm-HASH/; one overlay per node), all nodes share this
# machine's network namespace and reach each other on loopback, each compute host gets an
# swtpm TPM 2.0 whose EK certificate is signed by swtpm_localca (as libvirt's swtpm backend
# does). The scripts run in SKYDD_LAB_MODE=chroot: services are started from their installed
# units' ExecStart=/User= instead of systemd. Then the demo's story runs across the chroots.
#
#   sudo bash vagrant/chroot-lab.sh [--compute-only]
#
# --compute-only stops after the first compute host is enrolled with the TTP.
# What a chroot cannot show: systemd itself, libvirt, the private network, dm-crypt on
# kernels without device-mapper (the secure component's "auto" backend then uses its
# userspace engine).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
cache="$root/target/lab-cache"
# The packages a box holds that the scripts need; the cached tree is named by their hash.
base_packages="tpm2-tools,libtss2-tcti-device0,libtss2-tcti-swtpm0,e2fsprogs,adduser,openssl,curl,ca-certificates,procps,systemd,util-linux,mount"
base="$cache/bookworm-$(printf '%s' "$base_packages" | sha256sum | cut -c1-12)"
compute_only=false
[ "${1:-}" = --compute-only ] && compute_only=true

TTP_PORT=17443 CP_PORT=17500 SC1_PORT=17601 SC2_PORT=17602 TPM1_PORT=17621 TPM2_PORT=17623 TPMC_PORT=17625
NODES="controller compute-1 compute-2"
$compute_only && NODES="controller compute-1"
t_start=$(date +%s)
elapsed() { echo "$(( $(date +%s) - t_start ))s"; }
say() { printf '[chroot-lab %s] %s\n' "$(elapsed)" "$*"; }

[ "$(id -u)" -eq 0 ] || { echo "run as root (chroot, mounts)" >&2; exit 1; }
for tool in mmdebstrap swtpm swtpm_setup swtpm_localca cargo-deb; do
  command -v "$tool" >/dev/null || { echo "$tool missing: apt-get install mmdebstrap swtpm swtpm-tools; cargo install cargo-deb" >&2; exit 1; }
done
for port in $TTP_PORT $CP_PORT $SC1_PORT $SC2_PORT $TPM1_PORT $((TPM1_PORT + 1)) $TPM2_PORT $((TPM2_PORT + 1)) $TPMC_PORT $((TPMC_PORT + 1)); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then echo "port $port is in use" >&2; exit 1; fi
done

work="$(mktemp -d /tmp/skydd-chroot-lab.XXXXXX)"
lab="$work/lab"
mkdir -p "$lab/debs" "$lab/volumes" "$lab/tpm-vendor-ca"
swtpm_pids=()

cleanup() {
  local rc=$? n r pid
  set +e
  for n in $NODES; do
    r="$work/$n/root"
    for pid in "$r"/run/skydd-lab/*.pid; do
      [ -f "$pid" ] && kill -TERM "$(cat "$pid")" 2>/dev/null
    done
  done
  sleep 2
  for n in $NODES; do
    r="$work/$n/root"
    for pid in "$r"/run/skydd-lab/*.pid; do
      [ -f "$pid" ] && kill -KILL "$(cat "$pid")" 2>/dev/null
    done
  done
  for pid in "${swtpm_pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  if [ "$rc" -ne 0 ]; then
    say "FAILED (exit $rc); service logs:"
    for n in $NODES; do tail -n 20 "$work/$n/root"/var/log/skydd-lab/*.log 2>/dev/null | sed "s/^/  $n: /"; done
  fi
  # Every mount below $work, deepest first (also the local driver's VM mounts).
  awk -v w="$work" '$2 ~ "^"w {print $2}' /proc/mounts | sort -r | while read -r m; do umount -l "$m"; done
  [ -n "${KEEP:-}" ] && { say "kept $work"; exit "$rc"; }
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT

# 1. The packages, as the boxes get them.
say "building the .debs (cargo deb --no-build)"
(cd "$root" && cargo build --release -q -p ttp -p cloud-platform -p secure-component -p domain-manager --bins)
deb_pids=()
for p in ttp cloud-platform secure-component domain-manager; do
  (cd "$root" && cargo deb --no-build --fast -p "$p" -o "$lab/debs/" >/dev/null 2>&1) &
  deb_pids+=("$!")
done
for pid in "${deb_pids[@]}"; do wait "$pid"; done
say "debs: $(cd "$lab/debs" && echo *.deb)"

# 2. The Debian 12 base of every node: a directory tree, the read-only lower layer of each
#    node's overlay (never written to).
if [ ! -d "$base" ]; then
  say "mmdebstrap bookworm into $base (once; cached)"
  mkdir -p "$cache"
  rm -rf "$base.tmp"
  mmdebstrap --quiet --variant=minbase --include="$base_packages" bookworm "$base.tmp" http://deb.debian.org/debian
  mv "$base.tmp" "$base"
fi

# 3. One overlay root per node, with what a VM of the lab would have mounted.
for n in $NODES; do
  r="$work/$n/root"
  mkdir -p "$work/$n/upper" "$work/$n/ovl" "$r"
  mount -t overlay overlay -o "lowerdir=$base,upperdir=$work/$n/upper,workdir=$work/$n/ovl" "$r"
  # Private before anything is bound in: an rbind of a shared /dev would otherwise stay a peer
  # of the host's, and unmounting it could unmount the host's /dev/pts.
  mount --make-rprivate "$r"
  mount -t proc proc "$r/proc"
  mount --rbind /sys "$r/sys"
  mount --rbind /dev "$r/dev"
  mount -t tmpfs tmpfs "$r/run"
  mkdir -p "$r/vagrant/.lab" "$r/vagrant/provision" "$r/var/lib/skydd-cp/volumes"
  mount --bind "$lab" "$r/vagrant/.lab"
  mount --bind "$here/provision" "$r/vagrant/provision"
  mount -o remount,bind,ro "$r/vagrant/provision"
  mount --bind "$lab/volumes" "$r/var/lib/skydd-cp/volumes"
  # Make the node's mounts (the local driver's VM directories) private to this run.
  mount --make-rprivate "$r"
done

# 4. A TPM per compute host, manufactured like libvirt's swtpm backend does it.
make_tpm() { # NAME PORT
  local d="$work/tpm-$1" ca="$work/swtpm-localca"
  mkdir -p "$d/state" "$ca"
  printf 'statedir = %s\nsigningkey = %s/signkey.pem\nissuercert = %s/issuercert.pem\ncertserial = %s/certserial\n' "$ca" "$ca" "$ca" "$ca" > "$d/localca.conf"
  printf -- '--platform-manufacturer Skydd\n--platform-version 2.1\n--platform-model swtpm\n' > "$d/localca.options"
  printf 'create_certs_tool = /usr/bin/swtpm_localca\ncreate_certs_tool_config = %s\ncreate_certs_tool_options = %s\nactive_pcr_banks = sha256\n' "$d/localca.conf" "$d/localca.options" > "$d/setup.conf"
  swtpm_setup --tpm2 --tpmstate "$d/state" --create-ek-cert --create-platform-cert --pcr-banks sha256 \
    --config "$d/setup.conf" --overwrite --logfile "$d/setup.log" >/dev/null
  swtpm socket --tpm2 --tpmstate "dir=$d/state" --server "type=tcp,port=$2,bindaddr=127.0.0.1" \
    --ctrl "type=tcp,port=$(($2 + 1)),bindaddr=127.0.0.1" --flags not-need-init,startup-clear \
    --log "file=$d/swtpm.log,level=1" &
  swtpm_pids+=("$!")
}
make_tpm compute-1 "$TPM1_PORT"
$compute_only || make_tpm compute-2 "$TPM2_PORT"
# The controller's TPM holds K_TTP's sealed copy (docs/OPERATOR.md).
make_tpm controller "$TPMC_PORT"
# What lab.sh copies from the KVM host's /var/lib/swtpm-localca.
cp "$work/swtpm-localca/swtpm-localca-rootca-cert.pem" "$work/swtpm-localca/issuercert.pem" "$lab/tpm-vendor-ca/"
say "swtpm TPMs up; the EK CA is in the shared folder"

node_list="controller=127.0.0.1 compute-1=127.0.0.1"
$compute_only || node_list="$node_list compute-2=127.0.0.1"
vms="vm-a=compute-1 vm-b=compute-2 vm-c=compute-2"
$compute_only && vms="vm-a=compute-1"
# run NODE TCTI SCRIPT ARGS...: a provisioning script inside NODE's chroot, clean environment.
run() {
  local n="$1" tcti="$2"
  shift 2
  chroot "$work/$n/root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
    SKYDD_LAB_MODE=chroot SKYDD_LAB_NODE="$n" SKYDD_LAB_NODES="$node_list" SKYDD_LAB_VMS="$vms" \
    SKYDD_LAB_TTP_PORT=$TTP_PORT SKYDD_LAB_CP_PORT=$CP_PORT \
    SKYDD_LAB_SC_PORT_1=$SC1_PORT SKYDD_LAB_SC_PORT_2=$SC2_PORT SKYDD_LAB_TCTI="$tcti" \
    bash "/vagrant/provision/$1" "${@:2}"
}
tcti_of() { case "$1" in compute-1) echo "swtpm:host=127.0.0.1,port=$TPM1_PORT" ;; compute-2) echo "swtpm:host=127.0.0.1,port=$TPM2_PORT" ;; controller) echo "swtpm:host=127.0.0.1,port=$TPMC_PORT" ;; *) echo none ;; esac; }

computes="${NODES#controller }"
for n in $NODES; do run "$n" "$(tcti_of "$n")" common.sh; done
run controller "$(tcti_of controller)" controller.sh setup
for n in $computes; do run "$n" "$(tcti_of "$n")" compute.sh setup; done
run controller "$(tcti_of controller)" controller.sh policy
for n in $computes; do run "$n" "$(tcti_of "$n")" compute.sh enroll; done
run controller "$(tcti_of controller)" controller.sh register
say "provisioned: $NODES"

# The installed units, checked where their binaries exist.
for n in $NODES; do
  for u in "$work/$n/root"/usr/lib/systemd/system/skydd-*.service; do
    chroot "$work/$n/root" systemd-analyze verify --man=no "/usr/lib/systemd/system/${u##*/}" \
      || { say "systemd-analyze verify ${u##*/} failed on $n"; exit 1; }
  done
done
say "systemd-analyze verify: the installed units are clean"

if $compute_only; then
  say "compute-only: compute-1 is enrolled with the TTP; done"
  exit 0
fi
SKYDD_LAB_MODE=chroot SKYDD_LAB_VMS="$vms" \
  SKYDD_LAB_CHROOTS="controller=$work/controller/root compute-1=$work/compute-1/root compute-2=$work/compute-2/root" \
  bash "$here/provision/demo.sh"
say "the lab's story ran across three chroots"
