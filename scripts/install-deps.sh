#!/usr/bin/env bash
# Installs what Skydd needs on a fresh Debian 12 machine (run as root): the TPM emulator
# and TSS libraries, FUSE, fio, qemu for the dm-crypt harness, and a Rust toolchain if none.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
packages=(
  build-essential pkg-config libssl-dev libtss2-dev
  swtpm swtpm-tools tpm2-tools
  fuse3 libfuse3-dev e2fsprogs util-linux fio
  qemu-system-x86 busybox-static kmod cpio
  sqlite3 openssl ca-certificates curl
  gdb
  mmdebstrap debian-archive-keyring gpgv tar qemu-utils openscap-scanner openscap-utils ssg-debian
  dosfstools mtools
  shellcheck vagrant vagrant-libvirt ruby systemd
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing: ${missing[*]}"
  apt-get update
  apt-get install -y --no-install-recommends "${missing[@]}"
fi
if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    echo "cargo is in $HOME/.cargo/bin: add it to PATH"
  else
    echo "no Rust toolchain: installing one with rustup"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
  fi
fi
export PATH="$HOME/.cargo/bin:$PATH"
# cargo-deb builds the Debian packages of the services (vagrant/ lab, scripts/lab-check.sh).
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked
