"""The controller's own costs, measured with no model (what `benchmarks/dispatch.py
--controller-only` reports, and the full dispatch run reports too).

* `controller_report`: the controller's side of a decode step for 256 running requests:
  scheduling and serialising the plan, then parsing the answer and appending its tokens.
* `controller_token_cost`: with a stub executor in place of the workers (answering every
  plan at once with a token from a fixed set of ordinary word tokens, and logprobs), the
  controller's cost per generated token once each request already has `history` output
  tokens, in the `Engine` and through the `AsyncEngine` to consumers accumulating their
  outputs as a frontend would. Flat in the history means nothing per token is
  proportional to what came before it.

Runs against the current package layout and the older flat one (`quire.cluster.engine`),
so a figure can be taken on code from before the move, side by side.
"""
from __future__ import annotations

import asyncio
import functools
import importlib
import json
import random
import re
import shutil
import statistics
import tempfile
import time
from pathlib import Path


@functools.lru_cache(maxsize=None)
def _flat_layout() -> bool:
    """Whether quire.cluster is the older flat package (quire.cluster.engine, not
    quire.cluster.core.engine): this benchmark runs against either, so that a figure can be
    taken on code from before the move. Decided once, from the package's own folder (an
    editable install's finder may still resolve a new-layout name to another checkout)."""
    import quire.cluster

    return not (Path(quire.cluster.__file__).parent / "core").is_dir()


def _cluster(where: str, name: str):
    """quire.cluster.<where>.<name>, or quire.cluster.<name> in the older flat layout."""
    return importlib.import_module(f"quire.cluster.{name}" if _flat_layout() else f"quire.cluster.{where}.{name}")


def _executor_module():
    return importlib.import_module("quire.cluster.executor" if _flat_layout() else "quire.cluster.executor.base")


def controller_microbench(num_running: int, steps: int) -> dict:
    """The controller's side of a decode step for `num_running` requests, with no model:
    schedule and serialise the plan (the goal's "scheduling + plan building"), then parse
    rank 0's answer and append its tokens. (Building that answer is the worker's work and
    is not timed.) Medians over the steps, in microseconds."""
    BlockPool = _cluster("core", "block_pool").BlockPool
    SchedulerConfig = _cluster("core", "config").SchedulerConfig
    KVCacheManager = _cluster("core", "kv_cache_manager").KVCacheManager
    Request = _cluster("core", "request").Request
    Scheduler = _cluster("core", "scheduler").Scheduler
    from quire.protos import worker_pb2 as pb
    from quire.protos.step import SamplingParams, StepResult

    scheduler = Scheduler(SchedulerConfig(max_num_seqs=num_running, max_num_batched_tokens=1 << 20),
                          KVCacheManager(BlockPool(num_running * 40), 16))
    for i in range(num_running):
        # Staggered lengths spread block-boundary crossings over the steps, as in real traffic.
        scheduler.add_request(Request(f"request-{i}", [5] * (100 + i % 16),
                                      SamplingParams(temperature=0, max_tokens=10**6)))
    planning, answering, sizes = [], [], []
    for step in range(steps + 1):
        began = time.perf_counter()
        plan = scheduler.schedule()
        wire = plan.to_pb().SerializeToString()
        planned = time.perf_counter()
        handles = [handle for handle, _ in plan.scheduled()]
        answer = StepResult(plan.step_id, sampled_handles=handles, sampled_token_ids=[7] * len(handles))
        answer_wire = answer.to_pb().SerializeToString()
        answered = time.perf_counter()
        scheduler.update_from_output(plan, StepResult.from_pb(pb.StepResult.FromString(answer_wire)))
        if step:  # step 0 is the prefill
            planning.append(planned - began)
            answering.append(time.perf_counter() - answered)
            sizes.append(len(wire))
    return {"schedule_and_plan_us": 1e6 * statistics.median(planning),
            "parse_and_append_us": 1e6 * statistics.median(answering),
            "plan_bytes": statistics.median(sizes)}


def controller_report(num_running: int, steps: int, repeats: int) -> dict:
    """`controller_microbench` repeated (the machine's speed drifts between runs): the median
    run and the quickest, whose figures are the closest to the code's own cost."""
    runs = [controller_microbench(num_running, steps) for _ in range(repeats)]
    totals = [run["schedule_and_plan_us"] + run["parse_and_append_us"] for run in runs]
    plan_bytes = runs[0]["plan_bytes"]
    return {"running_requests": num_running, "repeats": repeats,
            "schedule_and_plan_us_median": statistics.median(run["schedule_and_plan_us"] for run in runs),
            "schedule_and_plan_us_best": min(run["schedule_and_plan_us"] for run in runs),
            "with_parse_and_append_us_median": statistics.median(totals), "with_parse_and_append_us_best": min(totals),
            "runs": runs, "plan_bytes": plan_bytes, "plan_bytes_per_request": plan_bytes / num_running}


# -- the controller's cost per generated token, with no model -------------------------------

WORD_TOKEN = re.compile(r" [a-z]{3,}")  # " the", " string": ordinary text for the detokenizer


def word_token_ids(tokenizer) -> list[int]:
    """Ids of the tokenizer's ordinary word tokens (a space and three or more letters)."""
    return [i for i in range(len(tokenizer)) if WORD_TOKEN.fullmatch(tokenizer.decode([i]))]


def stub_checkpoint(max_model_len: int) -> Path:
    """A directory the controller loads as a checkpoint: the tiny random model's config (its
    context raised to `max_model_len`) and tokenizer, no weights (the stub needs none).
    The caller removes it."""
    source = _cluster("tools", "default_model").tiny_random_model_dir()
    target = Path(tempfile.mkdtemp(prefix="quire-stub-checkpoint-"))
    for path in source.iterdir():
        if path.is_file() and path.suffix != ".safetensors":
            shutil.copy(path, target / path.name)
    config = json.loads((target / "config.json").read_text())
    config["max_position_embeddings"] = max(max_model_len, config.get("max_position_embeddings") or 0)
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


def _stub_executor_class():
    """StubExecutor, a subclass of whichever `Executor` this layout has."""
    Executor = _executor_module().Executor
    from quire.protos import worker_pb2 as pb
    from quire.protos.step import SampledLogprobs, StepResult

    class StubExecutor(Executor):
        """The workers, with no model: answers each StepPlan at once as rank 0 would, one token
        for every scheduled request whose step computes its last known token (its prompt's end,
        or a decode), with the sampled token's logprob and `logprobs` candidates for a request
        that asked. Tokens come deterministically from `token_ids` (one stream for all requests).
        The plan is serialised and the answer parsed, the controller's side of a real transport;
        the stub's own bookkeeping and building the answer (the worker's side) are timed apart
        in `worker_seconds`."""

        world_size = 1
        runs_apart = False

        def __init__(self, token_ids: list[int], num_kv_blocks: int, seed: int = 0):
            super().__init__()
            rng = random.Random(seed)
            self.tokens = [rng.choice(token_ids) for _ in range(4099)]
            # Candidates of each position: the sampled token first (greedy), then the next best.
            self.candidates = [
                [(token, -0.05 - 0.01 * (j % 7))] + [(rng.choice(token_ids), -1.0 - k - 0.1 * rng.random())
                                                     for k in range(8)]
                for j, token in enumerate(self.tokens)]
            self.num_kv_blocks = num_kv_blocks
            self.requests: dict[int, list] = {}  # handle -> [tokens known, tokens computed, logprobs asked]
            self.sampled: dict[int, int] = {}    # handle -> tokens sampled for it
            self.sampled_tokens = 0
            self.worker_seconds = 0.0
            self.bytes_sent = 0
            self._position = 0

        def _call_all(self, method, requests):
            raise NotImplementedError("the stub answers plans only")

        def start(self, setup) -> tuple[int, int]:
            return setup.num_kv_blocks or self.num_kv_blocks, 0

        def submit(self, plan) -> None:
            wire = plan.to_pb().SerializeToString()  # the controller's side of sending it
            self.bytes_sent += len(wire)
            began = time.perf_counter()
            answer = self._answer(plan).to_pb().SerializeToString()
            self.worker_seconds += time.perf_counter() - began
            self._results.append(answer)

        def collect(self):
            return StepResult.from_pb(pb.StepResult.FromString(self._results.popleft()))

        def execute(self, plan):
            self.submit(plan)
            return self.collect()

        def check_health(self) -> None:
            """Always healthy: there is no worker to lose."""

        def shutdown(self) -> None:
            """Nothing to release: there is no worker process."""

        def _answer(self, plan):
            requests, sampled = self.requests, self.sampled
            for handle in plan.finished_handles:
                requests.pop(handle, None)
            for new in plan.new_requests:
                spec = getattr(new, "sampling_spec", None) or new.sampling_params  # (renamed)
                requests[new.handle] = [len(new.prompt_token_ids) + len(new.output_token_ids),
                                        new.num_computed_tokens, spec.logprobs]
            for cached in plan.cached_requests:
                state = requests[cached.handle]
                state[0] += len(cached.new_token_ids)
                state[1] = cached.num_computed_tokens
            for handle in plan.decode_handles:
                requests[handle][0] += 1
            result = StepResult(plan.step_id)
            tokens, candidates, position = self.tokens, self.candidates, self._position
            for handle, num_tokens in plan.scheduled():
                state = requests[handle]
                state[1] += num_tokens
                if state[1] != state[0]:
                    continue  # a chunk of a prompt: no token yet
                position = (position + 1) % len(tokens)
                result.sampled_handles.append(handle)
                result.sampled_token_ids.append(tokens[position])
                if state[2] is not None:
                    best = candidates[position]  # the sampled token's logprob, and the `logprobs` best
                    result.logprobs[handle] = SampledLogprobs(best[0][1], dict(best[:state[2]]))
                sampled[handle] = sampled.get(handle, 0) + 1
            self._position = position
            self.sampled_tokens += len(result.sampled_handles)
            return result

    return StubExecutor


class _TokenCostSetup:
    """What every run of `controller_token_cost` shares: the stub checkpoint, its word tokens,
    the prompts (staggered lengths, as in real traffic) and the engine's arguments."""

    def __init__(self, num_requests: int, histories: list[int], measure_tokens: int, logprobs: int | None,
                 block_size: int = 16, seed: int = 0):
        self.num_requests, self.histories, self.measure_tokens = num_requests, sorted(histories), measure_tokens
        # Nothing finishes in a window, and the engine still runs when the consumers of the
        # AsyncEngine, a few tokens behind it, reach a window's end.
        self.max_tokens = self.histories[-1] + measure_tokens + max(32, measure_tokens // 2)
        prompt_lens = [8 + i % 16 for i in range(num_requests)]
        self.max_model_len = 1 << (max(prompt_lens) + self.max_tokens).bit_length()
        self.model_dir = stub_checkpoint(self.max_model_len)
        from transformers import AutoTokenizer

        self.word_ids = word_token_ids(AutoTokenizer.from_pretrained(self.model_dir))
        rng = random.Random(seed)
        self.prompts = [[rng.choice(self.word_ids) for _ in range(n)] for n in prompt_lens]
        blocks_per_request = -(-(max(prompt_lens) + self.max_tokens) // block_size)
        self.engine_kwargs = dict(model=str(self.model_dir), max_model_len=self.max_model_len, block_size=block_size,
                                  num_kv_blocks=int(num_requests * blocks_per_request * 1.05) + 64,
                                  max_num_seqs=max(256, num_requests))
        SamplingParams = importlib.import_module("quire.cluster").SamplingParams  # (public in either layout)
        self.params = lambda: SamplingParams(temperature=0, max_tokens=self.max_tokens, ignore_eos=True,
                                             logprobs=logprobs)

    def engine(self):
        Engine = _cluster("core", "engine").Engine
        EngineConfig = _cluster("core", "config").EngineConfig
        stub = _stub_executor_class()(self.word_ids, self.engine_kwargs["num_kv_blocks"])
        return Engine(EngineConfig.from_kwargs(**self.engine_kwargs), executor=stub), stub

    def close(self) -> None:
        shutil.rmtree(self.model_dir, ignore_errors=True)


def _engine_token_cost(setup: _TokenCostSetup) -> dict:
    """One run in the Engine alone: for each history, step (untimed) until every request has
    that many output tokens, then time `measure_tokens` steps; outputs are dropped."""
    engine, stub = setup.engine()
    try:
        for i, prompt in enumerate(setup.prompts):
            engine.add_request(prompt, setup.params(), request_id=f"request-{i}")
        figures = {}
        for history in setup.histories:
            while len(stub.sampled) < setup.num_requests or min(stub.sampled.values()) < history:
                engine.step()
            tokens, worker = stub.sampled_tokens, stub.worker_seconds
            executing = getattr(engine.stats, "execute_seconds", None)
            wall = 0.0
            for _ in range(setup.measure_tokens):
                began = time.perf_counter()
                engine.step()
                wall += time.perf_counter() - began
            tokens = stub.sampled_tokens - tokens
            figures[history] = {
                "tokens": tokens,
                # All of step(): with the stub, nearly only the controller.
                "step_us_per_token": 1e6 * wall / tokens,
                # step() less the stub's own work (the worker's side): the controller's whole
                # side, serialising the plan and parsing the answer included.
                "controller_us_per_token": 1e6 * (wall - (stub.worker_seconds - worker)) / tokens,
                # step() less all the time inside the executor's submit and collect.
                "outside_executor_us_per_token": None if executing is None else
                1e6 * (wall - (engine.stats.execute_seconds - executing)) / tokens,
            }
        return figures
    finally:
        engine.shutdown()


def _async_token_cost(setup: _TokenCostSetup) -> dict:
    """One run through the AsyncEngine: `num_requests` concurrent `generate` consumers on
    one asyncio loop, each accumulating what it receives as a frontend would (token ids,
    text, logprobs). The window of a history opens when the consumers together have
    received that many tokens per request and closes `measure_tokens` per request later:
    wall time per token received, and the engine loop thread's time inside `step()` (which
    includes its waits for the GIL while the consumers' loop runs)."""
    AsyncEngine = _cluster("serving", "async_engine").AsyncEngine
    engine, stub = setup.engine()
    n = setup.num_requests
    marks = sorted({n * h for h in setup.histories} | {n * (h + setup.measure_tokens) for h in setup.histories})
    # threshold -> (tokens received, perf_counter, engine step seconds, tokens the engine had)
    seen: dict[int, tuple] = {}
    received = [0]

    async def consume(index: int):
        ids, text, logprobs = [], [], []
        stream = aengine.generate(setup.prompts[index], setup.params(), request_id=f"request-{index}")
        try:
            async for output in stream:
                completion = output.outputs[0]
                if hasattr(completion, "delta_token_ids"):  # full outputs carrying their deltas
                    new_ids, new_text = completion.delta_token_ids, completion.delta_text
                else:  # outputs that are the deltas
                    new_ids, new_text = completion.token_ids, completion.text
                ids.extend(new_ids)
                text.append(new_text)
                if completion.logprobs is not None and new_ids:
                    logprobs.extend(completion.logprobs[-len(new_ids):])  # (the whole list's tail, or the delta)
                received[0] += len(new_ids)
                while marks and received[0] >= marks[0]:
                    seen[marks.pop(0)] = (received[0], time.perf_counter(), engine.stats.step_seconds,
                                          stub.sampled_tokens)
                if not marks:
                    break  # the last window closed: the rest is not measured (closing aborts the request)
        finally:
            await stream.aclose()
        return ids, "".join(text), logprobs

    async def run_all():
        return await asyncio.gather(*(consume(i) for i in range(n)))

    aengine = AsyncEngine(engine)
    aengine.start()
    try:
        results = asyncio.run(run_all())
    finally:
        aengine.shutdown()
    tokenizer = engine.tokenizer
    # What each consumer put together: a logprob entry for each token, holding the token; the
    # text of its tokens (text may trail the ids by what the detokenizer holds back).
    consistent = all(len(logprobs) == len(ids) > 0 and ids[0] in logprobs[0]
                     and tokenizer.decode(ids, skip_special_tokens=True).startswith(text) and len(text) > 0
                     for ids, text, logprobs in results)
    figures = {}
    for history in setup.histories:
        start, end = seen[n * history], seen[n * (history + setup.measure_tokens)]
        tokens = end[0] - start[0]
        figures[history] = {"tokens": tokens, "wall_us_per_token": 1e6 * (end[1] - start[1]) / tokens,
                            "engine_step_us_per_token": 1e6 * (end[2] - start[2]) / tokens,
                            # How far the engine was ahead of the consumers as the window opened
                            # and closed (a steady few tokens: the figure is the whole pipeline's).
                            "lag_tokens_per_request": [(start[3] - start[0]) / n, (end[3] - end[0]) / n],
                            "engine_done_within_window": end[3] >= n * setup.max_tokens,
                            "outputs_consistent": consistent}
    return figures


def _summarise(runs: list[dict], keys: list[str]) -> dict:
    summary = {}
    for key in keys:
        values = [run[key] for run in runs if run.get(key) is not None]
        if values:
            summary[f"{key}_median"] = statistics.median(values)
            summary[f"{key}_best"] = min(values)
            summary[f"{key}_spread"] = max(values) / min(values) if min(values) > 0 else None  # worst over best
    return summary


def controller_token_cost(num_requests: int, history: int | list[int], measure_tokens: int, repeats: int = 3,
                          logprobs: int | None = 5, modes: tuple[str, ...] = ("engine", "async_engine")) -> list[dict]:
    """The controller's cost per generated token with `history` output tokens already
    generated per request (an int, or several in one run: each is reached, untimed, then
    timed over `measure_tokens` steps), for `num_requests` running greedy requests with
    `logprobs` each, over the stub executor. Each run starts a fresh engine; the Engine and
    AsyncEngine runs alternate `repeats` times. One row per history: medians, the quickest
    and the spread (worst over best) of the runs' figures, and the runs themselves."""
    histories = [history] if isinstance(history, int) else list(history)
    setup = _TokenCostSetup(num_requests, histories, measure_tokens, logprobs)
    runs = {mode: [] for mode in modes}
    try:
        for _ in range(repeats):
            if "engine" in modes:
                runs["engine"].append(_engine_token_cost(setup))
            if "async_engine" in modes:
                runs["async_engine"].append(_async_token_cost(setup))
    finally:
        setup.close()
    keys = {"engine": ["step_us_per_token", "controller_us_per_token", "outside_executor_us_per_token"],
            "async_engine": ["wall_us_per_token", "engine_step_us_per_token"]}
    rows = []
    for h in setup.histories:
        row = {"running_requests": num_requests, "history": h, "measure_tokens": measure_tokens,
               "logprobs": logprobs, "repeats": repeats}
        for mode in modes:
            mode_runs = [run[h] for run in runs[mode]]
            row[mode] = {**_summarise(mode_runs, keys[mode]), "runs": mode_runs}
        rows.append(row)
    return rows


def token_cost_report(args) -> dict:
    """The figures `--controller-only` gives: the per-token cost at each of `--histories` for
    `--token-requests` requests, and at `--wide-history` for `--wide-requests`; with each
    later history's median over the first's (1.0: flat)."""
    long = controller_token_cost(args.token_requests, args.histories, args.measure_tokens, args.repeats)
    wide = controller_token_cost(args.wide_requests, args.wide_history, args.measure_tokens, args.repeats)
    growth = {}
    first = long[0]
    for row in long[1:]:
        for mode, key in (("engine", "step_us_per_token"), ("engine", "controller_us_per_token"),
                          ("async_engine", "wall_us_per_token"), ("async_engine", "engine_step_us_per_token")):
            name = f"{mode}.{key}_history_{row['history']}_over_{first['history']}"
            growth[name] = {stat: row[mode][f"{key}_{stat}"] / first[mode][f"{key}_{stat}"]
                            for stat in ("median", "best")}
    summary = {}  # "<mode>.<figure>" -> "<requests>@<history>" -> [median, best]
    for row in long + wide:
        for mode, key in (("engine", "step_us_per_token"), ("engine", "controller_us_per_token"),
                          ("async_engine", "wall_us_per_token"), ("async_engine", "engine_step_us_per_token")):
            summary.setdefault(f"{mode}.{key}", {})[f"{row['running_requests']}@{row['history']}"] = [
                row[mode][f"{key}_median"], row[mode][f"{key}_best"]]
    return {"token_cost_summary": summary, "history_growth": growth, "token_cost": long,
            f"token_cost_{args.wide_requests}": wide}
