"""Structured output: a grammar (JSON schema, any JSON, regex, choice, EBNF) constrains what a request may
generate, as a token bitmask applied to its logits row at every step (xgrammar: chosen by measurement, see
bench/grammar_mask.py: about 0.15 ms per step for 32 rows of a JSON schema on this vocabulary).

- ``StructuredOutput``: what a request asks for (a field of SamplingParams; plain data, no xgrammar here, so the
  request models that build it stay light).
- ``GrammarConstraints``: one per engine. Compiles each distinct spec once (cached), keeps one matcher per
  constrained sequence, fills one batched bitmask per step and applies it in place, and advances the matchers
  with the sampled tokens. A matcher is created on a sequence's first constrained step and fed the tokens the
  sequence already has after its prompt, so preempted, recomputed, resumed (continuation) and forked (n > 1)
  sequences all start from the right grammar state without special cases.

Shape legend: B rows sampled this step, V vocabulary, W = ceil(V / 32) bitmask words.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from cluster.errors import RequestError

if TYPE_CHECKING:
    from cluster.model.tokenizer import Tokenizer

log = logging.getLogger("moe_cluster.engine")

KINDS = ("json", "json_object", "regex", "choice", "grammar")
MAX_SPEC_CHARS = 64_000
COMPILE_CACHE_SIZE = 256  # compiled grammars kept (distinct specs); xgrammar's own cache sits below this one


@dataclass(frozen=True)
class StructuredOutput:
    """What a request's output must match. ``kind``: "json" (``spec`` a JSON schema, as text), "json_object"
    (any JSON object; ``spec`` empty), "regex", "choice" (``spec`` a JSON list of strings), "grammar" (EBNF, as
    xgrammar and vLLM's ``guided_grammar`` take it). ``param``: the request parameter it came from, named by
    errors."""

    kind: str
    spec: str = ""
    param: str = "response_format"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{self.param}: the structured output kind must be one of {list(KINDS)}, got "
                             f"{self.kind!r}")
        if not isinstance(self.spec, str) or len(self.spec) > MAX_SPEC_CHARS:
            raise ValueError(f"{self.param} must be a string of at most {MAX_SPEC_CHARS} characters")

    @classmethod
    def choice(cls, options: Sequence[str], param: str = "guided_choice") -> StructuredOutput:
        if not options or not all(isinstance(o, str) for o in options):
            raise ValueError(f"{param} must be a non-empty list of strings")
        return cls("choice", json.dumps(list(options)), param)

    @classmethod
    def json_schema(cls, schema: Any, param: str = "response_format") -> StructuredOutput:
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as err:
                raise ValueError(f"{param} is not valid JSON: {err}") from None
        if not isinstance(schema, (dict, bool)):
            raise ValueError(f"{param} must be a JSON schema (an object), got {type(schema).__name__}")
        return cls("json", json.dumps(schema), param)  # key order kept: it is the output's order


def _choice_regex(options: Sequence[str]) -> str:
    """A regex matching exactly one of ``options`` (each escaped for xgrammar's ECMAScript-style regex)."""
    special = set("\\^$.|?*+()[]{}/")
    return "(" + "|".join("".join("\\" + c if c in special else c for c in o) for o in options) + ")"


class GrammarConstraints:
    """The structured-output state of one engine (single-threaded use, except ``compile``, which is
    thread-safe: requests are validated on the callers' threads)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos_ids = sorted(eos_ids)
        self._compiler: Any = None
        self._lock = threading.Lock()
        self._compiled: OrderedDict[StructuredOutput, Any] = OrderedDict()
        self._matchers: dict[int, Any] = {}  # seq_id -> xgrammar.GrammarMatcher
        self.compiles = 0  # distinct specs compiled (cache misses), for tests and stats

    def _grammar_compiler(self) -> Any:
        if self._compiler is None:
            import xgrammar as xgr
            from transformers import PreTrainedTokenizerFast

            hf = PreTrainedTokenizerFast(tokenizer_object=self._tokenizer.backend)
            info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=self._vocab_size,
                                                      stop_token_ids=self._eos_ids)
            self._compiler = xgr.GrammarCompiler(info, max_threads=2)
        return self._compiler

    def compile(self, spec: StructuredOutput) -> Any:
        """The compiled grammar of ``spec`` (cached). A bad spec raises RequestError (a ValueError) naming
        ``spec.param``."""
        with self._lock:  # held briefly: the engine thread looks up its grammars here between steps
            if (hit := self._compiled.get(spec)) is not None:
                self._compiled.move_to_end(spec)
                return hit
            compiler = self._grammar_compiler()
        try:  # outside the lock: a long compile on a caller's thread does not stall the engine loop
            if spec.kind == "json":
                # Compact JSON (no free whitespace): a weak model cannot wander off into blank space.
                compiled = compiler.compile_json_schema(spec.spec, any_whitespace=False, strict_mode=True,
                                                        separators=(",", ":"))
            elif spec.kind == "json_object":
                compiled = compiler.compile_json_schema('{"type": "object"}', any_whitespace=False,
                                                        separators=(",", ":"))
            elif spec.kind == "regex":
                compiled = compiler.compile_regex(spec.spec)
            elif spec.kind == "choice":
                compiled = compiler.compile_regex(_choice_regex(json.loads(spec.spec)))
            else:
                compiled = compiler.compile_grammar(spec.spec)
        except Exception as err:  # xgrammar raises RuntimeError / ValueError with its parser's message
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RequestError(f"{spec.param}: invalid {spec.kind} for structured output: {message}",
                               spec.param) from None
        with self._lock:
            if spec not in self._compiled:
                self.compiles += 1
            self._compiled[spec] = compiled
            self._compiled.move_to_end(spec)
            while len(self._compiled) > COMPILE_CACHE_SIZE:
                self._compiled.popitem(last=False)
            return compiled

    def _matcher(self, seq_id: int, spec: StructuredOutput, generated: Sequence[int]) -> Any:
        matcher = self._matchers.get(seq_id)
        if matcher is None:
            import xgrammar as xgr

            matcher = xgr.GrammarMatcher(self.compile(spec))
            for token in generated:  # a resumed / recomputed / forked sequence: replay what it has
                if not matcher.accept_token(token):
                    log.warning("sequence %d: its token %d does not match its grammar; it goes on unconstrained",
                                seq_id, token)
                    break
            self._matchers[seq_id] = matcher
        return matcher

    def apply(self, logits: Tensor, rows: Sequence[tuple[int, StructuredOutput | None, Sequence[int]]]) -> None:
        """Mask, in place, the tokens each constrained row's grammar forbids now. ``rows``: per logits row,
        (seq id, its spec or None, the tokens it generated so far). One bitmask (B, W) for the whole batch."""
        constrained = [(i, self._matcher(seq_id, spec, generated))
                       for i, (seq_id, spec, generated) in enumerate(rows) if spec is not None]
        # A complete grammar (its EOS accepted; min_tokens or ignore_eos go on) allows nothing but EOS after it.
        done = [i for i, m in constrained if m.is_terminated()]
        if done and self._eos_ids:
            done_rows = torch.tensor(done, device=logits.device)
            logits[done_rows] = float("-inf")
            logits[done_rows[:, None], torch.tensor(self._eos_ids, device=logits.device)[None, :]] = 0.0
        constrained = [(i, m) for i, m in constrained if not m.is_terminated()]
        if not constrained:
            return
        import xgrammar as xgr

        bitmask = xgr.allocate_token_bitmask(logits.shape[0], self._vocab_size)  # (B, W) int32, all allowed
        for i, matcher in constrained:
            matcher.fill_next_token_bitmask(bitmask, i)
        indices = [i for i, _ in constrained]
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=self._vocab_size,
                                        indices=indices)
        # A row with nothing left: the grammar is complete (only EOS allowed) while min_tokens / a ban forbid EOS.
        # The grammar wins: the row may end, rather than be sampled from nothing.
        idx = torch.tensor(indices, device=logits.device)
        dead = idx[~torch.isfinite(logits[idx]).any(dim=-1)]
        if dead.numel() and self._eos_ids:
            logits[dead, self._eos_ids[0]] = 0.0

    def accept(self, seq_id: int, token: int) -> None:
        """Advance a constrained sequence's grammar by its sampled token."""
        matcher = self._matchers.get(seq_id)
        if matcher is not None and not matcher.is_terminated() and not matcher.accept_token(token):
            log.warning("sequence %d: sampled token %d rejected by its grammar", seq_id, token)

    def release(self, seq_id: int) -> None:
        """A sequence finished or was aborted: drop its matcher (a preempted one keeps it: it resumes)."""
        self._matchers.pop(seq_id, None)

    @property
    def num_matchers(self) -> int:
        return len(self._matchers)
