#!/usr/bin/env bash
# One prepared check for a machine with one NVIDIA GPU and no network (the GPU image has
# torch, triton, transformers, safetensors, grpcio, protobuf; no Ray, no FastAPI).
# Installs quire without the network, then within about 6 minutes:
#   1. runs the Triton kernel tests compiled on the GPU,
#   2. runs HF parity through the engine in fp16 and bf16, KV sizing by profiling, and
#      throughput through a gRPC worker process against in process (asynchronous scheduling),
#   3. benchmarks decode attention against the card's copy bandwidth and contiguous SDPA.
# JSON goes to $OUT (gpu_check.json, kernel_bench.json) when set, else to stdout.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

if ! "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e . 2>/tmp/quire-pip.log; then
    # An image whose setuptools cannot build this project: expose the folders as the
    # quire package through a tree of links instead.
    echo "gpu_check: editable install failed ($(tail -1 /tmp/quire-pip.log)); using a link tree" >&2
    tree="$(mktemp -d)/quire"
    mkdir -p "$tree"
    for folder in cluster worker kernels protos; do ln -s "$PWD/$folder" "$tree/$folder"; done
    export PYTHONPATH="$(dirname "$tree")${PYTHONPATH:+:$PYTHONPATH}"
fi

status=0
timeout 300 "$PYTHON" benchmarks/gpu_check.py || status=$?
timeout 150 "$PYTHON" benchmarks/kernel_bench.py || status=$?
exit $status
