#!/usr/bin/env bash
# Builds a vagrant-libvirt box from an image-pipeline profile and adds it as skydd/ROLE.
#   bash vagrant/build-boxes.sh controller|compute-host
# The image is the pipeline's (raw + signed provenance). Vagrant needs one thing the
# profiles do not give: a `vagrant` login with the key vagrant uses. That access layer is
# added to a copy of the image (user, authorized key, sudo rule) and recorded next to the
# provenance in the box; the pipeline's own image and record stay untouched.
set -euo pipefail
role="${1:?usage: build-boxes.sh controller|compute-host}"
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
out="$here/.lab/boxes/$role"
rm -rf "$out"
mkdir -p "$out"
pipeline="$root/target/release/image-pipeline"
[ -x "$pipeline" ] || (cd "$root" && cargo build --release -p image-pipeline --bin image-pipeline)

sudo "$pipeline" build --profile "$root/image-pipeline/profiles/$role.toml" --out "$out/build" --no-store
sudo "$pipeline" verify "$out/build"

# The access layer, on a copy of the raw image.
cp --sparse=always "$out/build/image.raw" "$out/box.raw"
pub="$(find /usr/share/rubygems-integration /usr/lib/ruby /opt/vagrant -name 'vagrant.pub' 2>/dev/null | head -n 1)"
[ -n "$pub" ] || { echo "vagrant's insecure public key (keys/vagrant.pub) not found" >&2; exit 1; }
loop="$(sudo losetup --find --show --partscan "$out/box.raw")"
mnt="$(mktemp -d)"
cleanup() { sudo umount "$mnt" 2>/dev/null || true; sudo losetup -d "$loop" 2>/dev/null || true; rmdir "$mnt" 2>/dev/null || true; }
trap cleanup EXIT
# The root file system is the last partition of the pipeline's GPT image.
part="$(lsblk -lnpo NAME "$loop" | tail -n 1)"
sudo mount "$part" "$mnt"
sudo chroot "$mnt" useradd --create-home --shell /bin/bash vagrant
sudo install -d -m 0700 -o 1000 -g 1000 "$mnt/home/vagrant/.ssh"
sudo install -m 0600 -o 1000 -g 1000 "$pub" "$mnt/home/vagrant/.ssh/authorized_keys"
echo 'vagrant ALL=(ALL) NOPASSWD:ALL' | sudo tee "$mnt/etc/sudoers.d/vagrant" >/dev/null
sudo chmod 0440 "$mnt/etc/sudoers.d/vagrant"
cleanup
trap - EXIT
{
  echo "box skydd/$role from image-pipeline profile $role"
  echo "pipeline image: $(sha256sum "$out/build/image.raw" | cut -d' ' -f1)"
  echo "added: user vagrant (uid 1000) with vagrant's insecure public key, /etc/sudoers.d/vagrant"
  echo "box image: $(sha256sum "$out/box.raw" | cut -d' ' -f1)"
} > "$out/ACCESS-LAYER.txt"

qemu-img convert -O qcow2 "$out/box.raw" "$out/box.img"
size_gb=$(( ($(stat -c %s "$out/box.raw") + (1 << 30) - 1) >> 30 ))
printf '{"provider":"libvirt","format":"qcow2","virtual_size":%d}\n' "$size_gb" > "$out/metadata.json"
cat > "$out/Vagrantfile" <<'RUBY'
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |libvirt|
    libvirt.driver = "kvm"
  end
end
RUBY
cp "$out/build/provenance.dsse.json" "$out/provenance.dsse.json"
tar -C "$out" -czf "$out.box" metadata.json Vagrantfile box.img provenance.dsse.json ACCESS-LAYER.txt
vagrant box add --force --name "skydd/$role" "$out.box"
echo "added box skydd/$role from $out.box"
