"""Configuration sections read from mappings (serve.yaml, JSON): the keys a dataclass knows, or an error naming
the ones it does not."""

from __future__ import annotations

from dataclasses import fields
from typing import Any


def known_fields(cls: type, raw: dict[str, Any], section: str) -> dict[str, Any]:
    """``raw`` as keyword arguments of the dataclass ``cls``, or a ValueError naming the unknown keys."""
    if not isinstance(raw, dict):
        raise ValueError(f"{section} config must be a mapping, got {raw!r}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(f"unknown {section} config field(s) {unknown}; known: {sorted(names)}")
    return dict(raw)
