#!/usr/bin/env bash
# Installs the edge hub or agent as a systemd service.
#
#   deploy/install.sh agent --broker mqtt[s]://HUB[:PORT] --join-token-file FILE [--name NODE] [--label k=v ...]
#   deploy/install.sh hub [--api-addr 0.0.0.0:7443] [--mqtt-addr 0.0.0.0:1883] [--advertise-url URL] [--broker URL]
#
#   --broker-ca PEM the CA that signs an mqtts:// broker's certificate (copied to /etc/edge/broker-ca.pem)
#   --binary PATH   the binary to install (default: target/release/edge-<role> of this repository)
#   --root DIR      install under DIR instead of / (image building, tests); nothing is started
#
# Lays out /usr/local/bin/edge-<role>, /etc/edge/<role>.env (0600) and
# /etc/systemd/system/edge-<role>.service, enables the service and, on a
# running systemd, starts it. Running it again updates those files; settings
# it is not given keep their earlier values. An agent's join token (from
# `edgectl token create`) is copied to /var/lib/edge-agent/join.token (0600);
# the agent deletes it once it has its own credential.
set -euo pipefail
die() { echo "install: $*" >&2; exit 1; }

role=${1:-}
case "$role" in
    agent|hub) shift ;;
    -h|--help|"") sed -n '2,16p' "$0"; exit 0 ;;
    *) die "the first argument is agent or hub, not '$role'" ;;
esac
here=$(cd "$(dirname "$0")" && pwd)
root=/ binary="" broker_ca="" token_file="" labels=()
declare -A set
while (($#)); do
    case "$1" in
        --root) root=$2; shift 2 ;;
        --binary) binary=$2; shift 2 ;;
        --broker) [[ $role == agent ]] && set[EDGE_AGENT_BROKER]=$2 || set[EDGE_HUB_BROKER]=$2; shift 2 ;;
        --broker-ca) broker_ca=$2; shift 2 ;;
        --join-token-file) [[ $role == agent ]] || die "--join-token-file is for agents"; token_file=$2; shift 2 ;;
        --join-token) die "--join-token puts the token on a command line (visible to every user): use --join-token-file" ;;
        --name) [[ $role == agent ]] || die "--name is for agents"; set[EDGE_AGENT_NAME]=$2; shift 2 ;;
        --label) [[ $role == agent ]] || die "--label is for agents"; labels+=("$2"); shift 2 ;;
        --api-addr) [[ $role == hub ]] || die "--api-addr is for the hub"; set[EDGE_HUB_API_ADDR]=$2; shift 2 ;;
        --mqtt-addr) [[ $role == hub ]] || die "--mqtt-addr is for the hub"; set[EDGE_HUB_MQTT_ADDR]=$2; shift 2 ;;
        --advertise-url) [[ $role == hub ]] || die "--advertise-url is for the hub"; set[EDGE_HUB_ADVERTISE_URL]=$2; shift 2 ;;
        *) die "unknown argument $1 (try --help)" ;;
    esac
done
if ((${#labels[@]})); then
    set[EDGE_AGENT_ARGS]=$(printf -- '--label %s ' "${labels[@]}")
fi
[[ -n $binary ]] || binary="$here/../target/release/edge-$role"
[[ -x $binary ]] || die "$binary is not an executable (build it: cargo build --release, or scripts/cross --release for ARM)"
token=""
if [[ -n $token_file ]]; then
    [[ -r $token_file ]] || die "--join-token-file $token_file cannot be read"
    token=$(tr -d '[:space:]' < "$token_file")
    [[ $token =~ ^EJ1\.[0-9a-fA-F]{32}\.[a-z0-9]{6,16}\.[A-Za-z0-9]{16,128}$ ]] \
        || die "--join-token-file $token_file does not hold a join token (EJ1.<32 hex>.<id>.<secret>, from \`edgectl token create\`)"
    set[EDGE_JOIN_TOKEN_FILE]=/var/lib/edge-agent/join.token
fi
for k in EDGE_AGENT_BROKER EDGE_HUB_BROKER; do
    [[ -z ${set[$k]:-} || ${set[$k]} =~ ^mqtts?:// ]] || die "--broker must be mqtt://HOST[:PORT] or mqtts://HOST[:PORT], not '${set[$k]}'"
done
if [[ -n $broker_ca ]]; then
    grep -q -- '-----BEGIN CERTIFICATE-----' "$broker_ca" 2>/dev/null || die "--broker-ca $broker_ca is not a PEM certificate file"
    [[ $role == agent ]] && set[EDGE_AGENT_BROKER_CA]=/etc/edge/broker-ca.pem || set[EDGE_HUB_BROKER_CA]=/etc/edge/broker-ca.pem
fi

etc="$root/etc/edge"
env_file="$etc/$role.env"
unit_dir="$root/etc/systemd/system"
install -d -m 0755 "$root/usr/local/bin" "$unit_dir" "$unit_dir/multi-user.target.wants"
# 0755: the hub's service user reads the CA here; the env files stay 0600.
install -d -m 0755 "$etc"

# Settings: earlier values, then what was given now.
declare -A env
if [[ -f $env_file ]]; then
    while IFS='=' read -r k v; do
        [[ $k =~ ^[A-Z_]+$ ]] && env[$k]=$v
    done < "$env_file"
fi
for k in "${!set[@]}"; do env[$k]=${set[$k]}; done
if [[ $role == agent ]]; then
    [[ -n ${env[EDGE_AGENT_BROKER]:-} ]] || die "--broker is required (the hub's MQTT address, mqtt://HUB:1883)"
    [[ -n ${env[EDGE_JOIN_TOKEN_FILE]:-} ]] || die "--join-token-file is required on the first install"
    # An older install kept the token itself in the env file.
    unset 'env[EDGE_JOIN_TOKEN]'
fi
if [[ -n $token ]]; then
    install -d -m 0700 "$root/var/lib/edge-agent"
    tmp=$(mktemp "$root/var/lib/edge-agent/.join.token.XXXXXX")
    echo "$token" > "$tmp"
    chmod 0600 "$tmp"
    mv "$tmp" "$root/var/lib/edge-agent/join.token"
fi
if [[ -n $broker_ca ]]; then
    install -m 0644 "$broker_ca" "$etc/.broker-ca.pem.new"
    mv "$etc/.broker-ca.pem.new" "$etc/broker-ca.pem"
fi
tmp=$(mktemp "$etc/.$role.env.XXXXXX")
{
    echo "# Written by deploy/install.sh; edit, then: systemctl restart edge-$role"
    for k in $(printf '%s\n' "${!env[@]}" | sort); do echo "$k=${env[$k]}"; done
} > "$tmp"
chmod 0600 "$tmp"
mv "$tmp" "$env_file"

install -m 0755 "$binary" "$root/usr/local/bin/edge-$role.new"
mv "$root/usr/local/bin/edge-$role.new" "$root/usr/local/bin/edge-$role"
install -m 0644 "$here/systemd/edge-$role.service" "$unit_dir/edge-$role.service"
ln -sfn "/etc/systemd/system/edge-$role.service" "$unit_dir/multi-user.target.wants/edge-$role.service"

if [[ $root == / ]] && [[ -d /run/systemd/system ]]; then
    systemctl daemon-reload
    systemctl enable "edge-$role.service" >/dev/null
    systemctl restart "edge-$role.service"
    echo "install: edge-$role installed and started (journalctl -u edge-$role)"
else
    echo "install: edge-$role installed under $root (enabled; starts at boot)"
fi
