#!/bin/sh
# Builds the example components from source and checks them against the
# committed .wasm files. Usage: examples/build.sh [--check]
#   --check  fail if a rebuilt component differs from the committed one
# The committed components are what the tests use when the wasm32-wasip2
# target cannot be installed; this script proves they come from this source.
set -eu
cd "$(dirname "$0")"
here=$(pwd)
check=false
[ "${1:-}" = "--check" ] && check=true

if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
    echo "installing the wasm32-wasip2 target" >&2
    if ! timeout 180 rustup target add wasm32-wasip2; then
        echo "examples/build.sh: cannot install wasm32-wasip2; the committed components are used as they are" >&2
        $check && exit 1
        exit 0
    fi
fi

build() {
    name=$1
    # Paths are remapped so the output does not depend on where the repository
    # or the cargo registry live: the same source gives the same bytes.
    RUSTFLAGS="--remap-path-prefix=$here=/examples --remap-path-prefix=${CARGO_HOME:-$HOME/.cargo}=/cargo" \
        cargo build --quiet --release --target wasm32-wasip2 \
        --manifest-path "$here/$name/Cargo.toml" --target-dir "$here/target"
    out="$here/target/wasm32-wasip2/release/$(echo "$name" | tr - _).wasm"
    [ -f "$out" ] || out="$here/target/wasm32-wasip2/release/$name.wasm"
    if $check; then
        if ! cmp -s "$out" "$here/$name.wasm"; then
            echo "examples/build.sh: $name.wasm differs from a fresh build of examples/$name" >&2
            exit 1
        fi
        echo "$name.wasm matches its source"
    else
        cp "$out" "$here/$name.wasm"
        echo "built examples/$name.wasm ($(wc -c < "$here/$name.wasm") bytes)"
    fi
}

# C: clang and wasi-libc (Debian: clang lld wasi-libc), bindings from
# wit-bindgen, a component by wasm-tools with the preview1 reactor adapter
# of wasmtime 48 (cargo install wit-bindgen-cli wasm-tools).
build_c() {
    name=$1
    wit_bindgen=$(command -v wit-bindgen || echo /opt/wit-bindgen/bin/wit-bindgen)
    wasm_tools=$(command -v wasm-tools || echo /opt/wasm-tools/bin/wasm-tools)
    if ! command -v clang >/dev/null || [ ! -x "$wit_bindgen" ] || [ ! -x "$wasm_tools" ] \
        || [ ! -f /usr/lib/wasm32-wasi/libc.a ]; then
        echo "skipping $name: it needs clang, wasi-libc, wit-bindgen and wasm-tools" >&2
        return 0
    fi
    work="$here/target/c/$name"
    rm -rf "$work" && mkdir -p "$work"
    cargo run --quiet --release --manifest-path "$here/$name/adapter/Cargo.toml" \
        --target-dir "$here/target/c/adapter" -- "$work/adapter.wasm"
    "$wit_bindgen" c --world hello --out-dir "$work/gen" "$here/$name/wit" >/dev/null 2>&1
    clang --target=wasm32-wasi -Oz -g0 -mexec-model=reactor -Wl,--strip-debug -I"$work/gen" \
        -o "$work/core.wasm" "$here/$name/src/hello.c" "$work/gen/hello.c" "$work/gen/hello_component_type.o"
    "$wasm_tools" component new "$work/core.wasm" --adapt "wasi_snapshot_preview1=$work/adapter.wasm" -o "$work/$name.wasm"
    out="$work/$name.wasm"
    if $check; then
        cmp -s "$out" "$here/$name.wasm" || { echo "examples/build.sh: $name.wasm differs from a fresh build of examples/$name" >&2; exit 1; }
        echo "$name.wasm matches its source"
    else
        cp "$out" "$here/$name.wasm"
        echo "built examples/$name.wasm ($(wc -c < "$here/$name.wasm") bytes)"
    fi
}

build hello
build hello-http
build counter
build_c hello-c
