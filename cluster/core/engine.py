"""The engine: admits requests, steps the scheduler and executor, detokenises, stops.

Synchronous and single-threaded by contract: `add_request`, `abort` and `step` must be
called from one thread at a time (the async server wraps it in one loop thread).
"""
from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

from quire.cluster.core.block_hash import check_cache_salt
from quire.cluster.core.block_pool import BlockPool
from quire.cluster.core.config import EngineConfig
from quire.cluster.core.detokenizer import IncrementalDetokenizer
from quire.cluster.executor.base import Executor, WorkerFailure, WorkerSetup
from quire.cluster.core.kv_cache_manager import KVCacheManager
from quire.cluster.core.kv_events import KVEventLog
from quire.cluster.core.model_info import ModelInfo
from quire.cluster.core.outputs import CompletionOutput, RequestOutput
from quire.cluster.core.parallel_sampling import ParentRequest
from quire.cluster.core.request import Request, RequestStatus
from quire.cluster.core.scheduler import Scheduler
from quire.protos.step import NewRequestData, SamplingParams, StepPlan

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    num_steps: int = 0
    forward_seconds: float = 0.0       # worker-reported model forward + sampling time
    step_seconds: float = 0.0          # wall time inside step()
    execute_seconds: float = 0.0       # wall time in the executor (forward + transport, less what overlaps)
    generated_tokens: int = 0
    prompt_tokens: int = 0
    finished: dict[str, int] = field(default_factory=dict)


class Engine:
    def __init__(self, config: EngineConfig, executor: Executor | None = None):
        self.config = config
        self.info = ModelInfo.load(config.model)
        self.tokenizer = self.info.tokenizer
        self.max_model_len = self.info.max_model_len
        dist_init_method = ""
        # Only workers the engine started itself can be started again after one dies (workers
        # started by hand at `worker_addresses` are their supervisor's to restart).
        self._restarts_left = (config.parallel.max_worker_restarts
                               if executor is None and not config.parallel.worker_addresses else 0)
        self.num_worker_restarts = 0
        if executor is None:
            from quire.cluster.executor.launch import create_executor

            executor, dist_init_method = create_executor(config.parallel)
        self.executor = executor
        self.failure: WorkerFailure | None = None
        # Steps launched, results not yet collected, oldest first: up to two with asynchronous
        # scheduling (on by default where the workers run apart from the controller).
        self._in_flight: deque[StepPlan] = deque()
        async_scheduling = config.scheduler.async_scheduling
        self._pipeline_depth = 2 if (executor.runs_apart if async_scheduling is None else async_scheduling) else 1
        started = time.perf_counter()
        self._setup = WorkerSetup(
            model_path=str(self.info.path), dtype=self.info.dtype, seed=config.model.seed,
            max_model_len=self.max_model_len, block_size=config.cache.block_size,
            max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
            max_num_seqs=config.scheduler.max_num_seqs, enforce_eager=config.model.enforce_eager,
            kv_cache_memory=config.cache.kv_cache_memory or 0,
            gpu_memory_utilization=config.cache.gpu_memory_utilization,
            num_kv_blocks=config.cache.num_kv_blocks,
            dist_init_method=dist_init_method, kv_cache_dtype=config.cache.kv_cache_dtype,
            # One host pool per rank, shared by swap preemption and the prefix cache's host tier.
            swap_space=(config.cache.swap_space if config.cache.preemption_mode == "swap" else 0)
            + config.cache.kv_host_memory)
        try:
            num_blocks, num_cpu_blocks = self.executor.start(self._setup)
            if config.cache.kv_host_memory and not num_cpu_blocks:
                raise ValueError(f"`kv_host_memory` ({config.cache.kv_host_memory} bytes) holds no KV block on "
                                 "some rank; give it at least one block's bytes")
        except BaseException:
            self.executor.shutdown()
            raise
        self.block_size = config.cache.block_size
        # The prefix cache's changes, for a router mirroring this replica (None: not published).
        self.kv_events = KVEventLog() if config.cache.kv_events else None
        hash_seed = bytes.fromhex(config.cache.hash_seed) if config.cache.hash_seed else None
        self.kv = KVCacheManager(BlockPool(num_blocks, events=self.kv_events), self.block_size,
                                 enable_prefix_caching=config.cache.enable_prefix_caching,
                                 cpu_pool=BlockPool(num_cpu_blocks) if num_cpu_blocks else None,
                                 hash_seed=hash_seed, host_tier=config.cache.kv_host_memory > 0)
        self.scheduler = Scheduler(config.scheduler, self.kv, preemption_mode=config.cache.preemption_mode)
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        self.parents: dict[str, ParentRequest] = {}              # by the caller's request id
        self._samples: dict[str, tuple[ParentRequest, int]] = {}  # live sample id → its parent and index
        self.stats = EngineStats()
        logger.info("engine ready in %.1fs: %d KV blocks x %d tokens = %d tokens; %.1f requests of max_model_len=%d fit",
                    time.perf_counter() - started, num_blocks, self.block_size, num_blocks * self.block_size,
                    num_blocks * self.block_size / self.max_model_len, self.max_model_len)

    # -- admission ---------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None,
                    priority: int = 0, cache_salt: str | None = None,
                    resume_token_ids: list[int] | None = None) -> str:
        """Validate and queue a request with its `params.n` samples; raises ValueError naming
        the bad field, queuing nothing. Returns the request id (`step` reports under it).

        `cache_salt`: only requests with the same salt share cached prefixes. The samples
        after the first fork its prompt's KV blocks instead of computing them again.

        `resume_token_ids`: continue a generation another engine started (a migrated stream;
        `n` must be 1): they are the request's first output tokens, already delivered, so
        they count against `max_tokens`, enter penalties and seeded noise by their output
        positions (the stream goes on as it would have there) and are not streamed again;
        their KV is computed here like a preempted request's."""
        params = params or SamplingParams()
        params.validate(vocab_size=self.info.vocab_size)
        resumed = self._check_resume(resume_token_ids, params)
        parent = ParentRequest(request_id or uuid.uuid4().hex, params)
        for taken in (parent.request_id, *parent.sample_ids):
            if taken in self.parents or taken in self._samples:
                raise ValueError(f"`request_id` {taken!r} is already in use")
        prompt_text = prompt if isinstance(prompt, str) else None
        token_ids = self.info.encode(prompt)
        if len(token_ids) + len(resumed) + 1 > self.max_model_len:
            raise ValueError(f"`prompt` has {len(token_ids)} tokens (and {len(resumed)} resumed); with at least one "
                             f"output token it exceeds max_model_len={self.max_model_len}")
        longest = min(len(token_ids) + params.max_tokens, self.max_model_len)
        if self.kv.blocks_for(longest) > self.kv.pool.num_blocks:
            raise ValueError(f"`max_tokens`: prompt ({len(token_ids)}) + max_tokens ({params.max_tokens}) needs "
                             f"{self.kv.blocks_for(longest)} KV blocks; the cache holds {self.kv.pool.num_blocks}")
        check_cache_salt(cache_salt)
        if self.tokenizer is None and any(params.stop):
            raise ValueError("`stop` strings need a tokenizer, and this engine was started with --skip-tokenizer-init "
                             "(skip_tokenizer_init=True); use `stop_token_ids`")
        self._check_encodable(token_ids, params, resumed)
        leader = None
        for index, sample_id in enumerate(parent.sample_ids):
            sample_params = parent.sample_params(index)
            request = Request(sample_id, token_ids, sample_params, prompt=prompt_text, priority=priority,
                              cache_salt=cache_salt, output_token_ids=list(resumed),
                              max_num_tokens=min(len(token_ids) + params.max_tokens, self.max_model_len))
            request.fork_of, leader = leader, leader or request
            detokenizer = IncrementalDetokenizer(
                self.tokenizer, token_ids, params.stop, params.include_stop_str_in_output, params.skip_special_tokens)
            if resumed:
                # The text of the resumed tokens was streamed by the engine that made them: the
                # same tokens through the same detokenizer release the same text, dropped here.
                if detokenizer.append(resumed) is not None:
                    raise ValueError("`resume_token_ids` already end the output with a stop string")
                detokenizer.take_delta(False)
            self.detokenizers[sample_id] = detokenizer
            self._samples[sample_id] = (parent, index)
            self.scheduler.add_request(request)
        self.parents[parent.request_id] = parent
        self.stats.prompt_tokens += len(token_ids)
        return parent.request_id

    def _check_resume(self, resume_token_ids, params: SamplingParams) -> list[int]:
        """The resumed output tokens as a list (empty without any), or ValueError naming the field."""
        if resume_token_ids is None:
            return []
        if params.n != 1:
            raise ValueError(f"`resume_token_ids` continue one sample: `n` must be 1 (got {params.n})")
        if not isinstance(resume_token_ids, (list, tuple)) or not all(
                type(token) is int and 0 <= token < self.info.vocab_size for token in resume_token_ids):
            raise ValueError(f"`resume_token_ids` must be token ids in [0, {self.info.vocab_size})")
        if len(resume_token_ids) >= params.max_tokens:
            raise ValueError(f"`resume_token_ids` hold {len(resume_token_ids)} tokens: nothing is left of "
                             f"max_tokens={params.max_tokens}")
        return list(resume_token_ids)

    @staticmethod
    def _check_encodable(token_ids: list[int], params: SamplingParams, output_token_ids: list[int] = ()) -> None:
        """What the workers will be sent must encode: the limits above should guarantee it, and a
        value that slipped past them is refused here, at admission, rather than failing a step."""
        try:
            NewRequestData(0, "", token_ids, params, [], 0, list(output_token_ids)).to_pb()
        except (ValueError, TypeError) as error:
            raise ValueError(f"`sampling_params`: the request cannot be encoded for the workers ({error})") from None

    def abort(self, request_id: str) -> bool:
        """Finish a request's unfinished samples as aborted and free their blocks. Returns
        whether the request was live."""
        parent = self.parents.pop(request_id, None)
        if parent is None:
            return False
        for sample_id in parent.live_sample_ids:
            self._end_sample(sample_id, RequestStatus.FINISHED_ABORTED)
        return True

    def _end_sample(self, sample_id: str, status: RequestStatus) -> None:
        """Finish one sample (freeing its blocks) and forget it; its parent's bookkeeping is the caller's."""
        self.detokenizers.pop(sample_id, None)
        self._samples.pop(sample_id, None)
        self.scheduler.finish_request(sample_id, status)
        self.stats.finished[status.value] = self.stats.finished.get(status.value, 0) + 1

    def has_unfinished(self) -> bool:
        """Whether `step` has work: live requests, or a step in flight to collect (one planned
        for requests that have stopped since; the workers must not be left holding it)."""
        return self.scheduler.num_unfinished > 0 or bool(self._in_flight)

    # -- stepping ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Collect the oldest step in flight and return an output for each request that got a
        token from it. With asynchronous scheduling the next step is planned and launched
        first, so the workers compute it while the controller handles this one's tokens (its
        plan names the tokens still unknown here by placeholder); a request that stops on
        a token then has one more token computed, and dropped."""
        started = time.perf_counter()
        while len(self._in_flight) < self._pipeline_depth:
            plan = self.scheduler.schedule()
            if not plan.has_work:
                break
            if self.failure is not None:
                raise self.failure
            submitting = time.perf_counter()
            self.executor.submit(plan)  # runs the step, for an executor whose workers do not run apart
            self.stats.execute_seconds += time.perf_counter() - submitting
            self._in_flight.append(plan)
        if not self._in_flight:
            return []
        plan = self._in_flight.popleft()
        executing = time.perf_counter()
        try:
            result = self.executor.collect()
        except WorkerFailure as failure:
            self._in_flight.clear()
            self._on_worker_failure(failure)  # raises unless fresh workers took over
            return []
        self.stats.execute_seconds += time.perf_counter() - executing
        self.stats.forward_seconds += result.forward_seconds
        outputs: dict[str, RequestOutput] = {}  # by parent: one output per request and step
        updated = self.scheduler.update_from_output(plan, result)
        self.stats.generated_tokens += len(updated)
        for request in updated:
            if request.request_id not in self._samples:
                continue  # a sibling failed earlier in this loop, ending the whole request
            if request.first_token_time is None:
                request.first_token_time = time.monotonic()
            try:
                self._emit(outputs, request, self._process_token(request, request.output_token_ids[-1]))
            except Exception as error:  # noqa: BLE001 - its detokenisation or stop check: its own failure
                logger.exception("request %s failed processing its output", request.request_id)
                self._fail(outputs, request, f"processing its output failed: {type(error).__name__}: {error}",
                           undelivered=request.output_token_ids[-1:])
        for handle, error in result.errors.items():
            request = self.scheduler.by_handle.get(handle)
            if request is not None:  # (else it ended while the step ran)
                logger.warning("request %s failed in step %d: %s", request.request_id, plan.step_id, error)
                self._fail(outputs, request, error)
        self.stats.num_steps += 1
        self.stats.step_seconds += time.perf_counter() - started
        return list(outputs.values())

    def _emit(self, outputs: dict[str, RequestOutput], request: Request, completion: CompletionOutput) -> None:
        """Add a sample's delta to its request's output of this step; a finished sample is
        forgotten, and the request's output is final once all of its samples are."""
        parent, index = self._samples[request.request_id]
        completion.index = index
        output = self._output_of(outputs, parent, request)
        output.outputs.append(completion)
        if completion.finish_reason is not None:
            del self._samples[request.request_id]
            if parent.finish_sample(request.request_id):
                output.finished = True
                self.parents.pop(parent.request_id, None)

    def check_workers(self) -> None:
        """Recover from a worker death the executor noticed while no step ran (raises
        WorkerFailure when no restart is left)."""
        failure = getattr(self.executor, "failure", None)
        if failure is not None and self.failure is None:
            self._on_worker_failure(failure)

    def _on_worker_failure(self, failure: WorkerFailure) -> None:
        """Bring fresh workers up and replay every request from its tokens; or, with no
        restart left (or if that fails too), end every request now, freeing its blocks,
        rather than leave any waiting, and raise the failure."""
        if self._restarts_left > 0:
            self._restarts_left -= 1
            logger.error("%s; restarting the workers and replaying %d requests (%d restarts left)", failure,
                         self.scheduler.num_unfinished, self._restarts_left)
            try:
                self._restart_workers()
                return
            except Exception as error:  # noqa: BLE001 - reported below, with the original failure
                logger.exception("restarting the workers failed")
                failure = WorkerFailure(f"{failure}; restarting the workers failed: {error}")
        self.failure = failure
        for request_id in list(self.parents):
            self.abort(request_id)
        raise failure

    def _restart_workers(self) -> None:
        from dataclasses import replace

        from quire.cluster.executor.launch import create_executor

        self.executor.shutdown()  # whatever is left of the old workers
        self.executor, dist_init_method = create_executor(self.config.parallel)
        try:
            # The same block count as before, so block ids keep their meaning for the new pools.
            num_blocks, _ = self.executor.start(replace(self._setup, dist_init_method=dist_init_method,
                                                        num_kv_blocks=self.kv.pool.num_blocks))
        except BaseException:
            self.executor.shutdown()  # no half-started workers left behind
            raise
        if num_blocks != self.kv.pool.num_blocks:
            raise WorkerFailure(f"the new workers hold {num_blocks} KV blocks, not {self.kv.pool.num_blocks}")
        self.scheduler.forget_worker_state()
        self.num_worker_restarts += 1

    @staticmethod
    def _output_of(outputs: dict[str, RequestOutput], parent: ParentRequest, request: Request) -> RequestOutput:
        """This step's output of `parent` (created on its first sample's news)."""
        output = outputs.get(parent.request_id)
        if output is None:
            output = outputs[parent.request_id] = RequestOutput(parent.request_id, request.prompt,
                                                                request.prompt_token_ids, [])
        return output

    def _fail(self, outputs: dict[str, RequestOutput], request: Request, error: str,
              undelivered: list[int] = ()) -> None:
        """End the request a sample failed on its own, with all its samples, freeing their
        blocks (the workers drop them with the next plan); its final output carries the
        error, and the sample's `undelivered` token ids (those whose processing failed).
        The other requests go on."""
        parent, index = self._samples[request.request_id]
        output = self._output_of(outputs, parent, request)
        output.outputs.append(CompletionOutput(index=index, text="", token_ids=list(undelivered), finish_reason="error"))
        output.finished, output.error = True, error
        self.parents.pop(parent.request_id, None)
        for sample_id in parent.live_sample_ids:
            parent.finish_sample(sample_id)
            status = RequestStatus.FINISHED_ERROR if sample_id == request.request_id else RequestStatus.FINISHED_ABORTED
            self._end_sample(sample_id, status)

    def _stop_reason(self, request: Request, token_id: int, stop_string: str | None):
        params = request.sampling_params
        if stop_string is not None:
            return RequestStatus.FINISHED_STOPPED, stop_string
        if not params.ignore_eos and token_id in self.info.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED, None
        if token_id in params.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED, token_id
        if len(request.output_token_ids) >= params.max_tokens or request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH, None
        return None, None

    def _process_token(self, request: Request, token_id: int) -> CompletionOutput:
        """Detokenise a sample's new token and check its stops, finishing it (freeing its
        blocks) when one is met. Returns the sample's delta, its index still to be set.
        Costs the same whatever the sample's length: nothing here copies its sequence."""
        detok = self.detokenizers[request.request_id]
        stop_string = detok.append([token_id])
        status, stop_reason = self._stop_reason(request, token_id, stop_string)
        finished = status is not None
        if finished:
            self.scheduler.finish_request(request.request_id, status)
            self.detokenizers.pop(request.request_id)
            self.stats.finished[status.value] = self.stats.finished.get(status.value, 0) + 1
        return CompletionOutput(
            index=0, text=detok.take_delta(finished), token_ids=[token_id],
            finish_reason=status.value if finished else None, stop_reason=stop_reason,
            logprobs=None if request.sampling_params.logprobs is None
            else [request.latest_logprobs] if request.latest_logprobs is not None else [])

    @property
    def kv_usage(self) -> float:
        return self.kv.pool.usage

    def shutdown(self) -> None:
        self.executor.shutdown()
