#!/usr/bin/env python
"""Online serving benchmark against a running `quire serve` (HTTP or gRPC): TTFT, TPOT,
ITL, E2E, throughput and goodput per request rate. The same as `quire bench serve`; see
quire.cluster.tools.bench_serve for what is measured and how.

    python benchmarks/serving.py --backend grpc --grpc-target 127.0.0.1:50051 --num-prompts 64 \
        --input-len 32:128 --output-len 32:128 --request-rates 2,8,inf --out serving.json --plot-dir plots
"""
from __future__ import annotations

import sys

from quire.cluster.tools.bench_serve import main

if __name__ == "__main__":
    sys.exit(main())
