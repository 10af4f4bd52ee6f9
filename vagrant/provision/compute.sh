#!/usr/bin/env bash
# A compute host: the secure component, its certificate and configuration, the host's
# measured state reported for the attestation policy, enrollment with the TTP.
# Usage: compute.sh setup    install, certificate, configuration, report PCRs + EK certificate
#        compute.sh enroll   enroll the TPM with the TTP (after `controller.sh policy`), serve
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"

phase="${1:-setup}"
ME="$(hostname_of_node)"
CONTROLLER="${SKYDD_LAB_CONTROLLER:-controller}"
TCTI="${SKYDD_LAB_TCTI:-device:/dev/tpmrm0}"
# "auto": dm-crypt where the kernel has device-mapper (the lab's VMs, Debian's kernel; the demo
# checks that it was chosen there), else the userspace engine (a chroot on a machine without).
BACKEND="${SKYDD_LAB_BACKEND:-auto}"
# Never 16 or 23 (resettable by any process; the TTP refuses them).
PCRS="0,1,2,3,4,5,6,7,11"
CONFIG=/etc/skydd/secure-component.toml

setup() {
  install_debs skydd-secure-component
  install_identity "$ME" secure-component root
  cat > "$CONFIG" <<TOML
# Written by vagrant/provision/compute.sh for the lab (see secure-component(8)).
listen = "0.0.0.0:$(sc_port_of "$ME")"
tcti = "$TCTI"
state_dir = "/var/lib/skydd-sc"
vm_root = "/var/lib/skydd/vms"
backend = "$BACKEND"
# The lab's "VMs" are directories on the host: the local driver mounts each attached volume
# under vm_root/<vm>/<domain>.
hypervisor = "local"
ttp_url = "https://$CONTROLLER:$TTP_PORT"
ca = ["/etc/skydd/tls/ca.pem"]
crl = ["/etc/skydd/tls/crl.pem"]
cert = "/etc/skydd/tls/secure-component.pem"
key = "/etc/skydd/tls/secure-component-key.pem"

[pcr_selection]
bank = "sha256"
indices = [${PCRS//,/, }]
TOML
  # The local driver's mounts must be visible on the host: no private mount namespace.
  install -d /etc/systemd/system/skydd-secure-component.service.d
  install -m 0644 /usr/share/skydd/secure-component/local-driver.conf \
    /etc/systemd/system/skydd-secure-component.service.d/local-driver.conf
  # Volumes: the controller's storage, mounted at the path the cloud platform sends.
  [ -d /var/lib/skydd-cp/volumes ] || die "/var/lib/skydd-cp/volumes (the controller's volume storage) is not mounted"

  report
  log "compute setup done ($BACKEND backend, TPM $TCTI)"
}

# Publishes this host's PCR values as a reference state, and its EK certificate, for the
# controller's attestation policy. In the lab the approved state is the state the host boots
# in; in production the values come from the approved image (the image pipeline) instead.
report() {
  local dir="$LAB/hosts/$ME" bin i hex idx=() line
  install -d "$dir"
  bin="$(mktemp)"
  tpm2_pcrread -T "$TCTI" "sha256:$PCRS" -o "$bin" >/dev/null || die "tpm2_pcrread over $TCTI failed"
  IFS=, read -r -a idx <<< "$PCRS"
  [ "$(stat -c %s "$bin")" -eq $((32 * ${#idx[@]})) ] || die "tpm2_pcrread returned $(stat -c %s "$bin") bytes for ${#idx[@]} PCRs"
  hex="$(od -An -v -tx1 "$bin" | tr -d ' \n')"
  rm -f "$bin"
  line=""
  for i in "${!idx[@]}"; do
    line+="[${idx[$i]}, \"${hex:$((i * 64)):64}\"], "
  done
  cat > "$dir/reference.toml.tmp" <<TOML
[[reference_states]]
name = "$ME-v1"
selection = { bank = "sha256", indices = [${PCRS//,/, }] }
pcr_values = [${line%, }]
TOML
  mv "$dir/reference.toml.tmp" "$dir/reference.toml"
  # The EK certificate (TCG NV index 0x01c00002), for the operator's records.
  tpm2_nvread -T "$TCTI" 0x01c00002 -o "$dir/ek-cert.der" >/dev/null 2>&1 || log "no RSA EK certificate in NV (the TTP will refuse enrollment)"
  log "reported PCRs sha256:$PCRS to $dir/reference.toml"
}

enroll() {
  wait_file "$LAB/ready/ttp-policy" "the controller's attestation policy (controller.sh policy)"
  wait_port "$CONTROLLER" "$TTP_PORT" "the TTP"
  secure-component enroll --config "$CONFIG" | sed "s/^/[$ME] /"
  service_restart skydd-secure-component
  wait_port 127.0.0.1 "$(sc_port_of "$ME")" "the secure component"
  install -d "$LAB/ready"
  date -u +%FT%TZ > "$LAB/ready/$ME-enrolled"
  log "enrolled and serving"
}

case "$phase" in
  setup) setup ;;
  enroll) enroll ;;
  report) report ;;
  *) die "unknown phase $phase (setup, enroll, report)" ;;
esac
