#!/usr/bin/env bash
# Brings the three-node lab up on a KVM-capable host, phase by phase, then runs the story.
#   bash vagrant/lab.sh            debs, boxes (if missing), up, policy, enroll, register, demo
#   bash vagrant/lab.sh debs       only build the .debs into vagrant/.lab/debs
#   bash vagrant/lab.sh demo       only the story (the lab is up)
#   bash vagrant/lab.sh destroy    vagrant destroy -f, and forget the lab's state
# Needs: vagrant, vagrant-libvirt, libvirt with swtpm, virtiofsd, cargo-deb; sudo for
# reading swtpm_localca's certificates.
set -euo pipefail
SUDO=sudo
[ "$(id -u)" -eq 0 ] && SUDO=""
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
lab="$here/.lab"
cd "$here"

debs() {
  mkdir -p "$lab/debs"
  (cd "$root" && cargo build --release -p ttp -p cloud-platform -p secure-component -p domain-manager -p image-pipeline --bins)
  local p
  for p in ttp cloud-platform secure-component domain-manager image-pipeline; do
    (cd "$root" && cargo deb --no-build --fast -p "$p" -o "$lab/debs/")
  done
}

boxes() {
  local box
  for box in controller compute-host; do
    if ! vagrant box list | grep -q "^skydd/$box "; then
      bash "$here/build-boxes.sh" "$box"
    fi
  done
}

vendor_ca() {
  # libvirt's swtpm_setup signs each TPM's EK certificate with swtpm_localca on this host.
  local dir=/var/lib/swtpm-localca
  mkdir -p "$lab/tpm-vendor-ca"
  # Read as root, written as the user running the lab.
  # shellcheck disable=SC2024
  $SUDO cat "$dir/swtpm-localca-rootca-cert.pem" > "$lab/tpm-vendor-ca/swtpm-localca-rootca-cert.pem"
  # shellcheck disable=SC2024
  $SUDO cat "$dir/issuercert.pem" > "$lab/tpm-vendor-ca/issuercert.pem"
}

up() {
  mkdir -p "$lab/volumes" "$lab/pki" "$lab/hosts" "$lab/ready"
  [ -n "$(ls "$lab/debs"/*.deb 2>/dev/null)" ] || debs
  boxes
  # In order by default; SKYDD_LAB_PARALLEL=1 boots all nodes at once (each compute host's
  # setup waits for the controller's certificates in the shared folder).
  if [ "${SKYDD_LAB_PARALLEL:-0}" = 1 ]; then vagrant up --parallel; else vagrant up --no-parallel; fi
  vendor_ca
  vagrant provision controller --provision-with policy
  vagrant provision compute-1 --provision-with enroll
  vagrant provision compute-2 --provision-with enroll
  vagrant provision controller --provision-with register
}

case "${1:-all}" in
  all) up; SKYDD_LAB_MODE=vagrant bash "$here/provision/demo.sh" ;;
  debs) debs ;;
  boxes) boxes ;;
  up) up ;;
  demo) SKYDD_LAB_MODE=vagrant bash "$here/provision/demo.sh" ;;
  destroy) vagrant destroy -f; rm -rf "$lab/pki" "$lab/hosts" "$lab/ready" "$lab/volumes" "$lab/tpm-vendor-ca" ;;
  *) echo "usage: $0 [all|debs|boxes|up|demo|destroy]" >&2; exit 2 ;;
esac
