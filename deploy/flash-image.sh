#!/usr/bin/env bash
# Puts an edge agent onto a Raspberry Pi OS-style SD card image (a FAT boot
# partition, then an ext4 root partition) so that the device joins the hub
# on its first boot. Nothing from the image is run and nothing is mounted:
# the root partition is edited with debugfs, so no privileges are needed.
# Running it again updates what it wrote and changes nothing else.
#
#   deploy/flash-image.sh --image IMG --broker mqtt[s]://HUB[:PORT] --join-token-file FILE \
#       [--broker-ca PEM] [--name NODE] [--label k=v ...] [--agent PATH | --agent-dir DIR] [--keepalive 5s]
#
# The agent binary is chosen for the image's CPU (read from the ELF header of
# its /usr/bin/env): aarch64 or armv7, from --agent-dir (default: this
# repository's target/<triple>/release, then debug; see scripts/cross).
# The join token goes to /var/lib/edge-agent/join.token (0600), which the
# agent deletes once it has its own credential: make it a short-lived,
# single-use token (`edgectl token create --ttl 72h --uses 1`).
set -euo pipefail

die() { echo "flash-image: $*" >&2; exit 1; }

image="" broker="" broker_ca="" token_file="" name="" agent="" agent_dir="" keepalive=""
labels=()
while (($#)); do
    case "$1" in
        --image) image=$2; shift 2 ;;
        --broker) broker=$2; shift 2 ;;
        --join-token-file) token_file=$2; shift 2 ;;
        --join-token) die "--join-token puts the token on a command line (visible to every user): use --join-token-file" ;;
        --broker-ca) broker_ca=$2; shift 2 ;;
        --name) name=$2; shift 2 ;;
        --label) labels+=("$2"); shift 2 ;;
        --agent) agent=$2; shift 2 ;;
        --agent-dir) agent_dir=$2; shift 2 ;;
        --keepalive) keepalive=$2; shift 2 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) die "unknown argument $1 (try --help)" ;;
    esac
done
[[ -n $image ]] || die "--image is required"
[[ -f $image ]] || die "$image does not exist"
[[ $broker =~ ^mqtts?:// ]] || die "--broker must be mqtt://HOST[:PORT] or mqtts://HOST[:PORT], got '${broker}'"
if [[ -n $broker_ca ]]; then
    grep -q -- '-----BEGIN CERTIFICATE-----' "$broker_ca" 2>/dev/null || die "--broker-ca $broker_ca is not a PEM certificate file"
fi
[[ -n $token_file ]] || die "--join-token-file is required"
[[ -r $token_file ]] || die "--join-token-file $token_file cannot be read"
token=$(tr -d '[:space:]' < "$token_file")
[[ $token =~ ^EJ1\.[0-9a-fA-F]{32}\.[a-z0-9]{6,16}\.[A-Za-z0-9]{16,128}$ ]] \
    || die "--join-token-file $token_file does not hold a join token (EJ1.<32 hex>.<id>.<secret>, from \`edgectl token create\`)"
if [[ -n $name && ! $name =~ ^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$ ]]; then
    die "--name '$name' is not a node name (lowercase letters, digits, '-' and '.')"
fi
for l in "${labels[@]}"; do
    [[ $l =~ ^[A-Za-z0-9./_-]+=[A-Za-z0-9._-]*$ ]] || die "--label '$l' is not key=value"
done
for tool in sfdisk debugfs e2fsck dd; do
    command -v "$tool" >/dev/null || die "$tool is needed (Debian: fdisk, e2fsprogs, coreutils)"
done

# The partition table: FAT boot partition first, the root filesystem second.
parts=$(sfdisk -d "$image" 2>/dev/null | grep 'start=' || true)
boot_type=$(sed -n 1p <<<"$parts" | sed -nE 's/.*type= *([0-9a-fA-F]+).*/\1/p')
root_line=$(sed -n 2p <<<"$parts")
start=$(sed -nE 's/.*start= *([0-9]+).*/\1/p' <<<"$root_line")
size=$(sed -nE 's/.*size= *([0-9]+).*/\1/p' <<<"$root_line")
[[ -n $start && -n $size ]] || die "$image has no second (root) partition; is it a Raspberry Pi OS image?"
case "$boot_type" in
    b|c|e|ef|B|C|E|EF) ;;
    *) echo "flash-image: warning: the first partition of $image is not FAT (type ${boot_type:-none})" >&2 ;;
esac

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root="$work/root.ext4"
dd if="$image" of="$root" bs=512 skip="$start" count="$size" status=none
debugfs -R "stats" "$root" >/dev/null 2>&1 || die "partition 2 of $image is not an ext2/3/4 filesystem"

# What CPU the image is for.
debugfs -R "dump /usr/bin/env $work/env" "$root" >/dev/null 2>&1 || true
[[ -s $work/env ]] || die "$image has no /usr/bin/env to tell its CPU by"
machine=$(od -An -tu2 -j18 -N2 "$work/env" | tr -d ' ')
elfclass=$(od -An -tu1 -j4 -N1 "$work/env" | tr -d ' ')
case "$machine/$elfclass" in
    183/2) triple=aarch64-unknown-linux-gnu; arch=arm64 ;;
    40/1) triple=armv7-unknown-linux-gnueabihf; arch=arm/v7 ;;
    62/2) triple=x86_64-unknown-linux-gnu; arch=amd64 ;;
    *) die "$image is for an unsupported CPU (ELF machine $machine, class $elfclass)" ;;
esac

if [[ -z $agent ]]; then
    repo=$(cd "$(dirname "$0")/.." && pwd)
    for d in ${agent_dir:+"$agent_dir"} "$repo/target/$triple/release" "$repo/target/$triple/debug"; do
        if [[ -x $d/edge-agent ]]; then agent="$d/edge-agent"; break; fi
        if [[ -n $agent_dir && -x $agent_dir/$triple/edge-agent ]]; then agent="$agent_dir/$triple/edge-agent"; break; fi
    done
    [[ -n $agent ]] || die "no edge-agent for $arch ($triple): build it with scripts/cross --release, or pass --agent"
fi
agent_machine=$(od -An -tu2 -j18 -N2 "$agent" | tr -d ' ')
[[ $agent_machine == "$machine" ]] || die "$agent is not built for $arch (ELF machine $agent_machine, the image needs $machine)"

# The files to put in place.
{
    echo "# Written by deploy/flash-image.sh."
    echo "EDGE_AGENT_BROKER=$broker"
    echo "EDGE_JOIN_TOKEN_FILE=/var/lib/edge-agent/join.token"
    [[ -n $broker_ca ]] && echo "EDGE_AGENT_BROKER_CA=/etc/edge/broker-ca.pem"
    [[ -n $name ]] && echo "EDGE_AGENT_NAME=$name"
    [[ -n $keepalive ]] && echo "EDGE_AGENT_KEEPALIVE=$keepalive"
    ((${#labels[@]})) && echo "EDGE_AGENT_ARGS=$(printf -- '--label %s ' "${labels[@]}")"
    true
} > "$work/agent.env"
echo "$token" > "$work/join.token"
cp "$(dirname "$0")/systemd/edge-agent.service" "$work/edge-agent.service"
if [[ -n $broker_ca ]]; then cp "$broker_ca" "$work/broker-ca.pem"; fi

# Room: what is written, less what an earlier run wrote (it is replaced),
# must fit in the free blocks, with 1% and 1 MiB to spare for metadata.
stats=$(debugfs -R "stats" "$root" 2>/dev/null)
block=$(awk -F: '/^Block size:/ {gsub(/ /, "", $2); print $2}' <<<"$stats")
free=$(( $(awk -F: '/^Free blocks:/ {gsub(/ /, "", $2); print $2}' <<<"$stats") * block ))
old_size=0
for f in /usr/local/bin/edge-agent /etc/edge/agent.env /etc/edge/broker-ca.pem /etc/systemd/system/edge-agent.service /var/lib/edge-agent/join.token; do
    s=$(debugfs -R "stat $f" "$root" 2>/dev/null | sed -nE 's/.*Size: ([0-9]+).*/\1/p' | head -1)
    old_size=$(( old_size + ${s:-0} ))
done
need=$(( $(stat -c %s "$agent") + $(stat -c %s "$work/agent.env") + $(stat -c %s "$work/edge-agent.service") + $(stat -c %s "$work/join.token") + $(stat -c %s "$work/broker-ca.pem" 2>/dev/null || echo 0) ))
need=$(( need + need / 100 + (1 << 20) ))
if (( need > free + old_size )); then
    die "the root filesystem of $image has $(( (free + old_size) >> 20 )) MiB free; the agent needs $(( need >> 20 )) MiB (use a release build from scripts/cross --release, or grow the image and its root partition first)"
fi

# debugfs commands: create missing directories (debugfs's mkdir of an
# existing directory leaves an orphaned inode behind), remove what an
# earlier run wrote, then write it anew.
: > "$work/cmds"
for d in /usr /usr/local /usr/local/bin /etc /etc/edge /etc/systemd /etc/systemd/system /etc/systemd/system/multi-user.target.wants /var /var/lib /var/lib/edge-agent; do
    if ! debugfs -R "stat $d" "$root" 2>/dev/null | grep -q "Type: directory"; then
        echo "mkdir $d" >> "$work/cmds"
    fi
done
cat >> "$work/cmds" <<CMDS
rm /usr/local/bin/edge-agent
write $agent /usr/local/bin/edge-agent
sif /usr/local/bin/edge-agent mode 0100755
sif /usr/local/bin/edge-agent uid 0
sif /usr/local/bin/edge-agent gid 0
rm /etc/edge/agent.env
write $work/agent.env /etc/edge/agent.env
sif /etc/edge/agent.env mode 0100600
sif /etc/edge/agent.env uid 0
sif /etc/edge/agent.env gid 0
rm /etc/edge/broker-ca.pem
rm /etc/systemd/system/edge-agent.service
write $work/edge-agent.service /etc/systemd/system/edge-agent.service
sif /etc/systemd/system/edge-agent.service mode 0100644
sif /etc/systemd/system/edge-agent.service uid 0
sif /etc/systemd/system/edge-agent.service gid 0
rm /etc/systemd/system/multi-user.target.wants/edge-agent.service
symlink /etc/systemd/system/multi-user.target.wants/edge-agent.service /etc/systemd/system/edge-agent.service
sif /var/lib/edge-agent mode 040700
rm /var/lib/edge-agent/join.token
write $work/join.token /var/lib/edge-agent/join.token
sif /var/lib/edge-agent/join.token mode 0100600
sif /var/lib/edge-agent/join.token uid 0
sif /var/lib/edge-agent/join.token gid 0
CMDS
if [[ -n $broker_ca ]]; then
    cat >> "$work/cmds" <<CMDS
write $work/broker-ca.pem /etc/edge/broker-ca.pem
sif /etc/edge/broker-ca.pem mode 0100644
sif /etc/edge/broker-ca.pem uid 0
sif /etc/edge/broker-ca.pem gid 0
CMDS
fi
debugfs -w -f "$work/cmds" "$root" > "$work/debugfs.log" 2>&1 || die "debugfs failed: $(tail -3 "$work/debugfs.log")"
# Read every file back: debugfs reports some failures only in its log.
check() {
    debugfs -R "dump $1 $work/check" "$root" >/dev/null 2>&1
    cmp -s "$2" "$work/check" || die "writing $1 failed: $(grep -i -m3 'error\|fail\|space' "$work/debugfs.log" || echo 'its content differs')"
}
check /usr/local/bin/edge-agent "$agent"
check /etc/edge/agent.env "$work/agent.env"
check /etc/systemd/system/edge-agent.service "$work/edge-agent.service"
check /var/lib/edge-agent/join.token "$work/join.token"
if [[ -n $broker_ca ]]; then check /etc/edge/broker-ca.pem "$work/broker-ca.pem"; fi
e2fsck -fn "$root" > "$work/fsck.log" 2>&1 || die "the root filesystem is inconsistent after writing: $(grep -v '^Pass\|^e2fsck' "$work/fsck.log" | head -8)"
dd if="$root" of="$image" bs=512 seek="$start" conv=notrunc status=none
echo "flash-image: $image ($arch) will join $broker as ${name:-its host name} on first boot"
