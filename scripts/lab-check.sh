#!/usr/bin/env bash
# Checks of the three-node lab (vagrant/, packaging/), for CI on machines without KVM:
#   1. shellcheck over every provisioning script, maintainer script and this one;
#   2. `vagrant validate` of vagrant/Vagrantfile (provider settings checked against libvirt's
#      in-process test driver), `ruby -c` as well;
#   3. the systemd units' exposure (systemd-analyze security --offline) under a threshold;
#   4. the provisioning scripts run for real: vagrant/chroot-lab.sh provisions a controller
#      and two compute hosts as Debian 12 chroots from the .debs (swtpm TPMs, loopback),
#      enrolls both hosts with the TTP and runs the demo's story across them.
# Exits non-zero on any finding. LAB_CHECK_SKIP_CHROOT=1 skips step 4.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
t0=$(date +%s)
stamp() { printf '[lab-check %ss] %s\n' "$(( $(date +%s) - t0 ))" "$*"; }
need() { command -v "$1" >/dev/null || { echo "lab-check: $1 is missing (apt-get install $2)" >&2; exit 1; }; }
need shellcheck shellcheck
need vagrant "vagrant vagrant-libvirt"
need ruby ruby
need systemd-analyze systemd

stamp "shellcheck"
shellcheck -x vagrant/provision/*.sh vagrant/*.sh scripts/lab-check.sh packaging/debian/*/postinst packaging/debian/*/postrm

stamp "vagrant validate"
ruby -c vagrant/Vagrantfile >/dev/null
mkdir -p vagrant/.lab/volumes
(cd vagrant && SKYDD_LAB_LIBVIRT_URI=test:///default vagrant validate)

stamp "systemd units: exposure"
check_exposure() { # UNIT-PATH THRESHOLD (exposure x 10, as systemd-analyze takes it)
  local out
  out="$(systemd-analyze security --offline=true --threshold="$2" "$1" 2>&1)" || {
    printf '%s\n' "$out" | tail -n 25 >&2
    echo "lab-check: $1 is more exposed than $2/10" >&2
    return 1
  }
  printf '  %s\n' "$(printf '%s\n' "$out" | grep 'Overall exposure')"
}
check_exposure packaging/systemd/skydd-ttp.service 20
check_exposure packaging/systemd/skydd-cloud-platform.service 20
check_exposure packaging/systemd/skydd-secure-component.service 40
dropin="$(mktemp -d)"
cp packaging/systemd/skydd-secure-component.service "$dropin/"
mkdir "$dropin/skydd-secure-component.service.d"
cp packaging/systemd/local-driver.conf "$dropin/skydd-secure-component.service.d/"
check_exposure "$dropin/skydd-secure-component.service" 50
rm -rf "$dropin"

if [ "${LAB_CHECK_SKIP_CHROOT:-0}" != 1 ]; then
  stamp "provisioning in chroots (vagrant/chroot-lab.sh)"
  bash vagrant/chroot-lab.sh
fi
stamp "lab checks passed"
