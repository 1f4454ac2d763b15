"""EngineGateway: what the HTTP and gRPC adapters share to reach the engine replicas through one DeploymentHandle
(Serve routes each call to the less loaded of two replicas) - the API key, the model check, deadlines, opening
generations (all or none), their chunks as they come, model info, health and tokenization. Engine failures come
out as ApiError. No protocol here: the adapters translate to and from HTTP or protobuf."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from ray.serve.handle import DeploymentHandle

from router_service.engine_api import Accepted, GenerateChunk, GenerateRequest
from router_service.errors import ApiError, engine_error
from router_service.settings import AppSettings

Stream = Any  # a DeploymentResponseGenerator of EngineDeployment.generate: Accepted, then lists of chunks


def read_api_key(env: str | None) -> str | None:
    """The API key in the environment variable ``env`` (None: no key required); an empty variable is an error."""
    if not env:
        return None
    key = os.environ.get(env)
    if not key:
        raise ValueError(f"api_key_env names {env!r} but that environment variable is empty")
    return key


def new_id(prefix: str) -> str:
    """A request id: ``prefix`` and 24 random hex digits."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class EngineGateway:
    def __init__(self, engine: DeploymentHandle, settings: AppSettings) -> None:
        self.engine = engine
        self.engine_stream = engine.options(stream=True)
        self.model_name = settings.model_name
        self.request_timeout_s = settings.request_timeout_s
        self.api_key = read_api_key(settings.api_key_env)
        self._model_info: dict[str, Any] | None = None

    def authorized(self, authorization: str | None, api_key: str | None = None) -> bool:
        """Whether a caller may go on: no key is configured, or it sends the key, as ``authorization``
        ('Bearer <key>') or as ``api_key`` (the bare key)."""
        if not self.api_key:
            return True
        expected = self.api_key.encode()
        if api_key is not None and hmac.compare_digest(api_key.encode(), expected):
            return True
        if not authorization or not authorization.lower().startswith("bearer "):
            return False
        return hmac.compare_digest(authorization[7:].strip().encode(), expected)

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise ApiError(404, f"model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def deadline(self, timeout: float | None) -> float:
        """Wall-clock deadline of a request: ``timeout`` seconds from now, or the server's default."""
        return time.time() + (timeout if timeout is not None else self.request_timeout_s)

    async def open(self, request: GenerateRequest) -> tuple[Accepted, Stream]:
        """Start a generation; errors before the engine accepted it are raised as ApiError."""
        stream: Stream = self.engine_stream.generate.remote(request)
        try:
            accepted = await stream.__anext__()
        except Exception as err:
            stream.cancel()
            raise engine_error(err) from None
        return accepted, stream

    async def open_all(self, requests: list[GenerateRequest]) -> list[Stream]:
        """Start every generation, or none: the first request error is raised (before any response is sent)."""
        opened = await asyncio.gather(*(self.open(r) for r in requests), return_exceptions=True)
        streams = [o[1] for o in opened if not isinstance(o, BaseException)]
        failure = next((o for o in opened if isinstance(o, BaseException)), None)
        if failure is not None:
            for s in streams:
                s.cancel()
            raise failure
        return streams

    async def iterate(self, streams: list[Stream]) -> AsyncGenerator[tuple[int, GenerateChunk], None]:
        """Chunks of several open generations as they come, tagged with the generation's position. An error, or
        closing this generator early (a caller that may stop before the end closes it with contextlib.aclosing,
        so as not to wait for garbage collection), stops every generation still running."""
        queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

        async def pump(i: int, stream: Stream) -> None:
            try:
                async for batch in stream:
                    for chunk in batch:
                        await queue.put((i, chunk))
                await queue.put((i, None))
            except BaseException as err:
                await queue.put((i, err))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise engine_error(item)
                else:
                    yield i, item
        finally:
            for task in tasks:
                task.cancel()
            for s in streams:
                with contextlib.suppress(Exception):
                    s.cancel()

    async def model_info(self) -> dict[str, Any]:
        """The engine's description of the model (asked once, then cached)."""
        if self._model_info is None:
            self._model_info = await self._ask("model_info")
        return self._model_info

    async def health(self) -> dict[str, Any]:
        """An engine replica's health: {"alive": bool, "reason": ...}; an engine that does not answer raises."""
        state: dict[str, Any] = await self._ask("health")
        return state

    async def tokenize(self, text: str) -> list[int]:
        ids: list[int] = await self._ask("tokenize", text)
        return ids

    async def tokenize_with_text(self, text: str, add_special_tokens: bool) -> tuple[list[int], list[str]]:
        """Token ids and each token's text."""
        ids, texts = await self._ask("tokenize_with_text", text, add_special_tokens)
        return ids, texts

    async def _ask(self, method: str, *args: Any) -> Any:
        """One call of the engine deployment's ``method``; a failure is raised as ApiError."""
        try:
            return await getattr(self.engine, method).remote(*args)
        except Exception as err:
            raise engine_error(err) from None
