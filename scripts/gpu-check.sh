#!/usr/bin/env bash
# The GPU check: Tritter's CubeCL kernels on CUDA against the CPU reference, then one
# table of timings (ternary GEMV/GEMM, flash attention forward and backward, copy
# bandwidth). Runs a binary built beforehand on a machine with Rust:
#
#   cargo build --profile gpu-check -p tritter-kernels --features cuda --bin gpu-check
#
# and needs nothing else on the GPU machine. Finishes in under 5 minutes on an H100.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${GPU_CHECK_BIN:-target/gpu-check/gpu-check}"
if [ ! -x "$BIN" ]; then
    echo "gpu-check: no binary at $BIN; build it with" >&2
    echo "  cargo build --profile gpu-check -p tritter-kernels --features cuda --bin gpu-check" >&2
    exit 2
fi
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
timeout 290 "$BIN" --device cuda "$@"
