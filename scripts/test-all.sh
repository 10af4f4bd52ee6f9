#!/usr/bin/env bash
# Installs what is missing, then passes the quality gate (format, clippy, rustdoc, cargo-deny:
# any finding stops the run here, before the slow suites), then runs every test of the
# workspace (unit tests, the cross-party tests with real swtpm instances, the volume tests,
# dm-crypt in a qemu VM), then the lab checks (shellcheck, vagrant validate, the provisioning
# scripts in Debian chroots), the booted three-node lab (vagrant-libvirt, TCG) and a short bounded run of every fuzz target on its corpus.
set -euo pipefail
cd "$(dirname "$0")/.."

# A clean run writes about NEEDED_GIB to this disk (measured: docs/PERFORMANCE.md, "CI
# footprint"; plus ~3 GiB for the booted lab's boxes and guest disks). Refuse at the start, in words, rather than 20 minutes in with ENOSPC.
NEEDED_GIB="${SKYDD_TEST_NEEDED_GIB:-17}"
free_gib() { df -P -BG . | awk 'NR==2 {sub("G", "", $4); print $4}'; }
disk_report() {
  local used=""
  for dir in target fuzz/target; do
    [ -d "$dir" ] && used+=" $dir $(du -sh "$dir" 2>/dev/null | cut -f1);"
  done
  echo "disk after $1: $(free_gib) GiB free;${used:- nothing built yet}"
}
if [ "$(free_gib)" -lt "$NEEDED_GIB" ] && [ ! -d target/release ]; then
  echo "test-all: only $(free_gib) GiB free on $(df -P . | awk 'NR==2 {print $6}'); a clean run" \
       "needs about $NEEDED_GIB GiB (build trees target/ and fuzz/target/, VM images, core dumps)." \
       "Free some space, or set SKYDD_TEST_NEEDED_GIB to run anyway." >&2
  exit 1
fi
disk_report "start"

bash scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"

# The gate: needs no root and no device, takes a few minutes, fails the run on any finding.
gate_step() {
  local started=$SECONDS
  echo "gate: $*"
  if ! "$@"; then
    echo "gate: FAILED: $* (fix the findings above; nothing else was run)" >&2
    exit 1
  fi
  echo "gate: passed in $((SECONDS - started)) s: $1 $2"
}
gate_step cargo fmt --all --check
gate_step cargo clippy --workspace --all-targets --locked -- -D warnings
gate_step env RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked
gate_step cargo deny --locked check licenses bans sources
disk_report "gate"

# The OpenStack clients tests/openstack_cli.rs drives (docs/OPENSTACK.md), from PyPI into a
# virtualenv under target/ (python3-venv comes with install-deps.sh). The versions are the ones
# docs/OPENSTACK.md lists as tested; the test fails, saying so, without them.
OPENSTACK_VENV="$PWD/target/openstack-venv"
OPENSTACK_CLIENTS=(python-openstackclient==10.5.0 python-cinderclient==9.10.0 openstacksdk==4.22.0
                   keystoneauth1==5.18.1 osc-lib==4.7.0)
openstack_clients_installed() {
  local frozen spec
  frozen=$("$OPENSTACK_VENV/bin/python" -m pip freeze 2>/dev/null) || return 1
  for spec in "${OPENSTACK_CLIENTS[@]}"; do grep -qixF "$spec" <<<"$frozen" || return 1; done
  "$OPENSTACK_VENV/bin/openstack" --version >/dev/null 2>&1
}
if ! openstack_clients_installed; then
  echo "test-all: installing the OpenStack clients into $OPENSTACK_VENV"
  rm -rf "$OPENSTACK_VENV"
  python3 -m venv "$OPENSTACK_VENV"
  if ! "$OPENSTACK_VENV/bin/pip" install --quiet --disable-pip-version-check "${OPENSTACK_CLIENTS[@]}"; then
    echo "test-all: pip could not install ${OPENSTACK_CLIENTS[*]} from PyPI (network?);" \
         "tests/openstack_cli.rs needs them" >&2
    exit 1
  fi
fi
export SKYDD_OPENSTACK_VENV="$OPENSTACK_VENV"

status=0
cargo test --workspace --release --no-fail-fast -- --test-threads=2 --nocapture || status=$?
# The TTP's service tests once more on PostgreSQL (its store races ran on both engines above;
# one server per test binary, started and stopped by testkit::postgres): ~30 s.
SKYDD_TTP_TEST_STORE=postgres cargo test --release -p ttp --lib --no-fail-fast -- --test-threads=2 service:: || status=$?
# The cloud platform's API tests once more with its state on PostgreSQL: ~25 s.
SKYDD_CP_TEST_STORE=postgres cargo test --release -p cloud-platform --test api --no-fail-fast -- --test-threads=2 || status=$?
disk_report "workspace tests"
bash scripts/lab-check.sh || status=$?
disk_report "lab checks"
# The lab booted for real: three vagrant-libvirt guests under TCG in a network namespace of
# their own, dm-crypt on the compute hosts (README, "Booted, without KVM"). SKYDD_SKIP_BOOTED_LAB=1
# skips it.
if [ "${SKYDD_SKIP_BOOTED_LAB:-0}" != 1 ]; then
  bash vagrant/booted-lab.sh || status=$?
  disk_report "booted lab"
fi
bash scripts/fuzz.sh 15 || status=$?
disk_report "fuzzing"
exit "$status"
