#!/usr/bin/env bash
# The controller: the cloud CA, the TTP and the cloud platform (and, in the lab, the
# hospital admin's domain-manager CLI).
# Usage: controller.sh setup      install, CA, every party's certificate, K_TTP, start CP+TTP
#        controller.sh policy     attestation policy from what compute hosts reported; restart TTP
#        controller.sh register   register the compute hosts and VMs with the cloud platform;
#                                 write the domain managers' configurations
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$here/lib.sh"

phase="${1:-setup}"
CA_DIR=/etc/skydd/ca
ME="$(hostname_of_node)"
MY_ADDR="$(node_address "$ME")"
TTP_URL="https://$ME:$TTP_PORT"
CP_URL="https://$ME:$CP_PORT"

issue() { # ROLE NAME [SAN...]
  local role="$1" name="$2" san args=()
  shift 2
  for san in "$@"; do args+=(--san "$san"); done
  if [ -f "$LAB/pki/$name/$name.pem" ]; then return 0; fi
  install -d -m 0755 "$LAB/pki/$name"
  cloud-platform ca issue --dir "$CA_DIR" --role "$role" --name "$name" --out "$LAB/pki/$name" "${args[@]}" >/dev/null
  log "issued $role certificate $name ${*:+(SANs $*)}"
}

setup() {
  install_debs skydd-ttp skydd-cloud-platform skydd-domain-manager
  if [ ! -f "$CA_DIR/ca.pem" ]; then
    cloud-platform ca init --dir "$CA_DIR" --name "Skydd lab CA" >/dev/null
    log "created the cloud CA in $CA_DIR (ca-key.pem stays on this node)"
  fi
  # A CA made before revocation lists existed gets its first (empty) list here.
  [ -f "$CA_DIR/crl.pem" ] || cloud-platform ca crl --dir "$CA_DIR" >/dev/null
  install -d -m 0755 "$LAB/pki"
  install -m 0644 "$CA_DIR/ca.pem" "$LAB/pki/ca.pem"
  install -m 0644 "$CA_DIR/crl.pem" "$LAB/pki/crl.pem"
  issue ttp ttp "$ME" "$MY_ADDR"
  issue cloud-platform cloud-platform "$ME" "$MY_ADDR"
  local pair vm host
  for pair in $LAB_NODES; do
    case "${pair%%=*}" in
      compute-*) issue secure-component "${pair%%=*}" "${pair#*=}" ;;
    esac
  done
  for m in $LAB_MANAGERS; do issue domain-manager "$m"; done

  install_identity ttp ttp skydd-ttp
  install_identity cloud-platform cloud-platform skydd-cp
  chmod 0755 /etc/skydd/tls

  # K_TTP: created once, by the service user, never replaced; sealed to the controller's TPM
  # (/dev/tpmrm0, or the chroot lab's swtpm: [master_key] of ttp.toml) and split 2 of 3.
  if [ -n "${SKYDD_LAB_TCTI:-}" ] && [ "$SKYDD_LAB_TCTI" != none ]; then
    sed -i "s|^tpm_tcti = .*|tpm_tcti = \"$SKYDD_LAB_TCTI\"|" /etc/skydd/ttp.toml
  fi
  # The lab keeps the shares in $LAB/custodians; a real cloud hands each to its own custodian (docs/OPERATOR.md).
  if [ ! -d /var/lib/skydd-ttp/master-key ]; then
    install -d -m 0700 -o skydd-ttp -g skydd-ttp /var/lib/skydd-ttp
    install -d -m 0700 -o skydd-ttp -g skydd-ttp /var/lib/skydd-ttp-ceremony
    runuser -u skydd-ttp -- ttp init --config /etc/skydd/ttp.toml --shares 3 --threshold 2 \
      --share-dir /var/lib/skydd-ttp-ceremony >/dev/null
    install -d -m 0700 "$LAB/custodians"
    mv /var/lib/skydd-ttp-ceremony/* "$LAB/custodians/" && rmdir /var/lib/skydd-ttp-ceremony
    log "created K_TTP sealed to the controller's TPM; custodians' shares in $LAB/custodians"
  fi
  sed -i "s|^listen = .*|listen = \"0.0.0.0:$TTP_PORT\"|" /etc/skydd/ttp.toml
  sed -i -e "s|^listen = .*|listen = \"0.0.0.0:$CP_PORT\"|" -e "s|^ttp_url = .*|ttp_url = \"$TTP_URL\"|" /etc/skydd/cloud-platform.toml

  # Volumes live on storage the compute hosts mount at the same path (the synced folder
  # .lab/volumes in the lab).
  install -d -m 0750 -o skydd-cp -g skydd-cp /var/lib/skydd-cp
  install -d -m 0750 -o skydd-cp -g skydd-cp /var/lib/skydd-cp/volumes
  chown skydd-cp:skydd-cp /var/lib/skydd-cp/volumes

  service_restart skydd-cloud-platform
  wait_port 127.0.0.1 "$CP_PORT" "the cloud platform"
  log "controller setup done: CA, certificates in $LAB/pki, cloud platform on $CP_URL"
}

policy() {
  local out=/etc/skydd/attestation.toml tmp roots=() f n=0
  tmp="$(mktemp)"
  for f in "$LAB"/tpm-vendor-ca/*.pem; do [ -f "$f" ] && roots+=("$f"); done
  [ "${#roots[@]}" -gt 0 ] || die "$LAB/tpm-vendor-ca holds no TPM vendor CA (.pem): copy swtpm_localca's certificates there (vagrant/lab.sh does)"
  {
    echo "# Written by vagrant/provision/controller.sh policy: TPM vendor CAs from $LAB/tpm-vendor-ca,"
    echo "# reference states reported by the compute hosts in $LAB/hosts/*/reference.toml."
    echo "trusted_ek_roots = ["
    for f in "${roots[@]}"; do printf '"""%s""",\n' "$(cat "$f")"; done
    echo "]"
    for f in "$LAB"/hosts/*/reference.toml; do
      [ -f "$f" ] || continue
      echo
      cat "$f"
      n=$((n + 1))
    done
  } > "$tmp"
  [ "$n" -gt 0 ] || die "no compute host has reported its PCRs in $LAB/hosts/*/reference.toml yet"
  install -m 0644 "$tmp" "$out"
  rm -f "$tmp"
  log "attestation policy: ${#roots[@]} TPM vendor CA certificate(s), $n reference state(s)"
  service_restart skydd-ttp
  wait_port 127.0.0.1 "$TTP_PORT" "the TTP"
  install -d "$LAB/ready"
  date -u +%FT%TZ > "$LAB/ready/ttp-policy"
  log "TTP serving on $TTP_URL"
}

# An operator call to the cloud platform with its own certificate (role cloud-platform).
cp_post() {
  local path="$1" body="$2"
  curl -sS --fail-with-body --cacert /etc/skydd/tls/ca.pem \
    --cert /etc/skydd/tls/cloud-platform.pem --key /etc/skydd/tls/cloud-platform-key.pem \
    -H 'content-type: application/json' -d "$body" "$CP_URL$path" >/dev/null
}

register() {
  local pair host vm
  for pair in $LAB_NODES; do
    host="${pair%%=*}"
    case "$host" in compute-*) ;; *) continue ;; esac
    wait_file "$LAB/ready/$host-enrolled" "$host to enroll with the TTP"
    cp_post /v1/hosts "{\"id\":\"$host\",\"agent_url\":\"https://$host:$(sc_port_of "$host")\"}"
    log "registered compute host $host"
  done
  for pair in $LAB_VMS; do
    vm="${pair%%=*}"; host="${pair#*=}"
    cp_post /v1/instances "{\"id\":\"$vm\",\"host\":\"$host\"}"
    log "registered $vm on $host"
  done
  local m dir
  for m in $LAB_MANAGERS; do
    dir="/root/.config/skydd"
    install -d -m 0700 "$dir"
    install -m 0644 "$LAB/pki/$m/$m.pem" "$dir/$m.pem"
    install -m 0600 "$LAB/pki/$m/$m-key.pem" "$dir/$m-key.pem"
    cat > "$dir/$m.toml" <<TOML
cloud_platform_url = "$CP_URL"
ttp_url = "$TTP_URL"
ca = ["/etc/skydd/tls/ca.pem"]
crl = ["/etc/skydd/tls/crl.pem"]
cert = "$dir/$m.pem"
key = "$dir/$m-key.pem"
TOML
    log "domain manager $m: $dir/$m.toml"
  done
}

case "$phase" in
  setup) setup ;;
  policy) policy ;;
  register) register ;;
  *) die "unknown phase $phase (setup, policy, register)" ;;
esac
