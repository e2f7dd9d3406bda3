#!/usr/bin/env bash
# One prepared check for a machine with one NVIDIA GPU and no network (the GPU image has
# torch, triton, transformers, safetensors, grpcio, protobuf; no Ray, no FastAPI).
# Installs quire without the network (unless it already imports from this tree), then
# within about 6 minutes:
#   1. prints the versions and the device, and stops gpu_check early when protobuf or
#      grpcio is older than the committed generated code needs,
#   2. runs the Triton kernel tests compiled on the GPU, HF parity through the engine in
#      fp16 and bf16, KV sizing by profiling, and throughput through a gRPC worker process
#      against in process (asynchronous scheduling), each section on its own,
#   3. benchmarks decode attention against the card's copy bandwidth and contiguous SDPA.
# JSON goes to $OUT (gpu_check.json, rewritten after every section; kernel_bench.json)
# when set, else to stdout.
#
#   DRY_RUN=1 benchmarks/gpu_check.sh   # the same on the CPU, tiny sizes, to check the scripts
#   GPU_CHECK_TIMEOUT=300 (seconds for gpu_check.py; what finished stays in its JSON)
#
# Exit status: 0 when everything passed, else the last failing step's.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
dry=()
if [ "${DRY_RUN:-0}" = 1 ]; then
    dry=(--dry-run)
    # Everything on the CPU: no GPU is used even where there is one; Triton interprets.
    export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1
else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi

# An editable install of this tree (a developer's checkout) needs no reinstall.
if ! "$PYTHON" -c 'import importlib.util as u, pathlib as p, sys
s = u.find_spec("quire.protos")
sys.exit(0 if s and p.Path(s.origin).resolve().parent == p.Path("protos").resolve() else 1)' 2>/dev/null; then
    pip_log="$(mktemp)"
    if ! "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e . 2>"$pip_log"; then
        # An image whose setuptools cannot build this project: expose the folders as the
        # quire package through a tree of links instead.
        echo "gpu_check: editable install failed ($(tail -1 "$pip_log")); using a link tree" >&2
        tree="$(mktemp -d)/quire"
        mkdir -p "$tree"
        for folder in cluster worker kernels protos; do ln -s "$PWD/$folder" "$tree/$folder"; done
        export PYTHONPATH="$(dirname "$tree")${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi

status=0
timeout "${GPU_CHECK_TIMEOUT:-300}" "$PYTHON" benchmarks/gpu_check.py ${dry[@]+"${dry[@]}"} || status=$?
if [ ${#dry[@]} -gt 0 ] && ! grep -q -- '--dry-run' benchmarks/kernel_bench.py; then
    # A kernel_bench.py without a dry run would benchmark full sizes in the interpreter.
    note="skipped: benchmarks/kernel_bench.py has no --dry-run flag"
    echo "gpu_check: kernel_bench $note" >&2
    if [ -n "${OUT:-}" ]; then printf '{"dry_run": true, "skipped": "%s"}\n' "$note" >"$OUT/kernel_bench.json"; fi
else
    timeout 150 "$PYTHON" benchmarks/kernel_bench.py ${dry[@]+"${dry[@]}"} || status=$?
fi
exit $status
