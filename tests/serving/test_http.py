"""The OpenAI-compatible HTTP API, through a real Serve app, with the official openai client."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from cluster.engine.sampling import SamplingParams
from cluster.engine.sequence import RequestResult
from tests.serving.conftest import Served

PROMPT = "The experts of one layer can live on different machines"


@pytest.fixture(scope="module")
def client(served: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.http}/v1", api_key="unused", max_retries=0, timeout=120)


def expected(served: Served, prompt: str | list[int], **kwargs: Any) -> RequestResult:
    return served.reference.generate([prompt], SamplingParams(**kwargs))[0]


def test_a_request_taken_whole_is_one_item_from_its_engine_replica(served: Served) -> None:
    """A non-streamed request (GenerateRequest.stream False, as the ingress sends a non-streamed completion or a
    gRPC Generate) costs its engine replica one Ray item after Accepted, the whole answer, where a streamed one
    sends an item per stream interval; both answers equal the reference engine's."""
    from ray import serve

    from router_service.engine_api import Accepted, GenerateRequest

    handle = serve.get_deployment_handle("EngineDeployment", app_name="moe-cluster").options(stream=True)
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    reference = expected(served, PROMPT, max_tokens=48, temperature=0, ignore_eos=True).completions
    for stream in (True, False):
        response: Any = handle.generate.remote(GenerateRequest(f"whole-{stream}", params, prompt=PROMPT, stream=stream))
        items = list(response)  # (a DeploymentResponseGenerator: the handle streams)
        assert isinstance(items[0], Accepted) and items[-1][-1].finished
        assert RequestResult.fold([out for batch in items[1:] for out in batch]).completions == reference
        if stream:
            assert len(items) > 2, "a streamed request of 48 tokens came in one item: nothing to compare with"
        else:
            assert len(items) == 2 and len(items[1]) == 1


def test_models_and_health(served: Served, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [served.model]
    health = httpx.get(f"{served.http}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    # OpenAI's retrieve-model, through the official client; another id is a 404 OpenAI error naming it.
    model = client.models.retrieve(served.model)
    assert (model.id, model.object, model.owned_by) == (served.model, "model", "moe-cluster")
    missing = httpx.get(f"{served.http}/v1/models/not-{served.model}")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found" and f"not-{served.model}" in missing.text


def test_completion_equals_the_engine(served: Served, client: openai.OpenAI) -> None:
    out = client.completions.create(model=served.model, prompt=PROMPT, max_tokens=12, temperature=0)
    want = expected(served, PROMPT, max_tokens=12, temperature=0).completions[0]
    assert out.choices[0].text == want.text and out.choices[0].finish_reason == "length"
    prompt_tokens = len(served.reference.tokenizer.encode(PROMPT))
    assert out.usage is not None
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (prompt_tokens, 12)
    by_ids = client.completions.create(model=served.model, prompt=served.reference.tokenizer.encode(PROMPT),
                                       max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == want.text


def test_chat_uses_the_chat_template(served: Served, client: openai.OpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "system", "content": "Be brief."},
                                                  {"role": "user", "content": "Name a color."}]
    out = client.chat.completions.create(model=served.model, messages=messages, max_tokens=10, temperature=0)
    ids = served.reference.tokenizer.encode_chat(messages)
    want = expected(served, ids, max_tokens=10, temperature=0).completions[0]
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == want.text
    assert out.usage is not None and out.usage.prompt_tokens == len(ids)


def test_streaming_equals_non_streaming(served: Served, client: openai.OpenAI) -> None:
    full = client.completions.create(model=served.model, prompt=PROMPT, max_tokens=16, temperature=0)
    stream = client.completions.create(model=served.model, prompt=PROMPT, max_tokens=16, temperature=0,
                                       stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16
    chat_chunks = list(client.chat.completions.create(
        model=served.model, messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0, stream=True))
    chat_full = client.chat.completions.create(model=served.model, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=8, temperature=0)
    assert chat_chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chat_chunks) == chat_full.choices[0].message.content
    assert chat_chunks[-1].choices[0].finish_reason == "length"


def test_vllm_sampling_parameters_on_the_cluster_engine(served: Served, client: openai.OpenAI) -> None:
    """Penalties, min_p, min_tokens and logit_bias through HTTP and the cluster engine equal the local engine's."""
    extra = {"repetition_penalty": 1.3, "min_p": 0.05, "min_tokens": 4, "bad_words": ["zz"]}
    out = client.completions.create(model=served.model, prompt=PROMPT, max_tokens=10, temperature=0.7, seed=5, n=2,
                                    presence_penalty=0.5, frequency_penalty=0.3, extra_body=extra)
    want = expected(served, PROMPT, max_tokens=10, temperature=0.7, seed=5, n=2, presence_penalty=0.5,
                    frequency_penalty=0.3, repetition_penalty=1.3, min_p=0.05, min_tokens=4, bad_words=("zz",))
    assert [c.text for c in out.choices] == [c.text for c in want.completions]
    forced = client.completions.create(model=served.model, prompt=PROMPT, max_tokens=5, temperature=1.0,
                                       logit_bias={"77": 100}, extra_body={"return_tokens_as_token_ids": False})
    ids = expected(served, PROMPT, max_tokens=5, temperature=1.0, logit_bias=((77, 100.0),)).completions[0]
    assert ids.token_ids == [77] * 5 and forced.choices[0].text == ids.text


def test_chat_template_options_tokenize_detokenize_and_version(served: Served, client: openai.OpenAI) -> None:
    tok = served.reference.tokenizer
    messages = [{"role": "user", "content": "Tell a story"}, {"role": "assistant", "content": "Once upon a"}]
    r = httpx.post(f"{served.http}/tokenize", json={"model": served.model, "messages": messages,
                                                     "add_generation_prompt": False, "continue_final_message": True})
    ids = tok.encode_chat(messages, add_generation_prompt=False, continue_final_message=True)
    assert r.status_code == 200 and r.json()["tokens"] == ids
    assert tok.decode(ids, skip_special_tokens=False).endswith("Once upon a")
    out = client.chat.completions.create(model=served.model, messages=messages, max_tokens=6, temperature=0,  # type: ignore[arg-type]
                                         extra_body={"add_generation_prompt": False, "continue_final_message": True})
    assert out.usage is not None and out.usage.prompt_tokens == len(ids)
    assert out.choices[0].message.content == expected(served, ids, max_tokens=6, temperature=0).completions[0].text
    both = httpx.post(f"{served.http}/v1/chat/completions", json={"model": served.model, "messages": messages,
                                                                   "continue_final_message": True})
    assert both.status_code == 400 and both.json()["error"]["param"] == "continue_final_message"
    plain = httpx.post(f"{served.http}/tokenize", json={"prompt": "Hello", "add_special_tokens": False}).json()
    assert plain["tokens"] == tok.encode("Hello", add_special_tokens=False)
    back = httpx.post(f"{served.http}/detokenize", json={"model": served.model, "tokens": ids})
    assert back.status_code == 200 and back.json()["prompt"] == tok.decode(ids, skip_special_tokens=False)
    bad = httpx.post(f"{served.http}/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    version = httpx.get(f"{served.http}/version")
    assert version.status_code == 200 and version.json()["version"]


def sse_events(served: Served, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with httpx.stream("POST", f"{served.http}{path}", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_continuous_usage_stats_as_guidellm_sends_them(served: Served, path: str) -> None:
    """guidellm's stream_options (vLLM's continuous_usage_stats): usage in every chunk, the tokens so far."""
    body: dict[str, Any] = {"model": served.model, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
                            "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True,
                                                               "some_future_option": 1}}
    body |= {"prompt": PROMPT} if path == "/v1/completions" else {"messages": [{"role": "user", "content": PROMPT}]}
    events = sse_events(served, path, body)
    with_choices = [e for e in events if e["choices"]]
    assert all("usage" in e for e in events)
    counts = [e["usage"]["completion_tokens"] for e in with_choices]
    assert counts == sorted(counts) and counts[-1] == 12
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 12
    assert all(e["usage"]["total_tokens"] == e["usage"]["prompt_tokens"] + e["usage"]["completion_tokens"]
               for e in events)
    # Without include_usage vLLM gives no usage at all, continuous_usage_stats or not.
    body["stream_options"] = {"continuous_usage_stats": True}
    assert not any("usage" in e for e in sse_events(served, path, body))


def test_sse_wire_format_ends_with_done(served: Served) -> None:
    body = {"model": served.model, "prompt": PROMPT, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{served.http}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    assert all(json.loads(line[6:])["object"] == "text_completion" for line in lines[:-1])


def test_n_samples_stop_strings_seeds_and_logprobs(served: Served, client: openai.OpenAI) -> None:
    many = client.completions.create(model=served.model, prompt=PROMPT, max_tokens=8, temperature=1.0, n=3, seed=11)
    assert sorted(c.index for c in many.choices) == [0, 1, 2]
    again = client.completions.create(model=served.model, prompt=PROMPT, max_tokens=8, temperature=1.0, n=3, seed=11)
    assert [c.text for c in many.choices] == [c.text for c in again.choices]  # seeded: reproducible
    want = expected(served, PROMPT, max_tokens=8, temperature=1.0, n=3, seed=11)
    assert [c.text for c in many.choices] == [c.text for c in want.completions]

    base = client.completions.create(model=served.model, prompt=PROMPT, max_tokens=20, temperature=0).choices[0].text
    stop = base[len(base) // 2: len(base) // 2 + 3]
    cut = client.completions.create(model=served.model, prompt=PROMPT, max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == base[: base.index(stop)] and cut.choices[0].finish_reason == "stop"

    lp = client.completions.create(model=served.model, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    logprobs = lp.choices[0].logprobs
    ref = expected(served, PROMPT, max_tokens=5, temperature=0, logprobs=3).completions[0]
    assert logprobs is not None and logprobs.top_logprobs is not None and ref.logprobs is not None
    assert logprobs.token_logprobs == pytest.approx([t.logprob for t in ref.logprobs], abs=1e-4)
    assert all(len(top) == 3 for top in logprobs.top_logprobs)
    chat_lp = client.chat.completions.create(model=served.model, messages=[{"role": "user", "content": "x"}],
                                             max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    chat_logprobs = chat_lp.choices[0].logprobs
    assert chat_logprobs is not None and chat_logprobs.content is not None
    assert len(chat_logprobs.content) == 4
    assert all(len(t.top_logprobs) == 2 for t in chat_logprobs.content)


def test_streamed_logprobs_and_offsets_equal_the_whole_response(served: Served, client: openai.OpenAI) -> None:
    """A stream's events may carry several tokens each; joined, they are the non-streamed response."""
    args: dict[str, Any] = {"model": served.model, "prompt": PROMPT, "max_tokens": 24, "temperature": 0,
                            "logprobs": 2}
    whole = client.completions.create(**args).choices[0]
    tokens: list[str] = []
    lps: list[float | None] = []
    offsets: list[int] = []
    text = ""
    for event in client.completions.create(**args, stream=True):
        for choice in event.choices:
            text += choice.text
            assert choice.logprobs is not None and choice.logprobs.tokens is not None
            tokens += choice.logprobs.tokens
            lps += choice.logprobs.token_logprobs or []
            offsets += choice.logprobs.text_offset or []
    assert whole.logprobs is not None
    assert text == whole.text and tokens == whole.logprobs.tokens
    assert lps == pytest.approx(whole.logprobs.token_logprobs, abs=1e-5)
    assert offsets == whole.logprobs.text_offset  # offsets into the whole text, not into each event


def test_echo_returns_the_prompt(served: Served, client: openai.OpenAI) -> None:
    out = client.completions.create(model=served.model, prompt=PROMPT, max_tokens=4, temperature=0, echo=True,
                                    logprobs=1)
    assert out.choices[0].text.startswith(PROMPT)
    n_prompt = len(served.reference.tokenizer.encode(PROMPT))
    logprobs = out.choices[0].logprobs
    assert logprobs is not None and logprobs.token_logprobs is not None
    assert len(logprobs.token_logprobs) == n_prompt + 4
    assert logprobs.token_logprobs[0] is None


def test_32_concurrent_greedy_requests_equal_their_results_alone(served: Served) -> None:
    import random

    rng = random.Random(3)
    words = "the experts of one layer can live on different machines and the router sends tokens".split()
    prompts = [" ".join(rng.choice(words) for _ in range(rng.randrange(1, 12))) for _ in range(32)]
    lengths = [rng.randrange(1, 24) for _ in prompts]
    aclient = openai.AsyncOpenAI(base_url=f"{served.http}/v1", api_key="unused", max_retries=0, timeout=300)

    async def run() -> list[str]:
        outs = await asyncio.gather(*(aclient.completions.create(model=served.model, prompt=p, max_tokens=n,
                                                                 temperature=0, extra_body={"ignore_eos": True})
                                      for p, n in zip(prompts, lengths, strict=True)))
        return [o.choices[0].text for o in outs]

    together = asyncio.run(run())
    for p, n, text in zip(prompts, lengths, together, strict=True):
        alone = expected(served, p, max_tokens=n, temperature=0, ignore_eos=True).completions[0].text
        assert text == alone


BAD_REQUESTS = [
    ("malformed JSON", "/v1/completions", b'{"model": "demo", "prompt": ', 400, None),
    ("wrong type", "/v1/completions", {"model": "demo", "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ("prompt of the wrong type", "/v1/completions", {"model": "demo", "prompt": 42}, 400, "prompt"),
    ("negative max_tokens", "/v1/completions", {"model": "demo", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("huge max_tokens", "/v1/completions", {"model": "demo", "prompt": "x", "max_tokens": 10**9}, 400,
     "max_tokens"),
    ("max_tokens beyond the context", "/v1/completions", {"model": "demo", "prompt": "x", "max_tokens": 600}, 400,
     "max_tokens"),
    ("temperature < 0", "/v1/completions", {"model": "demo", "prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("top_p > 1", "/v1/completions", {"model": "demo", "prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "x"}, 404, "model"),
    ("prompt longer than the context", "/v1/completions", {"model": "demo", "prompt": list(range(3, 600))}, 400,
     "prompt"),
    ("messages longer than the context", "/v1/chat/completions",
     {"model": "demo", "messages": [{"role": "user", "content": "word " * 600}]}, 400, "messages"),
    ("prompt token outside the vocabulary", "/v1/completions", {"model": "demo", "prompt": [99999]}, 400, "prompt"),
    ("empty messages", "/v1/chat/completions", {"model": "demo", "messages": []}, 400, "messages"),
    ("unknown role", "/v1/chat/completions", {"model": "demo", "messages": [{"role": "wizard", "content": "x"}]},
     400, None),
    ("missing model", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
    ("missing model (completions)", "/v1/completions", {"prompt": "x"}, 400, "model"),
    ("messages of the wrong type", "/v1/chat/completions", {"model": "demo", "messages": "hi"}, 400, "messages"),
    ("unimplemented vLLM parameter", "/v1/completions", {"model": "demo", "prompt": "x", "use_beam_search": True},
     400, "use_beam_search"),
]


@pytest.mark.parametrize(("what", "path", "body", "status", "param"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_the_right_status_and_an_openai_error(served: Served, what: str, path: str, body: object,
                                                             status: int, param: str | None) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{served.http}{path}", content=content, headers={"Content-Type": "application/json"},
                   timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param
    # The server keeps serving.
    ok = httpx.post(f"{served.http}/v1/completions", json={"model": "demo", "prompt": "x", "max_tokens": 2},
                    timeout=60)
    assert ok.status_code == 200


def test_validation_errors_are_400_invalid_request_errors(served: Served) -> None:
    """Body validation errors are OpenAI's 400 invalid_request_error (FastAPI's default is 422)."""
    r = httpx.post(f"{served.http}/v1/chat/completions", json={"messages": []}, timeout=60)
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error" and "model" in r.json()["error"]["message"]


@pytest.mark.parametrize(("method", "path", "status", "needle"), [
    ("GET", "/v1/no-such-endpoint", 404, "GET /v1/no-such-endpoint"),
    ("POST", "/v2/completions", 404, "POST /v2/completions"),
    ("GET", "/v1/completions", 405, "GET is not allowed on /v1/completions"),
    ("DELETE", "/v1/models", 405, "DELETE is not allowed on /v1/models"),
])
def test_unknown_paths_and_wrong_methods_get_openai_errors(served: Served, method: str, path: str, status: int,
                                                           needle: str) -> None:
    r = httpx.request(method, f"{served.http}{path}", timeout=60)
    assert r.status_code == status and r.headers["content-type"] == "application/json", r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and needle in error["message"]
    assert error["type"] == "invalid_request_error"
    if status == 405:
        assert r.headers["allow"] in error["message"]


def test_client_disconnect_aborts_the_request(served: Served) -> None:
    body = {"model": served.model, "prompt": PROMPT, "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{served.http}/v1/completions", json=body, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 4:
                break
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        stats = metric_values(served, "ray_moe_cluster_kv_blocks_used")
        running = metric_values(served, "ray_moe_cluster_requests_running")
        if stats and sum(stats) == 0 and sum(running) == 0:
            return
        time.sleep(0.5)
    raise AssertionError("the abandoned request kept running")


def metric_values(served: Served, name: str) -> list[float]:
    text = httpx.get(served.metrics, timeout=10).text
    return [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")]


def test_metrics_are_exported(served: Served, client: openai.OpenAI) -> None:
    client.completions.create(model=served.model, prompt=PROMPT, max_tokens=4, temperature=0)
    wanted = ["ray_moe_cluster_time_to_first_token_seconds_bucket",
              "ray_moe_cluster_time_per_output_token_seconds_bucket",
              "ray_moe_cluster_e2e_request_latency_seconds_bucket", "ray_moe_cluster_requests_running",
              "ray_moe_cluster_requests_waiting", "ray_moe_cluster_kv_blocks_used",
              "ray_moe_cluster_prompt_tokens_total", "ray_moe_cluster_generation_tokens_total",
              "ray_moe_cluster_expert_tokens_total", "ray_moe_cluster_expert_wait_seconds_per_step",
              "ray_moe_cluster_worker_rows_total", "ray_moe_cluster_worker_expert_calls_total",
              "ray_moe_cluster_worker_messages_total", "ray_moe_cluster_worker_rows_per_call"]
    deadline = time.monotonic() + 30
    missing = wanted
    while missing and time.monotonic() < deadline:
        text = httpx.get(served.metrics, timeout=10).text
        missing = [m for m in wanted if m + "{" not in text]
        time.sleep(1)
    assert not missing
    routed = [line for line in text.splitlines() if line.startswith("ray_moe_cluster_expert_tokens_total{")]
    assert {'layer="0"' in line for line in routed} == {True, False}  # per layer and per expert series
    per_worker = [line for line in text.splitlines() if line.startswith("ray_moe_cluster_worker_rows_total{")]
    assert len({line.split('worker="')[1].split('"')[0] for line in per_worker}) == 2  # 8 experts, 4 per worker


def test_prefix_caching_keeps_greedy_text_and_prompt_logprobs_exact(served: Served, client: openai.OpenAI) -> None:
    """The app serves with prefix caching on (the default): prompts sharing a long prefix, each sent twice (the
    later ones find the prefix cached), give the greedy text and the echoed prompt logprobs of a local engine with
    caching off."""
    from cluster.engine.loop import EngineLoop

    off = EngineLoop.local(served.reference.engine.engine_cfg.with_(enable_prefix_caching=False))
    try:
        system = " ".join([PROMPT] * 6)
        prompts = [f"{system} and question {i}" for i in range(3)]
        for prompt in prompts + prompts:
            out = client.completions.create(model=served.model, prompt=prompt, max_tokens=8, temperature=0)
            want = off.generate([prompt], SamplingParams(max_tokens=8, temperature=0))[0].completions[0]
            assert out.choices[0].text == want.text
        echo = client.completions.create(model=served.model, prompt=prompts[0], max_tokens=2, temperature=0,
                                         echo=True, logprobs=1)
        ref = off.generate([prompts[0]], SamplingParams(max_tokens=2, temperature=0, echo=True, logprobs=1))[0]
        assert ref.prompt_logprobs is not None and echo.choices[0].logprobs is not None
        got = echo.choices[0].logprobs.token_logprobs or []
        assert got[0] is None and len(ref.prompt_logprobs) > 40
        assert got[1:len(ref.prompt_logprobs)] == pytest.approx(
            [t.logprob for t in ref.prompt_logprobs[1:] if t is not None], abs=1e-5)
    finally:
        off.shutdown()


def test_http_port_metrics_have_the_vllm_series(served: Served, client: openai.OpenAI) -> None:
    """A Prometheus scrape of the HTTP port itself (no API key, as vLLM's): every engine replica's series under
    vLLM's names, read by prometheus_client's parser; the prefix cache counted."""
    from prometheus_client.parser import text_string_to_metric_families

    from tests.test_vllm_metrics import DOCUMENTED

    client.completions.create(model=served.model, prompt=PROMPT, max_tokens=4, temperature=0)
    client.completions.create(model=served.model, prompt=PROMPT, max_tokens=4, temperature=0)  # a cached prefix
    response = httpx.get(f"{served.http}/metrics", timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    assert families.keys() >= DOCUMENTED
    hits = [s.value for s in families["vllm:prefix_cache_hits"].samples]
    ttft = [s.value for s in families["vllm:time_to_first_token_seconds"].samples if s.name.endswith("_count")]
    assert sum(hits) > 0 and sum(ttft) >= 2
    usage = [s.value for s in families["vllm:kv_cache_usage_perc"].samples]
    assert usage and all(0 <= u <= 1 for u in usage)
