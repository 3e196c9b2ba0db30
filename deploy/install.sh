#!/usr/bin/env bash
# Install nixwarden on a Debian machine and start it on the default store.
#
#   sudo deploy/install.sh [--no-start]
#
# As root this:
#   1. installs the Debian packages the daemon and its users need (python3-venv,
#      libseccomp2, and nix-bin for the Nix clients — without Debian's own
#      nix-daemon units, which are stopped, disabled and masked if present);
#   2. creates the virtual environment $NIXWARDEN_VENV (default
#      /opt/nixwarden/venv) with /usr/bin/python3, installs nixwarden from this
#      repository into it (not editable) and links /usr/local/bin/nixwarden;
#   3. creates the `nixbld` group and build users nixbld1..N (N =
#      $NIXWARDEN_BUILD_USERS, default 32) where missing, as Nix's installer
#      does, and the unprivileged worker account `nixwarden`;
#   4. installs /etc/nix/nix.conf from deploy/nix.conf unless one exists;
#   5. starts the daemon on /nix/store (socket /nix/var/nix/daemon-socket/socket):
#      with systemd as init, through deploy/nixwarden.socket/.service
#      (socket activation); otherwise (containers, CI) as a background
#      process logging to /var/log/nixwarden.log, its pid in /run/nixwarden.pid.
#
# Running it again is fine: packages and accounts are left as they are, the
# venv is upgraded, and a daemon started by an earlier run is replaced (the
# systemd service is restarted; a background daemon is stopped by its recorded
# pid and started again).  --no-start (or NIXWARDEN_NO_START=1) does steps
# 1-4 only, as the container image does.
#
# NIXWARDEN_ROOT=R (for trying it out and for tests) serves the chroot store
# `local?root=R` instead: configuration in R/etc/nix, socket
# R/nix/var/nix/daemon-socket/socket, log R/var/log/nixwarden.log, pid file
# R/run/nixwarden.pid, always as a background process.  Sourcing this file
# defines the functions without running anything.
set -euo pipefail
umask 022

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${NIXWARDEN_VENV:-/opt/nixwarden/venv}
bin_link=/usr/local/bin/nixwarden
build_users=${NIXWARDEN_BUILD_USERS:-32}
worker_user=nixwarden
root=${NIXWARDEN_ROOT:-}
root=${root%/}
nixwarden_bin=${NIXWARDEN_BIN:-$bin_link}
start_timeout=${NIXWARDEN_START_TIMEOUT:-30}
packages=(python3 python3-venv libseccomp2 nix-bin ca-certificates passwd
          util-linux procps)

conf_dir=${root:+$root/etc/nix}
conf_dir=${conf_dir:-/etc/nix}
state_dir=$root/nix/var/nix
socket_path=$state_dir/daemon-socket/socket
log_file=$root/var/log/nixwarden.log
pid_file=$root/run/nixwarden.pid

say() { echo "install.sh: $*" >&2; }
die() { say "error: $*"; exit 1; }

# The daemon's command line: the default store, or the chroot store under $root.
daemon_args() {
    if [ -n "$root" ]; then
        printf '%s\n' daemon --store "local?root=$root"
    else
        printf '%s\n' daemon
    fi
}

# The environment a client needs (printed at the end).
client_remote() {
    if [ -n "$root" ]; then
        echo "unix://$socket_path"
    else
        echo daemon
    fi
}

systemd_is_init() {
    [ -z "$root" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null
}

# --- 1. packages ---------------------------------------------------------------

install_packages() {
    local missing=() p
    for p in "${packages[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        say "installing ${missing[*]}"
        apt-get update -qq
        # No recommends: nix-bin recommends nix-setup-systemd, which would enable
        # Debian's nix-daemon on the same socket.
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
    fi
}

# Debian's nix-setup-systemd enables nix-daemon.socket/.service on the socket
# nixwarden serves; two daemons must not fight over it.
disable_debian_nix_daemon() {
    command -v systemctl >/dev/null || return 0
    local unit
    for unit in nix-daemon.socket nix-daemon.service; do
        [ -e "/lib/systemd/system/$unit" ] || [ -e "/usr/lib/systemd/system/$unit" ] \
            || [ -e "/etc/systemd/system/$unit" ] || continue
        [ -L "/etc/systemd/system/$unit" ] \
            && [ "$(readlink "/etc/systemd/system/$unit")" = /dev/null ] && continue
        say "disabling and masking Debian's $unit"
        if systemd_is_init; then
            systemctl disable --now "$unit" >/dev/null 2>&1 || true
        else
            systemctl disable "$unit" >/dev/null 2>&1 || true
        fi
        systemctl mask "$unit" >/dev/null 2>&1 \
            || ln -sfn /dev/null "/etc/systemd/system/$unit"
    done
}

# --- 2. the virtual environment ---------------------------------------------------

install_venv() {
    if [ ! -x "$venv/bin/python" ]; then
        say "creating $venv"
        mkdir -p "$(dirname "$venv")"
        /usr/bin/python3 -m venv "$venv"
    fi
    say "installing nixwarden from $repo into $venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check \
        --root-user-action=ignore --upgrade "$repo" \
        || die "pip could not install nixwarden into $venv"
    "$venv/bin/python" -c "import nixwarden.supervisor.__main__" \
        || die "nixwarden did not install into $venv"
    # The worker zygote runs the venv's interpreter as the worker account.
    chmod -R a+rX "$venv"
    mkdir -p "$(dirname "$bin_link")"
    ln -sfn "$venv/bin/nixwarden" "$bin_link"
}

# --- 3. accounts --------------------------------------------------------------------

nologin_shell() {
    command -v nologin 2>/dev/null || echo /usr/sbin/nologin
}

create_accounts() {
    local shell n
    shell=$(nologin_shell)
    if ! getent group nixbld >/dev/null; then
        say "creating the group nixbld"
        groupadd --system nixbld
    fi
    for n in $(seq 1 "$build_users"); do
        getent passwd "nixbld$n" >/dev/null && continue
        useradd --system --comment "Nix build user $n" --home-dir /var/empty \
            --no-create-home --gid nixbld --groups nixbld --no-user-group \
            --shell "$shell" "nixbld$n"
    done
    if ! getent passwd "$worker_user" >/dev/null; then
        say "creating the worker account $worker_user"
        useradd --system --no-create-home --home-dir /nonexistent \
            --shell "$shell" --user-group "$worker_user"
    fi
}

# --- 4. configuration -----------------------------------------------------------------

install_nix_conf() {
    mkdir -p "$conf_dir"
    if [ -e "$conf_dir/nix.conf" ]; then
        say "keeping the existing $conf_dir/nix.conf"
    else
        say "installing $conf_dir/nix.conf"
        install -m 0644 "$repo/deploy/nix.conf" "$conf_dir/nix.conf"
    fi
    # The socket's directory must exist for nixwarden.socket's condition.
    mkdir -p "$root/nix/store" "$state_dir/daemon-socket"
}

# --- 5. starting the daemon -------------------------------------------------------------

# True if a process answers on the socket.
socket_answers() {
    [ -S "$1" ] || return 1
    "$venv/bin/python" - "$1" <<'EOF' 2>/dev/null
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(2)
s.connect(sys.argv[1])
EOF
}

# The pid recorded by an earlier run, if that process is still a nixwarden.
recorded_pid() {
    local pid
    [ -f "$pid_file" ] || return 1
    pid=$(cat "$pid_file")
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    [ -r "/proc/$pid/cmdline" ] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q nixwarden || return 1
    echo "$pid"
}

# Stop a background daemon started by an earlier run (by its recorded pid only).
stop_recorded_daemon() {
    local pid i
    if pid=$(recorded_pid); then
        say "stopping the nixwarden daemon started earlier (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for i in $(seq 1 150); do
            [ -d "/proc/$pid" ] || break
            # A zombie is gone for our purposes.
            [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" = Z ] && break
            sleep 0.1
        done
        if [ -d "/proc/$pid" ] && [ "$i" -ge 150 ]; then
            say "pid $pid did not stop; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$pid_file"
}

wait_for_socket() {
    local pid=${1:-} deadline=$((SECONDS + start_timeout))
    while [ $SECONDS -lt "$deadline" ]; do
        [ -S "$socket_path" ] && return 0
        if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
            break
        fi
        sleep 0.1
    done
    return 1
}

start_background() {
    local pid args
    stop_recorded_daemon
    if socket_answers "$socket_path"; then
        die "another daemon is serving $socket_path (not one this script started); stop it first"
    fi
    rm -f "$socket_path"   # stale: nobody answers on it
    mkdir -p "$(dirname "$log_file")" "$(dirname "$pid_file")"
    mapfile -t args < <(daemon_args)
    say "starting $nixwarden_bin ${args[*]} (log: $log_file)"
    # setsid: not in this shell's session, so the terminal's signals miss it.
    if [ -n "$root" ]; then
        NIX_CONF_DIR=$conf_dir setsid nohup "$nixwarden_bin" "${args[@]}" \
            >>"$log_file" 2>&1 </dev/null &
    else
        setsid nohup "$nixwarden_bin" "${args[@]}" >>"$log_file" 2>&1 </dev/null &
    fi
    pid=$!
    echo "$pid" >"$pid_file"
    if ! wait_for_socket "$pid"; then
        tail -n 20 "$log_file" >&2 || true
        die "the daemon (pid $pid) did not create $socket_path within ${start_timeout}s"
    fi
    say "nixwarden (pid $pid) is listening on $socket_path"
}

start_systemd() {
    stop_recorded_daemon
    say "installing nixwarden.socket and nixwarden.service into /etc/systemd/system"
    install -m 0644 "$repo/deploy/nixwarden.socket" "$repo/deploy/nixwarden.service" \
        /etc/systemd/system/
    systemctl daemon-reload
    systemctl enable --now nixwarden.socket
    # A re-run picks up the new code and units.
    systemctl try-restart nixwarden.service
    wait_for_socket || die "nixwarden.socket did not create $socket_path (systemctl status nixwarden.socket)"
    say "nixwarden.socket is listening on $socket_path"
}

start_daemon() {
    if systemd_is_init; then
        start_systemd
    else
        start_background
    fi
}

print_usage() {
    local remote
    remote=$(client_remote)
    cat <<EOF

nixwarden is serving the store ${root:+under $root }on $socket_path.
Nix clients use it with NIX_REMOTE=$remote, for example:

    NIX_REMOTE=$remote nix --extra-experimental-features nix-command store ping
    NIX_REMOTE=$remote nix-store --query --requisites <store path>

EOF
    if systemd_is_init; then
        echo "Logs: journalctl -u nixwarden.service    Stop: systemctl stop nixwarden.socket nixwarden.service"
    else
        echo "Logs: $log_file    Stop: kill \$(cat $pid_file)"
    fi
}

main() {
    local no_start=${NIXWARDEN_NO_START:-}
    while [ $# -gt 0 ]; do
        case $1 in
            --no-start) no_start=1 ;;
            -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; return 0 ;;
            *) die "unknown argument '$1' (usage: deploy/install.sh [--no-start])" ;;
        esac
        shift
    done
    [ "$(id -u)" = 0 ] || die "run me as root (sudo deploy/install.sh)"
    command -v apt-get >/dev/null || die "this script is for Debian (apt-get not found)"
    install_packages
    disable_debian_nix_daemon
    install_venv
    create_accounts
    install_nix_conf
    if [ -n "$no_start" ]; then
        say "installed; not starting the daemon (--no-start)"
        return 0
    fi
    start_daemon
    if command -v nix >/dev/null && ! NIX_REMOTE=$(client_remote) \
            nix --extra-experimental-features nix-command store ping >/dev/null 2>&1; then
        say "warning: 'nix store ping' through the daemon failed"
    fi
    print_usage
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    main "$@"
fi
