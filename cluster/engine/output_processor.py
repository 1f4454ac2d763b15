"""What happens to a sampled token: append it, detokenize it, decide whether the sample is finished (stop
token, EOS, stop string, length), and build the report a request's consumer receives (text deltas held back
while they could still grow into a stop string; token texts attached to logprobs, the prompt's text to an echo),
the RequestOutput that goes unchanged to the wire adapters. No model math and no cache: the engine calls it
after a step.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence

from cluster.engine.sampling import TokenLogprob
from cluster.engine.sequence import (
    FINISH_LENGTH,
    FINISH_STOP,
    CompletionOutput,
    Request,
    RequestOutput,
    SampleSoFar,
    Seq,
)
from cluster.errors import RequestError
from cluster.model.tokenizer import Tokenizer


class OutputProcessor:
    def __init__(self, eos_ids: Collection[int], tokenizer: Tokenizer) -> None:
        self.eos_ids = frozenset(eos_ids)
        self.tokenizer = tokenizer

    def with_texts(self, logprobs: list[TokenLogprob]) -> list[TokenLogprob]:
        """``logprobs`` with the text of each token attached."""
        text = self.tokenizer.token_text
        for lp in logprobs:
            lp.text, lp.top_texts = text(lp.token_id), [text(t) for t, _ in lp.top]
        return logprobs

    def append_token(self, seq: Seq, token: int, logprob: TokenLogprob | None) -> None:
        """Add ``token`` to ``seq``, extend its text, and finish it when a stop condition is met."""
        params = seq.request.params
        seq.token_ids.append(token)
        if logprob is not None:
            seq.pending_logprobs.append(logprob)
        # Before min_tokens, nothing stops it but the length (vLLM's stop checker); stop tokens are banned then.
        check_stops = seq.num_generated >= params.min_tokens
        if check_stops and token in params.stop_token_ids:
            if params.include_stop_str_in_output:
                seq.text += seq.detok.add(token)
            _finish(seq, FINISH_STOP, token)
        elif check_stops and not params.ignore_eos and token in self.eos_ids:
            _finish(seq, FINISH_STOP, None)
        else:
            before = len(seq.text)
            seq.text += seq.detok.add(token)
            cut = check_stops and _cut_at_stop_string(seq, before, params.include_stop_str_in_output)
            if not cut and seq.num_generated >= seq.request.max_tokens:
                _finish(seq, FINISH_LENGTH, None)

    @staticmethod
    def replay(seq: Seq, sample: SampleSoFar) -> None:
        """Rebuild the output state of an open sample that another engine started (a continuation): its tokens,
        and its text as that engine's detokenizer had it (replayed the same way, so held-back characters and stop
        strings go on exactly), with every token and the first ``text_chars`` characters already reported. None
        of its tokens ended it there, so none ends it here."""
        for token in sample.token_ids:
            seq.token_ids.append(token)
            seq.text += seq.detok.add(token)
        if sample.text_chars > len(seq.text):
            raise RequestError(f"continuation sample {seq.index}: {sample.text_chars} characters were delivered but "
                               f"its tokens make only {len(seq.text)}", "continuation")
        seq.emitted_chars, seq.emitted_tokens = sample.text_chars, len(sample.token_ids)

    def build_output(self, request: Request, seqs: Sequence[Seq], finished: bool, error: str | None = None
                     ) -> RequestOutput:
        """The report of what ``seqs`` produced since the last one; the first report carries the prompt."""
        deltas = []
        for seq in seqs:
            done = seq.finish_reason is not None
            end = len(seq.text) if done else len(seq.text) - stop_holdback(seq.text, request.params.stop)
            text = seq.text[seq.emitted_chars:max(end, seq.emitted_chars)]
            new_tokens = seq.token_ids[seq.num_prompt_tokens + seq.emitted_tokens:]
            seq.emitted_chars += len(text)
            seq.emitted_tokens += len(new_tokens)
            logprobs = self.with_texts(seq.pending_logprobs) if request.params.logprobs is not None else None
            seq.pending_logprobs = []
            deltas.append(CompletionOutput(seq.index, text, new_tokens, logprobs, seq.finish_reason,
                                           seq.stop_reason))
        out = RequestOutput(request.request_id, deltas, finished=finished,
                            num_prompt_tokens=len(request.prompt_ids),
                            num_generated_tokens=request.num_generated, error=error)
        if not request.sent_prompt:
            request.sent_prompt = True
            out.prompt_token_ids = list(request.prompt_ids)
            out.seed = request.seed
            if request.params.echo:
                out.prompt_text = (request.prompt_text if request.prompt_text is not None else
                                   self.tokenizer.decode(request.prompt_ids, skip_special_tokens=False))
            if request.prompt_logprobs is not None:
                out.prompt_logprobs = [None if lp is None else self.with_texts([lp])[0]
                                       for lp in request.prompt_logprobs]
        if finished:
            request.metrics.finished_time = time.monotonic()
            out.metrics = request.metrics
        return out


def _finish(seq: Seq, reason: str, stop_reason: str | int | None) -> None:
    if seq.finish_reason is None:
        seq.finish_reason, seq.stop_reason = reason, stop_reason


def _cut_at_stop_string(seq: Seq, before: int, keep_stop: bool = False) -> bool:
    """If the text (new since ``before``) completes a stop string, cut the text there (after the stop string with
    ``keep_stop``: include_stop_str_in_output) and finish. True if so."""
    stops = seq.request.params.stop
    if not stops:
        return False
    longest = max(len(s) for s in stops)
    search_from = max(0, before - longest + 1)
    hits = [(i, s) for s in stops if (i := seq.text.find(s, search_from)) != -1]
    if not hits:
        return False
    index, stop = min(hits)
    seq.text = seq.text[:index + len(stop) if keep_stop else index]
    _finish(seq, FINISH_STOP, stop)
    return True


def stop_holdback(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that could still grow into a stop string."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return hold
