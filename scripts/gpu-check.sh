#!/usr/bin/env bash
# The GPU check: Tritter's CubeCL kernels on CUDA against the CPU reference, then one
# table of timings (ternary GEMV/GEMM, flash attention forward and backward, copy
# bandwidth), then the streaming bench on CUDA (resident against streamed generation of
# a model four times its budget, with the host-to-device bandwidth as the limit). Runs
# binaries built beforehand on a machine with Rust:
#
#   cargo build --profile gpu-check -p tritter-kernels --features cuda --bin gpu-check
#   cargo build --profile gpu-check -p tritter --bin tritter
#
# and needs nothing else on the GPU machine. Either binary may travel gzipped
# (`gzip -k target/gpu-check/tritter`: together they are larger than some transfers
# allow); the script unpacks it. Finishes in under 5 minutes on an H100.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${GPU_CHECK_DIR:-target/gpu-check}"
UNPACKED="$(mktemp -d)"
trap 'rm -rf "$UNPACKED"' EXIT

# The path of binary $1: as built, or unpacked from $1.gz.
binary() {
    if [ -x "$DIR/$1" ]; then
        echo "$DIR/$1"
    elif [ -f "$DIR/$1.gz" ]; then
        gzip -dc "$DIR/$1.gz" >"$UNPACKED/$1"
        chmod +x "$UNPACKED/$1"
        echo "$UNPACKED/$1"
    fi
}

BIN="${GPU_CHECK_BIN:-$(binary gpu-check)}"
if [ -z "$BIN" ] || [ ! -x "$BIN" ]; then
    echo "gpu-check: no binary at $DIR/gpu-check; build it with" >&2
    echo "  cargo build --profile gpu-check -p tritter-kernels --features cuda --bin gpu-check" >&2
    exit 2
fi
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
timeout 290 "$BIN" --device cuda "$@"

TRITTER="${TRITTER_BIN:-$(binary tritter)}"
if [ -z "$TRITTER" ] || [ ! -x "$TRITTER" ]; then
    echo "gpu-check: no tritter binary at $DIR/tritter, so no streaming bench; build it with" >&2
    echo "  cargo build --profile gpu-check -p tritter --bin tritter" >&2
    exit 2
fi
echo
timeout 240 "$TRITTER" bench streaming --device cuda
