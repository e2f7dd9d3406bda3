"""Decode steps through the graph runner's static buffers (worker/cuda_graphs.py).

On the CPU nothing is captured: `QUIRE_DECODE_GRAPH_REPLAY=1` runs decode steps through the
very same static, padded buffers in eager replay. These tests prove the padding, the static
buffers and their reuse, and that padding rows touch only the scratch blocks, by token-for-
token identity with eager runs; and the Triton static plan (fixed split count, empty splits)
against the torch reference in Triton's interpreter. Capture and replay themselves need a GPU.
"""
from __future__ import annotations

import pytest
import torch

from quire.cluster import LLM, SamplingParams
from quire.kernels.attention_ref import TorchAttentionBackend
from quire.protos.step import PLACEHOLDER_TOKEN, NewRequestData, StepPlan
from quire.worker.cuda_graphs import (REPLAY, REPLAY_ENV, DecodeGraphSpec, batch_size_ladder, graph_memory_reserve,
                                      max_padding, padded_size)
from quire.worker.kv_pool import KVPool
from quire.worker.loader import load_model
from quire.worker.memory_profile import dummy_step_plan
from quire.worker.model_runner import ModelRunner
from quire.worker.parallel import ParallelContext
from quire.worker.sampler import Sampler

NUM_BLOCKS, MAX_NUM_SEQS = 64, 8  # ladder 1, 2, 4, 8: 3 rows pad to 4, 5 to 8


def test_ladder_and_padding():
    assert batch_size_ladder(0) == ()
    assert batch_size_ladder(1) == (1,)
    assert batch_size_ladder(5) == (1, 2, 4, 5)
    assert batch_size_ladder(8) == (1, 2, 4, 8)
    assert batch_size_ladder(20) == (1, 2, 4, 8, 16, 20)
    ladder = batch_size_ladder(256)
    assert ladder[:5] == (1, 2, 4, 8, 16) and ladder[-2:] == (248, 256) and len(ladder) == 35
    assert [padded_size(ladder, n) for n in (1, 2, 3, 5, 8, 9, 17, 249, 256)] == [1, 2, 4, 8, 8, 16, 24, 256, 256]
    assert padded_size(ladder, 257) is None
    assert max_padding(ladder) == 7 and max_padding(batch_size_ladder(8)) == 3 and max_padding((1,)) == 0
    # Every batch size pads by at most max_padding rows.
    assert all(padded_size(ladder, n) - n <= max_padding(ladder) for n in range(1, 257))


def test_graph_memory_reserve_scales_the_measured_peak():
    per_graph = graph_memory_reserve(0, 8, 2048) // 4
    assert per_graph > 0
    assert graph_memory_reserve(2048 << 10, 8, 2048) == (8 << 10) + 4 * per_graph
    assert graph_memory_reserve(1 << 20, 4096, 2048) == (1 << 20) + len(batch_size_ladder(4096)) * per_graph


def test_enforce_eager_travels_from_the_cli_to_the_workers_requests():
    from quire.cluster.cli import _engine_kwargs, build_parser
    from quire.cluster.core.config import EngineConfig
    from quire.protos import worker_pb2 as pb

    kwargs = _engine_kwargs(build_parser().parse_args(["serve", "--enforce-eager", "--max-num-seqs", "4"]))
    assert kwargs["enforce_eager"] is True
    assert EngineConfig.from_kwargs(**kwargs).model.enforce_eager
    assert "enforce_eager" not in _engine_kwargs(build_parser().parse_args(["serve"]))  # the config's default
    assert not EngineConfig().model.enforce_eager
    request = pb.AllocateKVCacheRequest.FromString(
        pb.AllocateKVCacheRequest(num_blocks=8, max_num_seqs=4, enforce_eager=True).SerializeToString())
    assert (request.max_num_seqs, request.enforce_eager) == (4, True)
    assert pb.ProfileMemoryRequest(enforce_eager=True).enforce_eager


def _llm(checkpoint, replay: bool, **kwargs) -> LLM:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(REPLAY_ENV, "1" if replay else "")
        return LLM(model=str(checkpoint), dtype="float32", num_kv_blocks=NUM_BLOCKS, max_model_len=128,
                   max_num_seqs=MAX_NUM_SEQS, **kwargs)


@pytest.fixture(scope="module")
def llms(tiny_checkpoint):
    checkpoint = tiny_checkpoint("llama-gqa4")
    eager, replay = _llm(checkpoint, replay=False), _llm(checkpoint, replay=True)
    yield eager, replay
    eager.shutdown()
    replay.shutdown()


def _runner(llm):
    return llm.engine.executor.worker.runner


def _record_sizes(runner, seen: list[tuple[int, int]]):
    """Wrap the graph runner's `load` to record (real rows, padded size) per graph step."""
    load = runner.graphs.load

    def recording(size, input_ids, positions, slots, *args):
        seen.append((slots.numel(), size))
        return load(size, input_ids, positions, slots, *args)
    runner.graphs.load = recording


def test_modes(llms):
    eager, replay = llms
    assert _runner(eager).graphs is None and _runner(eager).kv_pool.num_blocks == NUM_BLOCKS
    graphs = _runner(replay).graphs
    assert graphs.mode == REPLAY and graphs.ladder == (1, 2, 4, 8)
    # Scratch blocks for up to 3 padding rows, past the controller's blocks.
    assert _runner(replay).kv_pool.num_blocks == NUM_BLOCKS + 3


def test_enforce_eager_reaches_the_worker(tiny_checkpoint):
    llm = _llm(tiny_checkpoint("llama-gqa4"), replay=True, enforce_eager=True)
    try:
        assert _runner(llm).graphs is None and _runner(llm).kv_pool.num_blocks == NUM_BLOCKS
    finally:
        llm.shutdown()


@pytest.mark.parametrize("max_tokens", [[7, 3, 11, 2, 5], [9, 2, 6]], ids=["5-shrinking", "3-shrinking"])
def test_replay_gives_the_eager_tokens_and_real_blocks(llms, max_tokens):
    eager, replay = llms
    prompts = [[3 + i, 17, 29 + 2 * i, 8][: 2 + i % 3] for i in range(len(max_tokens))]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in max_tokens]
    graphs = _runner(replay).graphs
    buffers = graphs.static_buffers()
    pointers = [b.data_ptr() for b in buffers]
    seen: list[tuple[int, int]] = []
    _record_sizes(_runner(replay), seen)
    try:
        got = [o.outputs[0].token_ids for o in replay.generate(prompts, params, use_tqdm=False)]
    finally:
        del _runner(replay).graphs.load  # back to the class's method
    want = [o.outputs[0].token_ids for o in eager.generate(prompts, params, use_tqdm=False)]
    assert got == want and [len(t) for t in got] == max_tokens
    # Every decode step went through the static buffers, padded up the ladder as the batch shrank.
    decode_steps = max(max_tokens) - 1
    assert len(seen) == decode_steps
    assert all(size == padded_size(graphs.ladder, n) for n, size in seen)
    assert seen[0] == (len(max_tokens), 8 if len(max_tokens) == 5 else 4) and seen[-1] == (1, 1)
    # The same buffers throughout: nothing reallocated.
    assert [b.data_ptr() for b in buffers] == pointers
    assert all(a is b for a, b in zip(graphs.static_buffers(), buffers))
    # The controller's blocks hold the same K/V with and without the static path: the same slots
    # written, the same values up to the last bits (a GEMM over 8 rows need not round as one over 5).
    for eager_pair, replay_pair in zip(_runner(eager).kv_pool.caches, _runner(replay).kv_pool.caches):
        for want_cache, got_cache in zip(eager_pair, replay_pair):
            got_cache = got_cache[:NUM_BLOCKS]
            assert torch.equal(want_cache.flatten(2).any(-1), got_cache.flatten(2).any(-1))
            torch.testing.assert_close(got_cache, want_cache, rtol=0, atol=1e-5)


def test_padding_rows_write_only_their_scratch_slots(llms):
    _, replay = llms
    runner = _runner(replay)
    bs, handles = runner.block_size, [9101, 9102, 9103]
    greedy = SamplingParams(temperature=0)
    runner.execute(StepPlan(1, new_requests=[NewRequestData(h, f"r{h}", [5, 6, 7 + i], greedy, [40 + i], 0)
                                             for i, h in enumerate(handles)],
                            num_scheduled_tokens={h: 3 for h in handles}))
    for k, _ in runner.kv_pool.caches:
        k[NUM_BLOCKS:].zero_()  # earlier padding rows left there what this step's would write again
    before = [k.clone() for k, _ in runner.kv_pool.caches]
    counters = (runner.host_syncs, runner.sampler.host_syncs)
    synced = [c.snapshot() for c in counters]
    result = runner.execute(StepPlan(2, decode_handles=handles, decode_token_ids=[PLACEHOLDER_TOKEN] * 3))
    assert not result.errors and result.sampled_handles == handles
    # Still one staging copy in and one read back, padded or not.
    assert [tuple(a - b for a, b in zip(c.snapshot(), s)) for c, s in zip(counters, synced)] == [(1, 0, 0), (0, 1, 0)]
    scratch = NUM_BLOCKS  # 3 rows pad to 4: one padding row, in the first scratch block
    for (k, _), old in zip(runner.kv_pool.caches, before):
        changed = (k != old).flatten(2).any(-1).nonzero().tolist()  # [block, offset] of every slot written
        assert sorted(changed) == sorted([[40 + i, 3 % bs] for i in range(3)] + [[scratch, 0]])
    runner.execute(StepPlan(3, finished_handles=handles))


def test_triton_static_decode_plan_handles_empty_splits():
    """The graph-safe plan: split count fixed from max_seq_len, lengths rewritten in place."""
    pytest.importorskip("triton")
    from quire.kernels.attention_ref import paged_attention_ref
    from quire.kernels.triton_attention import TritonAttentionPlan, paged_attention

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    heads, kv_heads, head_dim, block_size, max_seq_len = 4, 2, 16, 16, 1024
    num_blocks = 2 * max_seq_len // block_size
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, device=device)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(num_blocks, device=device)[: 2 * (max_seq_len // block_size)].view(2, -1)
    tables = torch.cat([tables, tables.flip(1)])  # 4 requests
    seq_lens = torch.ones(4, dtype=torch.int32, device=device)
    plan = TritonAttentionPlan.build_static_decode(seq_lens, heads // kv_heads, kv_heads, max_seq_len, num_splits=4)
    assert plan.num_splits == 4 and plan.split_len == 256
    query = torch.randn(4, heads, head_dim, device=device)
    for lens in ([1, 5, 300, 700], [1024, 2, 257, 1]):  # most requests leave some splits empty
        seq_lens.copy_(torch.tensor(lens))  # same plan, same tensors: as a replay sees them
        got = paged_attention(query, k_cache, v_cache, tables, plan, head_dim ** -0.5)
        want = paged_attention_ref(query, k_cache, v_cache, tables, lens, list(range(5)), head_dim ** -0.5)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.slow
def test_tensor_parallel_replay_gives_the_single_rank_tokens(tiny_checkpoint, monkeypatch):
    """Two gloo ranks (no capture possible) run the static path in lockstep: the same padded
    batch on both, the all-reduce inside it; tokens as one eager rank gives them."""
    from quire.cluster.executor.local_launcher import LocalWorkerLauncher

    checkpoint = tiny_checkpoint("llama-tp")
    prompts, max_tokens = [[5, 9, 2], [7, 7], [1, 2, 3, 4], [8, 6, 4]], [6, 2, 8, 4]  # 3 decodes pad to 4, 1 to 1
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in max_tokens]
    single = LLM(model=str(checkpoint), dtype="float32", num_kv_blocks=NUM_BLOCKS, max_num_seqs=MAX_NUM_SEQS)
    want = [o.outputs[0].token_ids for o in single.generate(prompts, params, use_tqdm=False)]
    single.shutdown()
    monkeypatch.setenv(REPLAY_ENV, "1")  # the worker processes inherit it
    launcher = LocalWorkerLauncher(2)
    try:
        llm = LLM(model=str(checkpoint), tensor_parallel_size=2, executor="workers", dtype="float32",
                  worker_addresses=launcher.addresses, dist_init_method=launcher.dist_init_method,
                  num_kv_blocks=NUM_BLOCKS, max_num_seqs=MAX_NUM_SEQS)
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        llm.shutdown()
    finally:
        launcher.stop()
    assert got == want


class _ScaleRecordingBackend(TorchAttentionBackend):
    """The torch backend, recording which cache and scale tensors every call is handed."""

    def __init__(self):
        self.calls: list[tuple[str, torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = []

    def write_kv(self, key, value, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
        self.calls.append(("write_kv", k_cache, k_scale, v_scale))
        super().write_kv(key, value, k_cache, v_cache, slot_mapping, k_scale=k_scale, v_scale=v_scale)

    def attend(self, query, k_cache, v_cache, plan, scale, k_scale=None, v_scale=None):
        self.calls.append(("attend", k_cache, k_scale, v_scale))
        return super().attend(query, k_cache, v_cache, plan, scale, k_scale=k_scale, v_scale=v_scale)


def _assert_every_layer_got_its_scales(calls, pool) -> None:
    assert [name for name, *_ in calls] == ["write_kv", "attend"] * len(pool.caches)
    for i, (_, k_cache, k_scale, v_scale) in enumerate(calls):
        layer = i // 2
        assert k_cache is pool.caches[layer][0], f"call {i}"
        assert k_scale is pool.scales[layer][0] and v_scale is pool.scales[layer][1], f"call {i}"


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8_e4m3"])
def test_the_eager_and_the_static_path_hand_every_layer_its_scales(kv_cache_dtype, tiny_checkpoint):
    cpu = torch.device("cpu")
    model = load_model(tiny_checkpoint("llama-gqa4"), ParallelContext(), torch.float32, cpu, 64)
    plan, num_blocks = dummy_step_plan([5, 3], 4)
    scratch = list(range(num_blocks, num_blocks + 3))
    pool = KVPool(model.kv_cache_spec(kv_cache_dtype), num_blocks + len(scratch), 4, cpu)
    backend = _ScaleRecordingBackend()
    runner = ModelRunner(model, ParallelContext(), cpu, pool, backend, Sampler(0),
                         decode_graphs=DecodeGraphSpec(REPLAY, 4, 64, scratch))
    runner.execute(plan)  # a prefill: the eager path
    _assert_every_layer_got_its_scales(backend.calls, pool)
    assert all(bool((scale > 0).any()) for pair in pool.scales for scale in pair), "the prefill wrote scales"
    pool.check_integrity()
    backend.calls.clear()
    graphs = runner.graphs  # one row through the static buffers (slot 0, context 1)
    graphs._seq_lens_host = [1]
    graphs._run_model(1, graphs._plan(1))
    _assert_every_layer_got_its_scales(backend.calls, pool)
    pool.check_integrity()


def test_replay_gives_the_eager_tokens_with_a_quantized_cache(tiny_checkpoint):
    checkpoint = tiny_checkpoint("llama-gqa4")
    eager = _llm(checkpoint, replay=False, kv_cache_dtype="int8")
    replay = _llm(checkpoint, replay=True, kv_cache_dtype="int8")
    try:
        assert _runner(eager).kv_pool.spec.dtype == _runner(replay).kv_pool.spec.dtype == torch.int8
        prompts = [[3, 17, 29], [4, 17], [5, 17, 31, 8]]
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        got = [o.outputs[0].token_ids for o in replay.generate(prompts, params, use_tqdm=False)]
        want = [o.outputs[0].token_ids for o in eager.generate(prompts, params, use_tqdm=False)]
        assert got == want and all(len(t) == 6 for t in got)
        _runner(replay).kv_pool.check_integrity()
    finally:
        eager.shutdown()
        replay.shutdown()
