#!/usr/bin/env bash
# Builds a vagrant-libvirt box from an image-pipeline profile and adds it as skydd/ROLE.
#   bash vagrant/build-boxes.sh controller|compute-host
# (as root, or with sudo). Only the finished box is kept (vagrant's copy); the intermediate
# images are removed (they are GBs).
# The image is the pipeline's (raw + signed provenance). Vagrant needs one thing the
# profiles do not give: a `vagrant` login with the key vagrant uses. That access layer is
# added to a copy of the image (user, authorized key, as_root rule) and recorded next to the
# provenance in the box; the pipeline's own image and record stay untouched.
set -euo pipefail
# as_root CMD...: CMD as root (directly when this already runs as root).
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo -E "$@"; fi; }
role="${1:?usage: build-boxes.sh controller|compute-host}"
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
out="$here/.lab/boxes/$role"
rm -rf "$out"
mkdir -p "$out"
pipeline="$root/target/release/image-pipeline"
[ -x "$pipeline" ] || (cd "$root" && cargo build --release -p image-pipeline --bin image-pipeline)

# The pipeline signs its provenance as the cloud-platform party "image-pipeline". Without an
# operator's signing identity (IMAGE_PIPELINE_SIGNING_KEY/_CERT/IMAGE_PIPELINE_CA), the lab
# makes its own box-signing CA once, in .lab/box-ca.
if [ -z "${IMAGE_PIPELINE_SIGNING_KEY:-}" ]; then
  ca="$here/.lab/box-ca"
  if [ ! -f "$ca/image-pipeline/image-pipeline.pem" ]; then
    cp_bin="$root/target/release/cloud-platform"
    [ -x "$cp_bin" ] || cp_bin="$root/target/debug/cloud-platform"
    [ -x "$cp_bin" ] || { (cd "$root" && cargo build -p cloud-platform --bin cloud-platform); cp_bin="$root/target/debug/cloud-platform"; }
    rm -rf "$ca"
    "$cp_bin" ca init --dir "$ca" --name "Skydd lab box-signing CA" >/dev/null
    "$cp_bin" ca issue --dir "$ca" --role cloud-platform --name image-pipeline --out "$ca/image-pipeline" >/dev/null
  fi
  export IMAGE_PIPELINE_SIGNING_KEY="$ca/image-pipeline/image-pipeline-key.pem"
  export IMAGE_PIPELINE_SIGNING_CERT="$ca/image-pipeline/image-pipeline.pem"
  export IMAGE_PIPELINE_CA="$ca/ca.pem" IMAGE_PIPELINE_CRL="$ca/crl.pem"
fi
as_root "$pipeline" build --profile "$root/image-pipeline/profiles/$role.toml" --out "$out/build" --no-store \
  --apt-cache "${IMAGE_PIPELINE_APT_CACHE:-$root/target/lab-cache/apt}"
as_root "$pipeline" verify "$out/build"

# The access layer, on the raw image once its hash is recorded (the provenance keeps the
# pipeline's hashes; no second copy of a GB image).
image_sha="$(sha256sum "$out/build/image.raw" | cut -d' ' -f1)"
mv "$out/build/image.raw" "$out/box.raw"
rm -f "$out/build/image.qcow2"
pub="$(find /usr/share/rubygems-integration /usr/lib/ruby /opt/vagrant -name vagrant.pub 2>/dev/null | head -n 1 || true)"
[ -n "$pub" ] || { echo "vagrant's insecure public key (keys/vagrant.pub) not found" >&2; exit 1; }
# The root file system is the last partition of the pipeline's GPT image; a loop device at its
# offset (partition scanning needs udev, which containers often lack).
read -r start sectors < <(partx -g -o START,SECTORS "$out/box.raw" | tail -n 1)
loop="$(as_root losetup --find --show --offset $((start * 512)) --sizelimit $((sectors * 512)) "$out/box.raw")"
mnt="$(mktemp -d)"
cleanup() { as_root umount "$mnt" 2>/dev/null || true; as_root losetup -d "$loop" 2>/dev/null || true; rmdir "$mnt" 2>/dev/null || true; }
trap cleanup EXIT
as_root mount "$loop" "$mnt"
as_root chroot "$mnt" useradd --create-home --shell /bin/bash vagrant
as_root install -d -m 0700 -o 1000 -g 1000 "$mnt/home/vagrant/.ssh"
as_root install -m 0600 -o 1000 -g 1000 "$pub" "$mnt/home/vagrant/.ssh/authorized_keys"
# The first NIC is vagrant-libvirt's management network: DHCP there. Vagrant writes its own
# 50-vagrant-*.network for the private network, which sorts (and so matches) first.
printf '[Match]\nName=en* eth*\n\n[Network]\nDHCP=ipv4\n' | as_root tee "$mnt/etc/systemd/network/99-vagrant-dhcp.network" >/dev/null
echo 'vagrant ALL=(ALL) NOPASSWD:ALL' | as_root tee "$mnt/etc/sudoers.d/vagrant" >/dev/null
as_root chmod 0440 "$mnt/etc/sudoers.d/vagrant"
cleanup
trap - EXIT
{
  echo "box skydd/$role from image-pipeline profile $role"
  echo "pipeline image: $image_sha"
  echo "added: user vagrant (uid 1000) with vagrant's insecure public key, /etc/sudoers.d/vagrant,"
  echo "  /etc/systemd/network/99-vagrant-dhcp.network (DHCP on the management NIC)"
  echo "box image: $(sha256sum "$out/box.raw" | cut -d' ' -f1)"
} > "$out/ACCESS-LAYER.txt"

qemu-img convert -O qcow2 "$out/box.raw" "$out/box.img"
rm -f "$out/box.raw"
size_gb=$(( ($(qemu-img info --output=json "$out/box.img" | sed -n 's/.*"virtual-size": \([0-9]*\).*/\1/p') + (1 << 30) - 1) >> 30 ))
printf '{"provider":"libvirt","format":"qcow2","virtual_size":%d}\n' "$size_gb" > "$out/metadata.json"
cat > "$out/Vagrantfile" <<'RUBY'
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |libvirt|
    libvirt.driver = "kvm"
  end
end
RUBY
cp "$out/build/provenance.dsse.json" "$out/provenance.dsse.json"
tar -C "$out" -cf "$out.box" metadata.json Vagrantfile box.img provenance.dsse.json ACCESS-LAYER.txt
vagrant box add --force --name "skydd/$role" "$out.box"
rm -rf "$out" "$out.box"
echo "added box skydd/$role"
