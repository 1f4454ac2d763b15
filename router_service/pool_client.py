"""``moe-cluster scale-pool HOST:PORT N``: ask a running server's admin endpoint to resize its expert pool (plain
urllib: no Ray, no Serve in the client)."""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from typing import Any

from router_service.client import key_from_env


def scale_url(address: str) -> str:
    """HOST:PORT or a URL -> the server's /scale_expert_pool URL."""
    base = address if "://" in address else f"http://{address}"
    return base.rstrip("/") + "/scale_expert_pool"


def scale_pool(address: str, num_workers: int, api_key: str | None = None, timeout_s: float = 900.0
               ) -> dict[str, Any]:
    """POST {"num_workers": N}; returns the server's answer, or raises RuntimeError with its error message."""
    request = urllib.request.Request(scale_url(address), data=json.dumps({"num_workers": num_workers}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            answer: dict[str, Any] = json.loads(response.read())
            return answer
    except urllib.error.HTTPError as err:
        try:
            message = json.loads(err.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = err.reason
        raise RuntimeError(f"{scale_url(address)} answered {err.code}: {message}") from None
    except urllib.error.URLError as err:
        raise RuntimeError(f"cannot reach {scale_url(address)}: {err.reason}") from None


def scale_pool_command(args: argparse.Namespace) -> int:
    api_key = key_from_env(args.api_key_env) if args.api_key_env else None
    answer = scale_pool(args.address, args.num_workers, api_key)
    if args.json:
        print(json.dumps(answer))
    elif answer["changed"]:
        print(f"expert pool resized from {answer['previous_workers']} to {answer['num_workers']} workers in "
              f"{answer['seconds']:.2f}s (map version {answer['map_version']})")
    else:
        print(f"expert pool already has {answer['num_workers']} workers (map version {answer['map_version']})")
    return 0
