#!/usr/bin/env bash
# Its settings are used by the scripts that source it; StateDirectory= lists space-separated names.
# shellcheck disable=SC2034,SC2013
# Shared by the lab's provisioning scripts (sourced, not run).
#
# SKYDD_LAB_MODE selects what the scripts may do:
#   vagrant  (default) a booted VM of the lab: systemd starts the services, the TPM is
#            /dev/tpmrm0 (libvirt's swtpm), nodes reach each other on the private network.
#   chroot   a Debian 12 chroot sharing the network namespace of the machine that runs it
#            (scripts/lab-check.sh, tests/vagrant_lab.rs): no systemd, so a service is run
#            directly with the ExecStart= and User= of its installed unit; nodes reach each
#            other on loopback; the TPM is an swtpm given by SKYDD_LAB_TCTI.
#
# LAB is the directory every node shares (the synced folder /vagrant/.lab): the .debs, the
# PKI handed out by the controller, what compute hosts report for the attestation policy.

set -euo pipefail

SKYDD_LAB_MODE="${SKYDD_LAB_MODE:-vagrant}"
LAB="${SKYDD_LAB_DIR:-/vagrant/.lab}"
# name=address of every node, for /etc/hosts (certificates carry the names).
LAB_NODES="${SKYDD_LAB_NODES:-controller=10.77.0.10 compute-1=10.77.0.11 compute-2=10.77.0.12}"
TTP_PORT="${SKYDD_LAB_TTP_PORT:-7443}"
CP_PORT="${SKYDD_LAB_CP_PORT:-7500}"
# VMs of the demo and the host each runs on.
LAB_VMS="${SKYDD_LAB_VMS:-vm-a=compute-1 vm-b=compute-2 vm-c=compute-2}"
LAB_MANAGERS="${SKYDD_LAB_MANAGERS:-dm-alice dm-bob}"

case "$SKYDD_LAB_MODE" in
  vagrant|chroot) ;;
  *) echo "SKYDD_LAB_MODE must be vagrant or chroot, not $SKYDD_LAB_MODE" >&2; exit 2 ;;
esac

log() { printf '[%s %s] %s\n' "$(hostname_of_node)" "$(date +%H:%M:%S)" "$*"; }
die() { log "FAILED: $*" >&2; exit 1; }

# The node this script provisions (the hostname in a VM, SKYDD_LAB_NODE in a chroot).
hostname_of_node() { printf '%s' "${SKYDD_LAB_NODE:-$(hostname)}"; }

node_address() {
  local want="$1" pair
  for pair in $LAB_NODES; do
    if [ "${pair%%=*}" = "$want" ]; then printf '%s' "${pair#*=}"; return 0; fi
  done
  die "no address for node $want in SKYDD_LAB_NODES"
}

# The port the secure component of a compute host listens on (distinct per host in a chroot
# run, where all hosts share one loopback).
sc_port_of() {
  case "$1" in
    compute-1) printf '%s' "${SKYDD_LAB_SC_PORT_1:-7600}" ;;
    compute-2) printf '%s' "${SKYDD_LAB_SC_PORT_2:-7600}" ;;
    *) printf '7600' ;;
  esac
}

write_hosts() {
  local pair name addr
  # Replace the lab's block, keep the rest of /etc/hosts.
  touch /etc/hosts
  sed -i '/# skydd-lab begin/,/# skydd-lab end/d' /etc/hosts
  {
    echo "# skydd-lab begin"
    for pair in $LAB_NODES; do
      name="${pair%%=*}"; addr="${pair#*=}"
      echo "$addr $name"
    done
    echo "# skydd-lab end"
  } >> /etc/hosts
}

# Installs the lab's .debs with dpkg: their dependencies must already be in the box (the
# image pipeline's profile), nothing is downloaded.
install_debs() {
  local debs=() name f
  for name in "$@"; do
    f="$(find "$LAB/debs" -maxdepth 1 -name "${name}_*.deb" | sort | tail -n 1)"
    [ -n "$f" ] || die "$LAB/debs has no ${name}_*.deb (build them with: cargo deb -p ...; see README)"
    debs+=("$f")
  done
  log "installing ${debs[*]##*/}"
  DEBIAN_FRONTEND=noninteractive dpkg -i "${debs[@]}" \
    || die "dpkg -i failed: are the packages' dependencies all in the box?"
}

# Starts (or restarts) a service: systemd in a VM; in a chroot the unit's own ExecStart=
# and User=, in the background, logging to /var/log/skydd-lab/UNIT.log.
service_restart() {
  local unit="$1" file exec user pidfile
  if [ "$SKYDD_LAB_MODE" = vagrant ]; then
    systemctl daemon-reload
    systemctl enable "$unit"
    systemctl restart "$unit"
    return 0
  fi
  file="/usr/lib/systemd/system/$unit.service"
  [ -f "$file" ] || die "$file is not installed"
  exec="$(sed -n 's/^ExecStart=//p' "$file" | head -n 1)"
  user="$(sed -n 's/^User=//p' "$file" | head -n 1)"
  [ -n "$exec" ] || die "$file has no ExecStart="
  mkdir -p /var/log/skydd-lab /run/skydd-lab
  pidfile="/run/skydd-lab/$unit.pid"
  service_stop "$unit"
  # StateDirectory= of the unit: created and owned as systemd would.
  local dir
  for dir in $(sed -n "s/^StateDirectory=//p" "$file"); do # space-separated names
    install -d -m 0700 "/var/lib/$dir"
    [ -z "$user" ] || chown "$user:$user" "/var/lib/$dir"
  done
  log "starting $unit (chroot mode: ${user:-root}: $exec)"
  # shellcheck disable=SC2086 # ExecStart= is split into words, as systemd does
  if [ -n "$user" ]; then
    setsid runuser -u "$user" -- $exec >"/var/log/skydd-lab/$unit.log" 2>&1 < /dev/null &
  else
    setsid $exec >"/var/log/skydd-lab/$unit.log" 2>&1 < /dev/null &
  fi
  echo $! > "$pidfile"
}

service_stop() {
  local unit="$1" pidfile="/run/skydd-lab/$1.pid" pid
  if [ "$SKYDD_LAB_MODE" = vagrant ]; then
    systemctl stop "$unit" || true
    return 0
  fi
  [ -f "$pidfile" ] || return 0
  pid="$(cat "$pidfile")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

# Waits until a TLS port answers (bounded).
wait_port() {
  local host="$1" port="$2" what="$3"
  for _ in $(seq 1 150); do
    if (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then return 0; fi
    sleep 0.2
  done
  die "$what did not open $host:$port within 30 s"
}

# Waits until a file exists (another node publishes it through the shared folder).
wait_file() {
  local path="$1" what="$2" secs="${3:-600}"
  for _ in $(seq 1 "$((secs * 5))"); do
    [ -e "$path" ] && return 0
    sleep 0.2
  done
  die "waited ${secs}s for $what ($path)"
}

# Installs the PKI files of party NAME from the shared folder into /etc/skydd/tls as
# BASE.pem / BASE-key.pem, the key readable by GROUP only.
install_identity() {
  local name="$1" base="$2" group="$3"
  local src="$LAB/pki/$name"
  wait_file "$src/$name.pem" "the controller to issue $name's certificate"
  install -d -m 0750 -g "$group" /etc/skydd/tls
  install -m 0644 "$LAB/pki/ca.pem" /etc/skydd/tls/ca.pem
  install -m 0644 "$LAB/pki/crl.pem" /etc/skydd/tls/crl.pem
  install -m 0644 "$src/$name.pem" "/etc/skydd/tls/$base.pem"
  install -m 0640 -g "$group" "$src/$name-key.pem" "/etc/skydd/tls/$base-key.pem"
}
