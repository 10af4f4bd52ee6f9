#!/usr/bin/env bash
# Installs what is missing, builds Skydd and runs the end-to-end demo on a loopback lab.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release -p skydd -p domain-manager -p ttp -p cloud-platform -p secure-component --bins
# The guests' image (image-pipeline's demo-vm profile): built once, then cached in
# target/guest-images. Not needed with --no-vms.
case " $* " in *" --no-vms "*) ;; *) ./target/release/skydd guest-image ;; esac
RUST_LOG=warn TSS2_LOG=all+none ./target/release/skydd demo "$@"
