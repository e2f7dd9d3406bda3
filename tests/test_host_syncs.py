"""Host↔device crossings per step: one staging copy in, one read back out.

The CPU has no device to wait for, so the test tracks which tensors *would* live on the
device: a TorchFunctionMode marks the model's weights, the KV pool, the runner's block
table and every tensor computed from them (or moved or created on the device) during
`runner.execute(plan)`; tensors built from host data are host tensors until moved. Every
call that would wait for the device on an accelerator (`item`, `tolist`, `cpu`, `numpy`,
`bool`/`int`/`float`/`index` of a tensor, `nonzero`, a copy into host memory) on a marked
tensor counts as a read back, and every move of host data onto the device as a copy in.
The counts must match what the runner and the sampler count themselves."""
from __future__ import annotations

import traceback
import weakref
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from quire.cluster import LLM, SamplingParams
from quire.protos.step import PLACEHOLDER_TOKEN, NewRequestData, StepPlan

ROOT = Path(__file__).resolve().parent.parent
READS = {"item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "nonzero", "__array__"}


def _caller() -> str:
    """The repository file (relative) whose code made the call being intercepted."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = Path(frame.filename).resolve()  # (a checkout may be reached through links)
        if path.is_relative_to(ROOT) and not path.is_relative_to(ROOT / ".venv") and path.name != Path(__file__).name:
            return str(path.relative_to(ROOT))
    return "?"


class DeviceTracker(TorchFunctionMode):
    """Marks would-be device tensors and records the host↔device crossings made on them."""

    def __init__(self, device_tensors):
        super().__init__()
        self._marked: dict[int, weakref.ref] = {}
        self.reads: list[tuple[str, str]] = []    # (function, caller)
        self.copies: list[tuple[str, str]] = []   # (function, caller)
        for tensor in device_tensors:
            self._mark(tensor)

    def _mark(self, out) -> None:
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._marked[id(tensor)] = weakref.ref(tensor)

    def on_device(self, tensor) -> bool:
        ref = self._marked.get(id(tensor))
        return ref is not None and ref() is tensor

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        flat = tree_flatten((args, kwargs))[0]
        device_input = any(isinstance(t, torch.Tensor) and self.on_device(t) for t in flat)
        to_device = name == "to" and (
            "device" in kwargs or any(isinstance(a, (torch.device, str)) for a in args[1:]))
        if name in READS and device_input:
            self.reads.append((name, _caller()))
        elif name == "copy_" and self.on_device(args[1]) and not self.on_device(args[0]):
            self.reads.append((name, _caller()))
        elif name == "copy_" and self.on_device(args[0]) and not self.on_device(args[1]):
            self.copies.append((name, _caller()))
        elif to_device and not device_input:
            self.copies.append((name, _caller()))
        elif name in ("tensor", "as_tensor") and kwargs.get("device") is not None:
            self.copies.append((name, _caller()))
        out = func(*args, **kwargs)
        if name not in READS and (device_input or to_device or kwargs.get("device") is not None):
            self._mark(out)
        return out


@pytest.fixture(scope="module")
def runner(tiny_checkpoint):
    llm = LLM(model=str(tiny_checkpoint("llama-gqa4")), dtype="float32", num_kv_blocks=64, max_model_len=128)
    yield llm.engine.executor.worker.runner
    llm.shutdown()


def tracked_step(runner, plan: StepPlan):
    """Run `plan`; (tracker, the runner's and sampler's own counts during it)."""
    counters = (runner.host_syncs, runner.sampler.host_syncs)
    before = [c.snapshot() for c in counters]
    device_tensors = [*runner.model.parameters(), *runner.model.buffers(), runner.block_table.table,
                      *(t for pair in runner.kv_pool.caches for t in pair),
                      *(runner.graphs.static_buffers() if runner.graphs else [])]
    with DeviceTracker(device_tensors) as tracker:
        result = runner.execute(plan)
    counted = [sum(c.snapshot()[k] - b[k] for c, b in zip(counters, before)) for k in range(3)]
    assert not result.errors
    return tracker, tuple(counted)


def _mine(crossings):
    return [c for c in crossings if c[1].startswith("worker/")]


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0),
    SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=5, logprobs=3, repetition_penalty=1.2),
], ids=["greedy", "sampled"])
def test_a_decode_step_copies_in_once_per_component_and_reads_back_once(runner, params):
    handles = [7001, 7002, 7003]
    prefill = StepPlan(1, new_requests=[NewRequestData(h, f"r{h}", [5, 6, 7 + i], params, [40 + i], 0)
                                        for i, h in enumerate(handles)],
                       num_scheduled_tokens={h: 3 for h in handles})
    tracker, counted = tracked_step(runner, prefill)
    assert len(tracker.reads) == 1 and tracker.reads[0][1] == "worker/host_sync.py", tracker.reads
    for step in (2, 3, 4):
        plan = StepPlan(step, decode_handles=handles, decode_token_ids=[PLACEHOLDER_TOKEN] * 3)
        if step == 4:  # a new block for one request: a table delta, in the same copy
            plan.decode_block_handles, plan.decode_block_ids = [handles[0]], [50]
        tracker, counted = tracked_step(runner, plan)
        # The one read back: the sampler's packed tokens (and logprobs, validity flags).
        assert tracker.reads == [("tolist", "worker/host_sync.py")]
        # Copies in from this package: the runner's staging copy, and the sampler's when its
        # rows need parameters on the device (greedy rows without penalties need none).
        expected_copies = 1 if params.temperature == 0 else 2
        assert _mine(tracker.copies) == [("to", "worker/step_inputs.py")] * expected_copies
        assert counted == (expected_copies, 1, 0)
    runner.execute(StepPlan(5, finished_handles=handles))
    assert not set(handles) & set(runner.requests)


def test_a_step_that_samples_nothing_reads_nothing_back(runner):
    plan = StepPlan(1, new_requests=[NewRequestData(7100, "p", [5, 6, 7, 8], SamplingParams(temperature=0),
                                                    [45], 0)], num_scheduled_tokens={7100: 2})
    tracker, counted = tracked_step(runner, plan)
    assert tracker.reads == [] and _mine(tracker.copies) == [("to", "worker/step_inputs.py")]
    assert counted == (1, 0, 0)  # on CUDA a stream synchronize ends such a step (a blocking wait)
    runner.execute(StepPlan(2, finished_handles=[7100]))
