"""What the gateway keeps to resume a generation on another engine replica when the one serving it dies.

Per generation in flight, ``Progress`` records what the client has been given - per sample, the tokens, the
characters of text and whether it finished - as the chunks pass through the gateway (a chunk is recorded before
it is handed on, and everything handed on reaches the client in order). On the replica's death, ``resumed``
makes the request another replica continues: the request itself when nothing had come yet, else its
continuation form (cluster.engine.sequence.Continuation), after which the new replica sends only what comes next.
``with_seed`` pins the seed the first replica's input processor resolved (drawn there when the request gave none,
reported in ``Accepted``), so that unseeded requests resume exactly too: no seed is drawn here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from cluster.engine.sequence import Continuation, RequestOutput, SampleSoFar
from router_service.engine_api import GenerateRequest


def with_seed(request: GenerateRequest, seed: int | None) -> GenerateRequest:
    """``request``, with the seed its engine samples it with when it gave none (greedy requests need none)."""
    params = request.params
    if params.greedy or params.seed is not None or seed is None:
        return request
    return replace(request, params=replace(params, seed=seed))


@dataclass
class Progress:
    """What the client has been given of one generation, per sample index."""

    token_ids: list[list[int]]
    text_chars: list[int]
    finished: list[bool]
    chunks: int = 0
    done: bool = False  # the last chunk came: nothing is left to resume

    @classmethod
    def of(cls, request: GenerateRequest) -> Progress:
        n = request.params.n
        return cls([[] for _ in range(n)], [0] * n, [False] * n)

    def record(self, chunk: RequestOutput) -> None:
        self.chunks += 1
        self.done = self.done or chunk.finished
        for choice in chunk.outputs:
            self.token_ids[choice.index].extend(choice.token_ids)
            self.text_chars[choice.index] += len(choice.text)
            self.finished[choice.index] = self.finished[choice.index] or choice.finish_reason is not None

    @property
    def num_tokens(self) -> int:
        return sum(len(ids) for ids in self.token_ids)

    def continuation(self) -> Continuation:
        return Continuation(tuple(SampleSoFar(tuple(ids), chars, done) for ids, chars, done
                                  in zip(self.token_ids, self.text_chars, self.finished, strict=True)))


def resumed(request: GenerateRequest, progress: Progress) -> GenerateRequest:
    """What another replica is asked for: ``request`` again when no chunk had come (the client has nothing yet,
    not even the prompt echo), else its continuation from ``progress``."""
    if not progress.chunks:
        return request
    return replace(request, continuation=progress.continuation())
