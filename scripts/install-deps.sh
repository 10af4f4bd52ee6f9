#!/usr/bin/env bash
# Installs what Skydd needs on a fresh Debian 12 machine (run as root): the TPM emulator
# and TSS libraries, FUSE, fio, qemu for the dm-crypt harness, and a Rust toolchain if none.
#
# What it may change on the machine (README, "What the two commands change"):
#  - installs the Debian packages below that are missing (apt-get install, no recommends);
#  - when one of them cannot be installed beside a package the image took from a source this
#    machine no longer lists (a backport newer than Debian 12, say qemu-utils 10.x beside
#    bookworm's qemu-system-x86 7.2), it moves THAT package to the Debian 12 version
#    (apt-get install --allow-downgrades pkg=version) and says so; nothing else is downgraded;
#  - installs rustup's toolchain only when no cargo is found, and cargo-deb with cargo.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
packages=(
  build-essential pkg-config libssl-dev libtss2-dev
  swtpm swtpm-tools tpm2-tools
  fuse3 libfuse3-dev e2fsprogs util-linux fio cryptsetup-bin
  qemu-system-x86 busybox-static kmod cpio
  sqlite3 postgresql openssl ca-certificates curl
  gdb
  mmdebstrap debian-archive-keyring gpgv tar qemu-utils openscap-scanner openscap-utils ssg-debian
  dosfstools mtools ovmf
  python3-venv
  shellcheck vagrant vagrant-libvirt ruby systemd
  libvirt-daemon-system dnsmasq-base iptables
)
if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: run as root (it installs Debian packages); as a user: sudo bash $0" >&2
  exit 1
fi

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

# An installed package whose version no configured source offers ("[installed,local]" in apt
# list), printed as pkg=<newest version the sources do offer>; nothing when the sources offer
# none (a vendor's own package: left alone).
archive_version_of_local() {
  local pkg=$1 have offered
  have=$(dpkg-query -W -f='${Version}' "$pkg" 2>/dev/null) || return 0
  offered=$(apt-cache madison "$pkg" 2>/dev/null | awk -F'|' '{gsub(/ /, "", $2); print $2}')
  [ -n "$offered" ] || return 0
  grep -qxF "$have" <<<"$offered" && return 0
  echo "$pkg=$(head -n1 <<<"$offered")"
}

# Installed packages built from the same source package as $@ (qemu-utils for qemu-system-x86):
# these must come from the same release or apt refuses ("Breaks: qemu-system-common ...").
installed_siblings() {
  local sources
  sources=$(apt-cache show --no-all-versions "$@" 2>/dev/null |
    awk '/^Package:/ {p=$2} /^Source:/ {print $2; s=1} /^$/ {if (!s && p) print p; s=0; p=""}' | sort -u)
  [ -n "$sources" ] || return 0
  dpkg-query -W -f='${Package} ${source:Package}\n' 2>/dev/null |
    awk 'NR==FNR {want[$1]=1; next} ($2 in want) {print $1}' <(echo "$sources") -
}

missing=()
for p in "${packages[@]}"; do installed "$p" || missing+=("$p"); done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing: ${missing[*]}"
  apt-get update
  if ! apt-get install -s -y --no-install-recommends "${missing[@]}" >/tmp/skydd-apt-sim.log 2>&1; then
    # Align only what blocks: first the siblings of what we install, then any local package
    # apt names in its refusal.
    align=()
    for p in $(installed_siblings "${missing[@]}") $(grep -oE '[a-z0-9][a-z0-9.+-]+' /tmp/skydd-apt-sim.log | sort -u); do
      installed "$p" || continue
      pin=$(archive_version_of_local "$p")
      [ -n "$pin" ] && align+=("$pin")
    done
    mapfile -t align < <(printf '%s\n' "${align[@]}" | sort -u | sed '/^$/d')
    if [ "${#align[@]}" -eq 0 ]; then
      cat /tmp/skydd-apt-sim.log >&2
      echo "install-deps: apt cannot install ${missing[*]} and no package from an unlisted source explains it (see above)" >&2
      exit 1
    fi
    echo "install-deps: these were installed from a source this machine does not list and block" \
         "the install; moving them to the version Debian 12 offers: ${align[*]}"
    missing+=("${align[@]}")
  fi
  apt-get install -y --no-install-recommends --allow-downgrades "${missing[@]}"
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
# rustfmt and clippy for the gate of scripts/test-all.sh (rustup installs them; a toolchain
# from elsewhere must bring its own).
if command -v rustup >/dev/null 2>&1; then
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
  rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
fi
# cargo-deb builds the Debian packages of the services (vagrant/ lab, scripts/lab-check.sh);
# cargo-deny checks licenses, bans and sources in the gate (deny.toml).
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked
command -v cargo-deny >/dev/null || cargo install cargo-deny --locked
