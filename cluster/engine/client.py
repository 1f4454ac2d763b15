"""The one engine client: what every caller of an engine uses (the CLI, a Serve engine replica, benchmarks, tests),
after vLLM v1's engine/core_client.py. Two implementations: in-process (cluster/engine/loop.py: EngineLoop, over an
engine with its experts in-process or behind an expert pool) and through Ray (workers/cluster_engine.py:
ClusterEngine, whose engine runs in a Coordinator actor, cluster/engine/coordinator.py). ``paced`` is the one
stream pacing both use, so a stream is coalesced the same way wherever its engine runs.
"""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import TYPE_CHECKING, Any

from cluster.errors import RequestFailedError

if TYPE_CHECKING:
    from torch import Tensor

    from cluster.engine.api import EngineStats, Prompt
    from cluster.engine.sampling import SamplingParams
    from cluster.engine.sequence import Continuation, RequestOutput, RequestResult
    from cluster.model.config import ModelConfig
    from cluster.model.tokenizer import Tokenizer

IntervalS = Callable[[], float]  # seconds a paced stream waits between two items (asked before each wait)


class EngineClient(ABC):
    """Generate a batch, stream one request (paced, or resumed from a continuation), abort, score, stats,
    health, drain, shutdown."""

    tokenizer: Tokenizer
    model_config: ModelConfig
    max_model_len: int

    @abstractmethod
    def generate(self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams]
                 ) -> list[RequestResult]:
        """Run a batch of requests to completion (they share forward steps)."""

    @abstractmethod
    def stream_batches(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None,
                       interval_s: IntervalS | None = None, continuation: Continuation | None = None,
                       whole: bool = False) -> AsyncGenerator[list[RequestOutput], None]:
        """Reports of one request as they come, coalesced (see ``paced``). A bad request raises at the first
        item; leaving the iteration early aborts the request. With ``continuation``, the rest of a request
        another engine started (sequence.Continuation). With ``whole`` (a consumer that wants the answer whole),
        two items: the first report, then all the others together once the request finishes; the engine holds
        them meanwhile, so its consumer is not woken at every step."""

    def stream(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None,
               continuation: Continuation | None = None) -> AsyncGenerator[RequestOutput, None]:
        """Reports of one request as they come, one at a time."""
        return each_output(self.stream_batches(prompt, params, request_id, continuation=continuation))

    @abstractmethod
    def abort(self, request_id: str) -> None: ...

    @abstractmethod
    def score(self, token_lists: Sequence[Sequence[int]]) -> list[Tensor]:
        """Full-sequence logits for each token list (parity checks, prompt scoring)."""

    @abstractmethod
    def stats(self) -> EngineStats: ...

    @abstractmethod
    def health(self) -> dict[str, Any]:
        """{"alive": bool, "reason": str | None}; never raises."""

    @abstractmethod
    def drain(self, timeout_s: float) -> bool:
        """Refuse new requests, let the running ones finish (up to ``timeout_s``); True if all finished."""

    @abstractmethod
    def shutdown(self) -> None: ...


async def each_output(batches: AsyncGenerator[list[RequestOutput], None]) -> AsyncGenerator[RequestOutput, None]:
    """A stream of batches, one output at a time; closing it closes (and so aborts) the stream of batches."""
    async with contextlib.aclosing(batches) as stream:
        async for batch in stream:
            for out in batch:
                yield out


def _ends(item: RequestOutput | BaseException) -> bool:
    return isinstance(item, BaseException) or item.finished


async def paced(reports: asyncio.Queue[RequestOutput | BaseException], interval_s: IntervalS | None
                ) -> AsyncGenerator[list[RequestOutput], None]:
    """The reports of one request from ``reports``, coalesced: each item holds every report that arrived since the
    last one. With ``interval_s``, items after the first are at least ``interval_s()`` apart, except the last,
    which comes at once. An exception in the queue, or a report carrying an error, is raised. Ends after the
    finished report."""
    loop = asyncio.get_running_loop()
    finished, sent_at = False, None
    while not finished:
        batch = [await reports.get()]
        if interval_s is not None and sent_at is not None:
            send_at = sent_at + interval_s()
            while not _ends(batch[-1]) and (wait := send_at - loop.time()) > 0:
                try:  # Queue.get is cancellation-safe: a timed-out get leaves the item queued
                    batch.append(await asyncio.wait_for(reports.get(), wait))
                except asyncio.TimeoutError:
                    break
        while not _ends(batch[-1]) and not reports.empty():
            batch.append(reports.get_nowait())
        outputs: list[RequestOutput] = []
        for item in batch:
            if isinstance(item, BaseException):
                raise item
            if item.error is not None:
                raise RequestFailedError(item.error)
            outputs.append(item)
        finished = outputs[-1].finished
        yield outputs
        sent_at = loop.time()
