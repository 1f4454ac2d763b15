"""Prefix-aware routing of requests to engine replicas: Ray Serve's own ``PrefixCacheAffinityRouter``, told where
this app's requests keep their prompt.

Each engine replica has its own KV cache and prefix cache, so a prompt whose prefix one replica already holds is
cheaper there. Ray's router keeps a prefix tree of the prompt text it sent to each replica; while the replicas'
queues differ by at most ``imbalanced_threshold`` requests it sends a request to the replica whose text shares the
longest prefix with it (or, below ``match_rate_threshold``, to the replica holding the least text), else it falls
back to power-of-two choices. Two adaptations, nothing else:

1. The prompt text: Ray looks for a ``messages`` or ``prompt`` attribute and fails on other calls (``tokenize``,
   ``stats``, ...) and on token-id prompts; here only ``GenerateRequest`` has a prompt (chat messages, text or token
   ids), and every other call is routed by power-of-two choices.
2. The tree actor takes no CPU: Ray's default (1 CPU to schedule) cannot be placed on a node whose cores the
   engine replicas hold, and its work (a dict lookup per request) needs none reserved.
"""

from __future__ import annotations

from typing import Any

import ray

# Ray's public name for the router, ray.serve.llm.request_router, imports all of ray[llm] (pyarrow, vLLM's
# dependencies); the class itself needs none of it, so it is taken from where it lives (the same class).
from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_aware_router import PrefixCacheAffinityRouter
from ray.llm._internal.serve.routing_policies.prefix_aware.prefix_tree import PrefixTreeActor
from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

from router_service.engine_api import GenerateRequest

ROUTER_CLASS = "router_service.prefix_routing:PrefixAffinityRouter"
# Ray's default never falls back to power-of-two choices (an infinite threshold): one hot prefix would then pile
# every request onto one replica. A replica runs up to max_num_seqs requests at once; beyond a difference of a few
# the shorter queue is worth more than the cached prefix (bench/prefix_routing.py's "hot" scenario shows the split
# this gives: 67/33 with one tenant sending three requests in four, TTFT still 0.89x power-of-two's).
DEFAULT_IMBALANCED_THRESHOLD = 8


def prompt_text(request: GenerateRequest) -> str:
    """The text a request's prompt starts with, for prefix matching: chat messages' roles and contents in order,
    a text prompt as it is, token ids as decimal numbers (a shared token prefix is then a shared text prefix)."""
    if request.messages is not None:
        return "".join(f"<{message.get('role', '')}>{_content_text(message.get('content'))}"
                       for message in request.messages)
    if isinstance(request.prompt, str):
        return request.prompt
    return "".join(f"{token} " for token in request.prompt or [])


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: their text, in order
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


class PrefixAffinityRouter(PrefixCacheAffinityRouter):
    # Ray's keyword arguments, passed through (request_router_kwargs), with two defaults of our own.
    def initialize_state(self, **kwargs: Any) -> None:  # type: ignore[override]
        if kwargs.get("tree_actor") is None:
            ids = self._deployment_id
            namespace = "::".join(part for part in (SERVE_NAMESPACE, ids.app_name if ids else "",
                                                    ids.name if ids else "") if part)
            tree_actor_class: Any = PrefixTreeActor  # a Ray actor class (its .options is not visible to mypy)
            kwargs["tree_actor"] = tree_actor_class.options(name="LlmPrefixTreeActor", namespace=namespace,
                                                             get_if_exists=True, lifetime="detached",
                                                             num_cpus=0).remote()
            # As Ray's router does for its own tree actor: removed by serve.shutdown().
            controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
            ray.get(controller._register_shutdown_cleanup_actor.remote(kwargs["tree_actor"]))
        kwargs.setdefault("imbalanced_threshold", DEFAULT_IMBALANCED_THRESHOLD)
        super().initialize_state(**kwargs)

    # Ray's annotation says str, but its callers test for None, which is what sends a call to power-of-two choices.
    def _extract_text_from_request(self, pending_request: Any) -> str | None:  # type: ignore[override]
        """The prompt text of a ``generate`` call; None (power-of-two choices) for any other call."""
        for arg in pending_request.args:
            if isinstance(arg, GenerateRequest):
                return prompt_text(arg) or None
        return None
