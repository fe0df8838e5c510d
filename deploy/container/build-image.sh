#!/usr/bin/env bash
# Builds the hub's OCI image with no registry, no container daemon and no
# root: the result is an OCI image layout archive (oci-archive) that
#   skopeo copy oci-archive:edge-hub.oci.tar docker://REGISTRY/edge-hub:TAG
#   podman load -i edge-hub.oci.tar
# push or load. The same inputs give the same image digest.
#
#   deploy/container/build-image.sh [--binary PATH] [--out FILE] [--tag TAG] [--no-strip]
#   deploy/container/build-image.sh --rootfs DIR [--binary PATH]   (just the files; the Containerfile uses it)
#
# Without --binary it builds a static hub (cargo build --release --target
# x86_64-unknown-linux-musl; needs `rustup target add x86_64-unknown-linux-musl`
# and Debian's musl-tools). A dynamically linked --binary (glibc; any of
# amd64, arm64, arm/v7) gets its loader and libraries copied in. The image
# runs `edge-hub serve` as uid 65532 with its state in the volume
# /var/lib/edge-hub, the API on :7443 and the embedded broker on :1883.
# Timestamps come from SOURCE_DATE_EPOCH (default: the last commit's).
set -euo pipefail
die() { echo "build-image: $*" >&2; exit 1; }

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
binary="" out="" tag="" strip=true rootfs_out=""
while (($#)); do
    case "$1" in
        --binary) binary=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --tag) tag=$2; shift 2 ;;
        --no-strip) strip=false; shift ;;
        --rootfs) rootfs_out=$2; shift 2 ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) die "unknown argument $1 (try --help)" ;;
    esac
done
for tool in tar gzip sha256sum readelf; do
    command -v "$tool" >/dev/null || die "$tool is needed (Debian: tar, gzip, coreutils, binutils)"
done
version=$(sed -nE 's/^version = "([^"]+)"/\1/p' "$repo/Cargo.toml" | head -1)
[[ -n $tag ]] || tag=$version
[[ $tag =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || die "--tag '$tag' is not an image tag (letters, digits, '_', '.', '-')"

if [[ -z $binary ]]; then
    rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl \
        || die "no x86_64-unknown-linux-musl target: rustup target add x86_64-unknown-linux-musl, or pass --binary"
    command -v musl-gcc >/dev/null || die "musl-gcc is needed for the static build (Debian: musl-tools)"
    (cd "$repo" && cargo build --release --locked -p edge-hub --target x86_64-unknown-linux-musl) >&2
    binary="$repo/target/x86_64-unknown-linux-musl/release/edge-hub"
fi
[[ -f $binary && -x $binary ]] || die "$binary is not an executable"
header=$(readelf -h "$binary" 2>/dev/null) || die "$binary is not an ELF executable"
case "$(sed -nE 's/^ *Machine: *//p' <<<"$header")" in
    *X86-64*) arch=amd64 variant="" tools="" ;;
    *AArch64*) arch=arm64 variant="" tools=aarch64-linux-gnu- sysroot=/usr/aarch64-linux-gnu ;;
    *ARM*) arch=arm variant=v7 tools=arm-linux-gnueabihf- sysroot=/usr/arm-linux-gnueabihf ;;
    *) die "$binary is for a CPU this image cannot be built for" ;;
esac
[[ -n $out ]] || out="$repo/target/edge-hub-$tag-$arch$variant.oci.tar"
if [[ -z ${SOURCE_DATE_EPOCH:-} ]]; then
    SOURCE_DATE_EPOCH=$(git -C "$repo" log -1 --format=%ct 2>/dev/null || echo 0)
fi
[[ $SOURCE_DATE_EPOCH =~ ^[0-9]+$ ]] || die "SOURCE_DATE_EPOCH must be seconds since 1970, not '$SOURCE_DATE_EPOCH'"
created=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%dT%H:%M:%SZ)
revision=$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rootfs="$work/rootfs"
mkdir -p "$rootfs/usr/local/bin" "$rootfs/etc" "$rootfs/var/lib/edge-hub" "$rootfs/tmp"
cp "$binary" "$rootfs/usr/local/bin/edge-hub"
if $strip; then
    if command -v "${tools}strip" >/dev/null; then
        "${tools}strip" "$rootfs/usr/local/bin/edge-hub"
    else
        echo "build-image: warning: no ${tools}strip; the binary goes in unstripped" >&2
    fi
fi

# A dynamically linked hub brings its loader and libraries along.
interp=$(readelf -l "$binary" | sed -nE 's/.*Requesting program interpreter: (.*)\]/\1/p')
if [[ -n $interp ]]; then
    if [[ $arch == amd64 ]]; then libdirs=(/lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu /lib64); else libdirs=("$sysroot/lib"); fi
    find_lib() {
        local d
        for d in "${libdirs[@]}"; do [[ -e $d/$1 ]] && { echo "$d/$1"; return; }; done
        die "cannot find $1, which $binary needs (looked in ${libdirs[*]})"
    }
    mkdir -p "$rootfs/lib" "$rootfs$(dirname "$interp")"
    cp -L "$(find_lib "$(basename "$interp")")" "$rootfs$interp"
    # The loader is NEEDED by libc as well; it is already in place.
    todo=("$binary") seen=" $(basename "$interp") "
    while ((${#todo[@]})); do
        f=${todo[0]} todo=("${todo[@]:1}")
        for lib in $(readelf -d "$f" | sed -nE 's/.*\(NEEDED\).*\[(.*)\]/\1/p'); do
            [[ $seen == *" $lib "* ]] && continue
            seen+="$lib "
            src=$(find_lib "$lib")
            cp -L "$src" "$rootfs/lib/$lib"
            todo+=("$src")
        done
    done
fi
printf 'root:x:0:0:root:/:/sbin/nologin\nedge:x:65532:65532:edge hub:/var/lib/edge-hub:/sbin/nologin\n' > "$rootfs/etc/passwd"
printf 'root:x:0:\nedge:x:65532:\n' > "$rootfs/etc/group"
# Without nsswitch.conf glibc would ask DNS before /etc/hosts.
printf 'hosts: files dns\n' > "$rootfs/etc/nsswitch.conf"
chmod 0755 "$rootfs" "$rootfs/usr" "$rootfs/usr/local" "$rootfs/usr/local/bin" "$rootfs/etc" "$rootfs/var" "$rootfs/var/lib"
chmod 0755 "$rootfs/usr/local/bin/edge-hub" && chmod 0644 "$rootfs/etc/passwd" "$rootfs/etc/group" "$rootfs/etc/nsswitch.conf"
chmod 0700 "$rootfs/var/lib/edge-hub" && chmod 1777 "$rootfs/tmp"
[[ -d $rootfs/lib ]] && find "$rootfs/lib" "$rootfs$(dirname "${interp:-/lib/x}")" -type f -exec chmod 0755 {} + && chmod 0755 "$rootfs/lib"

if [[ -n $rootfs_out ]]; then
    mkdir -p "$rootfs_out"
    cp -a "$rootfs/." "$rootfs_out/"
    [[ $(id -u) -eq 0 ]] && chown 65532:65532 "$rootfs_out/var/lib/edge-hub"
    echo "build-image: the image's files for linux/$arch${variant:+/$variant} are in $rootfs_out"
    exit 0
fi

# One layer, byte for byte reproducible: sorted, fixed times and owners; the
# state directory belongs to the hub's user.
reproducible=(--sort=name --format=gnu --mtime="@$SOURCE_DATE_EPOCH" --numeric-owner)
(cd "$rootfs" && tar -cf "$work/layer.tar" "${reproducible[@]}" --owner=0 --group=0 \
    --exclude=./var/lib/edge-hub .)
(cd "$rootfs" && tar -rf "$work/layer.tar" "${reproducible[@]}" --owner=65532 --group=65532 ./var/lib/edge-hub)
diff_id=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
gzip -n -9 < "$work/layer.tar" > "$work/layer.tar.gz"

layout="$work/layout"
mkdir -p "$layout/blobs/sha256"
blob() { # FILE -> digest; moves FILE into the layout
    local d
    d=$(sha256sum "$1" | cut -d' ' -f1)
    mv "$1" "$layout/blobs/sha256/$d"
    echo "$d"
}
size() { stat -c %s "$layout/blobs/sha256/$1"; }
layer=$(blob "$work/layer.tar.gz")
platform="\"architecture\":\"$arch\",\"os\":\"linux\"${variant:+,\"variant\":\"$variant\"}"
printf '%s' "{\"created\":\"$created\",$platform,\"config\":{\"User\":\"65532:65532\",\"Env\":[\"PATH=/usr/local/bin\",\"EDGE_HUB_DATA_DIR=/var/lib/edge-hub\",\"EDGE_HUB_API_ADDR=0.0.0.0:7443\",\"EDGE_HUB_MQTT_ADDR=0.0.0.0:1883\"],\"Entrypoint\":[\"/usr/local/bin/edge-hub\"],\"Cmd\":[\"serve\"],\"ExposedPorts\":{\"1883/tcp\":{},\"7443/tcp\":{}},\"Volumes\":{\"/var/lib/edge-hub\":{}},\"WorkingDir\":\"/\",\"StopSignal\":\"SIGTERM\",\"Labels\":{\"org.opencontainers.image.title\":\"edge-hub\",\"org.opencontainers.image.version\":\"$version\",\"org.opencontainers.image.revision\":\"$revision\"}},\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[\"sha256:$diff_id\"]},\"history\":[{\"created\":\"$created\",\"created_by\":\"deploy/container/build-image.sh\"}]}" > "$work/config.json"
config=$(blob "$work/config.json")
printf '%s' "{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"config\":{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"sha256:$config\",\"size\":$(size "$config")},\"layers\":[{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"sha256:$layer\",\"size\":$(size "$layer")}],\"annotations\":{\"org.opencontainers.image.created\":\"$created\",\"org.opencontainers.image.version\":\"$version\",\"org.opencontainers.image.revision\":\"$revision\"}}" > "$work/manifest.json"
manifest=$(blob "$work/manifest.json")
printf '%s' "{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.index.v1+json\",\"manifests\":[{\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"digest\":\"sha256:$manifest\",\"size\":$(size "$manifest"),\"platform\":{$platform},\"annotations\":{\"org.opencontainers.image.ref.name\":\"$tag\"}}]}" > "$layout/index.json"
printf '{"imageLayoutVersion":"1.0.0"}' > "$layout/oci-layout"

mkdir -p "$(dirname "$out")"
(cd "$layout" && tar -cf "$work/image.tar" "${reproducible[@]}" --owner=0 --group=0 oci-layout index.json blobs)
mv "$work/image.tar" "$out"
echo "build-image: $out: edge-hub:$tag for linux/$arch${variant:+/$variant}, manifest sha256:$manifest, layer $(( $(size "$layer") / 1024 )) KiB compressed"
