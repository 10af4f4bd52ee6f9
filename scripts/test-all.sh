#!/usr/bin/env bash
# Installs what is missing, then runs every test of the workspace (unit tests, the
# cross-party tests with real swtpm instances, the volume tests, dm-crypt in a qemu VM), then
# the lab checks (shellcheck, vagrant validate, the provisioning scripts in Debian chroots)
# and a short bounded run of every fuzz target on its committed corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo test --workspace --release --no-fail-fast -- --test-threads=2 --nocapture
bash scripts/lab-check.sh
bash scripts/fuzz.sh 15
