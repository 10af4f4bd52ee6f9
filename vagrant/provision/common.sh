#!/usr/bin/env bash
# Every node of the lab, first: names of the nodes in /etc/hosts, the shared folder, the
# tools the other scripts use. Installs nothing from the network.
# Usage: common.sh   (SKYDD_LAB_MODE=vagrant|chroot, see lib.sh)
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"

log "common: mode $SKYDD_LAB_MODE, shared folder $LAB"
[ "$(id -u)" -eq 0 ] || die "run as root"
[ -d "$LAB" ] || die "the shared folder $LAB is missing (the Vagrantfile syncs vagrant/.lab there)"
[ -d "$LAB/debs" ] || die "$LAB/debs is missing: build the packages first (vagrant/lab.sh debs)"
write_hosts
for tool in dpkg runuser setsid sed find install; do
  command -v "$tool" >/dev/null || die "$tool is missing from the box"
done
mkdir -p /etc/skydd
log "common: done"
