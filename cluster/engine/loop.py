"""EngineLoop: the in-process EngineClient (client.py). It runs an LLMEngine on a background thread and serves
any number of sync or asyncio callers. Requests join the running batch at the next step; the loop sleeps (no
spinning) when there is no work, waking to heartbeat the MoE backend every ``heartbeat_s``.

``EngineLoop.local`` is the single-process engine (every expert in this process); a Coordinator actor or a Serve
engine replica builds one whose MoE layers go to an expert pool. The same interface through Ray, from a driver
process: workers/cluster_engine.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any, TypeVar

from torch import Tensor

from cluster.engine.api import EngineStats, Prompt, new_request_id
from cluster.engine.client import EngineClient, IntervalS, paced
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.loader import build_local_engine
from cluster.engine.sampling import SamplingParams
from cluster.engine.sequence import Continuation, RequestOutput, RequestResult
from cluster.engine_config import EngineConfig
from cluster.errors import EngineDeadError, RequestFailedError, WorkerFailure

log = logging.getLogger("moe_cluster.engine")
T = TypeVar("T")
MAX_FAILURES_IN_A_ROW = 3  # worker failures without a successful step in between before the engine gives up


class EngineLoop(EngineClient):
    """Owns one engine on one thread. The engine is *built* on that thread too (``build`` runs there), so a
    single thread issues every torch op of the engine: on CPUs, intra-op parallel regions issued from two
    threads of one process slow each other down several-fold."""

    def __init__(self, build: Callable[[], LLMEngine], heartbeat_s: float = 2.0) -> None:
        self.heartbeat_s = heartbeat_s
        self._cond = threading.Condition()
        self._inbox: list[Callable[[], None]] = []
        self._stopping = False
        self._draining = False
        self.dead_reason: str | None = None
        built: concurrent.futures.Future[LLMEngine] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(build, built), name="moe-engine-loop", daemon=True)
        self._thread.start()
        self.engine = built.result()  # re-raises a failed build (bad checkpoint, missing workers, ...)
        self.tokenizer = self.engine.tokenizer
        self.model_config = self.engine.model_cfg
        self.max_model_len = self.engine.max_model_len
        self.input_processor = self.engine.input_processor

    @classmethod
    def local(cls, engine_cfg: EngineConfig) -> EngineLoop:
        """Everything in this process: the reference engine that the cluster engine is tested against."""
        return cls(lambda: build_local_engine(engine_cfg))

    # ------------------------------------------------------------------------------------------ the loop

    def _run(self, build: Callable[[], LLMEngine], built: concurrent.futures.Future[LLMEngine]) -> None:
        try:
            engine = build()
        except BaseException as err:
            built.set_exception(err)
            return
        self.engine = engine
        built.set_result(engine)
        try:
            self._loop()
        except BaseException as err:  # never die silently: mark dead so callers fail instead of hanging
            self._die(f"engine loop crashed: {type(err).__name__}: {err}")
        finally:
            with self._cond:
                if self.dead_reason is None and not self._stopping:
                    self.dead_reason = "the engine loop exited"
                tasks, self._inbox = self._inbox, []
            for task in tasks:  # calls queued while the loop was ending fail now
                task()

    def _loop(self) -> None:
        failures_in_a_row = 0
        last_beat = time.monotonic()  # the last time the MoE backend talked to its workers (step or heartbeat)
        while True:
            with self._cond:
                if not self._inbox and not self._stopping and not self.engine.has_work():
                    # Idle: sleep until a call arrives or the next heartbeat is due. Calls that wake the loop
                    # (stats, health) must not postpone the heartbeat, so the deadline is absolute.
                    self._cond.wait(timeout=max(0.0, last_beat + self.heartbeat_s - time.monotonic()))
                tasks, self._inbox = self._inbox, []
                stopping = self._stopping
            for task in tasks:
                task()
            if stopping:
                return
            try:
                if self.engine.has_work():
                    self.engine.step()
                    last_beat = time.monotonic()
                    failures_in_a_row = 0
                elif time.monotonic() - last_beat >= self.heartbeat_s:
                    self.engine.heartbeat()
                    last_beat = time.monotonic()
            except WorkerFailure as failure:  # an expert worker died or hung: replace it, recompute
                if not self.engine.can_recover:
                    self._die(str(failure))
                    return
                failures_in_a_row += 1
                if failures_in_a_row > MAX_FAILURES_IN_A_ROW:
                    self._die(f"{failure} ({failures_in_a_row} failures without a successful step)")
                    return
                try:
                    self.engine.recover(failure)
                except Exception as err:
                    self._die(f"{failure}; recovery failed: {type(err).__name__}: {err}")
                    return
            except Exception as err:  # any other failed step ends the engine; every request is told why
                self._die(f"{type(err).__name__}: {err}")
                return

    def _die(self, reason: str) -> None:
        log.error("engine failed: %s", reason)
        with self._cond:
            if self.dead_reason is None:
                self.dead_reason = reason
        self.engine.fail_all(reason)

    def call(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Run ``fn`` on the loop thread between steps."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def task() -> None:
            if self.dead_reason is not None or (self._stopping and not self._thread.is_alive()):
                future.set_exception(EngineDeadError(f"the engine is down: {self.dead_reason}"))
                return
            try:
                future.set_result(fn())
            except BaseException as err:
                future.set_exception(err)

        with self._cond:
            if self._stopping:
                raise EngineDeadError("the engine is shutting down")
            if self.dead_reason is not None:
                raise EngineDeadError(f"the engine is down: {self.dead_reason}")
            self._inbox.append(task)
            self._cond.notify()
        return future

    # ------------------------------------------------------------------------------------- engine API

    def _check_alive(self) -> None:
        if self.dead_reason is not None:
            raise EngineDeadError(f"the engine is down: {self.dead_reason}")
        if self._draining:
            raise EngineDeadError("the engine is shutting down and takes no new requests")

    def submit(self, prompts: Sequence[Prompt], params: Sequence[SamplingParams],
               sinks: Sequence[Callable[[RequestOutput], None]],
               request_ids: Sequence[str] | None = None,
               continuations: Sequence[Continuation | None] | None = None) -> concurrent.futures.Future[list[str]]:
        """Tokenize and validate now, in the caller's thread (errors raise here: the input processor), then add
        all requests together at the next step. A request with a continuation resumes one another engine started
        (sequence.Continuation)."""
        self._check_alive()
        ids: list[str | None] = list(request_ids) if request_ids is not None else [None] * len(prompts)
        resumed = list(continuations) if continuations is not None else [None] * len(prompts)
        requests = [self.input_processor.process(prompt, p, rid, continuation)
                    for prompt, p, rid, continuation in zip(prompts, params, ids, resumed, strict=True)]

        def add_all() -> list[str]:
            added: list[str] = []
            try:
                for request, sink in zip(requests, sinks, strict=True):
                    self.engine.add_request(request, sink)
                    added.append(request.request_id)
            except BaseException:
                for rid in added:  # all or nothing
                    self.engine.abort(rid)
                raise
            return added

        return self.call(add_all)

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams]
                 ) -> list[RequestResult]:
        """Run a batch of requests to completion (they share forward steps)."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        outputs: list[list[RequestOutput]] = [[] for _ in prompts]
        done = [threading.Event() for _ in prompts]

        def sink_for(i: int) -> Callable[[RequestOutput], None]:
            def sink(out: RequestOutput) -> None:
                outputs[i].append(out)
                if out.finished:
                    done[i].set()
            return sink

        self.submit(prompts, plist, [sink_for(i) for i in range(len(prompts))]).result()
        for event in done:
            event.wait()
        for outs in outputs:
            if outs[-1].error is not None:
                raise RequestFailedError(outs[-1].error)
        return [RequestResult.fold(outs) for outs in outputs]

    async def stream_batches(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None,
                             interval_s: IntervalS | None = None, continuation: Continuation | None = None,
                             whole: bool = False) -> AsyncGenerator[list[RequestOutput], None]:
        loop = asyncio.get_running_loop()
        reports: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        rid = request_id or new_request_id()
        held: list[RequestOutput] = []  # whole: the reports after the first, on the engine's thread until the last
        delivered_first = False

        def put_all(outputs: list[RequestOutput]) -> None:  # on the consumer's loop: one wake-up, one batch (paced)
            for out in outputs:
                reports.put_nowait(out)

        def sink(out: RequestOutput) -> None:  # on the engine's thread, at every step of the request
            nonlocal delivered_first
            if whole and delivered_first and not out.finished and out.error is None:
                held.append(out)
                return
            delivered_first = True
            outputs = [*held, out]
            held.clear()
            if not loop.is_closed():  # the consumer may be gone; its request is being aborted
                loop.call_soon_threadsafe(put_all, outputs)

        await asyncio.wrap_future(self.submit([prompt], [params], [sink], [rid], [continuation]))
        finished = False
        try:
            async with contextlib.aclosing(paced(reports, interval_s)) as batches:
                async for batch in batches:
                    finished = batch[-1].finished
                    yield batch
        finally:
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        if self.dead_reason is None and not self._stopping:
            self.call(lambda: self.engine.abort(request_id))

    def score(self, token_lists: Sequence[Sequence[int]]) -> list[Tensor]:
        """Full-sequence logits for each token list (for parity checks and prompt scoring)."""
        self._check_alive()
        return self.call(lambda: self.engine.score(token_lists)).result()

    def stats(self) -> EngineStats:
        self._check_alive()
        return self.call(self.engine.stats).result()

    def health(self) -> dict[str, Any]:
        alive = self.dead_reason is None and not self._stopping and not self._draining
        reason = self.dead_reason or ("draining" if self._draining else None)
        return {"alive": alive, "reason": reason}

    def drain(self, timeout_s: float) -> bool:
        """Refuse new requests, let the running ones finish (up to ``timeout_s``). True if all finished; at
        the deadline, every request still running ends with a "the server is shutting down" error."""
        self._draining = True
        deadline = time.monotonic() + timeout_s
        while self.dead_reason is None:
            if not self.call(lambda: self.engine.has_work()).result():
                return True
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        message = (f"the server is shutting down: the request did not finish within the drain deadline "
                   f"({timeout_s:g} s); retry")
        with contextlib.suppress(EngineDeadError):  # the engine failed meanwhile: its requests were told why
            self.call(lambda: self.engine.fail_all(message)).result()
        return False

    def shutdown(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)
        self.engine.moe.close()

