"""The GPU image has no Ray and no FastAPI (nor the serving extras): the engine, worker,
kernels and CLI must import and generate without them (only `quire serve` needs them)."""
import subprocess
import sys

# Run first in an interpreter that stands for the GPU image: importing what it lacks fails.
GPU_IMAGE_BLOCKER = r"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"fastapi", "uvicorn", "starlette", "ray", "prometheus_client", "grpc_health",
                                  "grpc_reflection", "httpx", "matplotlib", "jsonschema"}:
            raise ImportError(f"{name} is not on the GPU image")
sys.meta_path.insert(0, Block())
"""

PROBE = GPU_IMAGE_BLOCKER + r"""
import quire.cluster, quire.worker.worker, quire.kernels, quire.protos.worker_pb2_grpc
from quire.cluster import LLM, SamplingParams
from quire.cluster.cli import main
import quire.cluster.tools.planner, quire.cluster.tools.bench_serve
assert main(["plan", "--model", "llama-3-70b", "-tp", "4", "--gpu", "a100-80gb"]) == 0
llm = LLM(model=sys.argv[1], num_kv_blocks=8)
print(llm.generate([5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids)
"""


def test_engine_runs_without_ray_or_fastapi(tiny_checkpoint):
    out = subprocess.run([sys.executable, "-c", PROBE, str(tiny_checkpoint("llama-mha"))],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert len(eval(out.stdout.strip().splitlines()[-1])) == 3
