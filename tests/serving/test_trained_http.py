"""The trained demo checkpoint served over HTTP by the cluster engine (expert workers as Ray actors), beside this
package's random-demo app: greedy tokens equal transformers', and the held-out perplexity asked the way evaluation
harnesses ask it (bench/perplexity.py: echo + logprobs over token-id prompts) equals transformers' to 1e-4."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch

from bench.perplexity import (
    DEFAULT_TEXT,
    document_windows,
    read_documents,
    served_logprobs,
    total,
    transformers_logprobs,
)
from cluster.model.demo import TRAINED_DEMO
from tests.serving.conftest import Served, app_args

APP, PREFIX, MODEL = "trained", "/trained", "trained-demo"
SLICE_CHARS, MAX_LENGTH = 1400, 300  # windows of about 300 tokens: past the 256-token sliding window
PROMPT = "And the LORD spake unto the fish, and it vomited out Jonah"  # Jonah 2:10, held out


@pytest.fixture(scope="module")
def trained_url(served: Served) -> Iterator[str]:
    from ray import serve

    from router_service.app import build_app

    serve.run(build_app(app_args(TRAINED_DEMO, served_model_name=MODEL)), name=APP, route_prefix=PREFIX)
    yield served.http + PREFIX
    serve.delete(APP)  # the package's other tests (gRPC) expect one app


def test_greedy_completion_matches_transformers(trained_url: str, trained_hf: Any) -> None:
    from cluster.model.tokenizer import Tokenizer

    reply = httpx.post(f"{trained_url}/v1/completions", timeout=300, json={
        "model": MODEL, "prompt": PROMPT, "max_tokens": 16, "temperature": 0, "ignore_eos": True})
    assert reply.status_code == 200, reply.text
    tok = Tokenizer(TRAINED_DEMO)
    ids = tok.encode(PROMPT)
    trained_hf.generation_config.eos_token_id = None
    trained_hf.generation_config.pad_token_id = 0
    with torch.no_grad():
        want = trained_hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
    body = reply.json()
    assert body["usage"]["completion_tokens"] == 16
    # The served text is the continuation of the prompt's text (its leading space kept).
    assert body["choices"][0]["text"] == tok.decode(ids + want)[len(tok.decode(ids)):]


def test_held_out_perplexity_served_equals_transformers(trained_url: str, trained_hf: Any) -> None:
    docs = read_documents(DEFAULT_TEXT, SLICE_CHARS)
    windows = document_windows(TRAINED_DEMO, docs, MAX_LENGTH)
    served = total(served_logprobs(trained_url, MODEL, windows), docs)
    reference = total(transformers_logprobs(trained_hf, windows), docs)
    assert served.tokens == reference.tokens == sum(len(w.continuation) for w in windows)
    assert abs(served.nll - reference.nll) <= 1e-4 * reference.nll
