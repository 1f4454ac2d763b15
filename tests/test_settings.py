"""The Serve app's settings (application args): every bad value is refused with its name and value."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from router_service.settings import AppSettings


@pytest.mark.parametrize(("args", "names"), [
    ({"engine": "gpu"}, ("engine", "'gpu'")),
    ({"num_engines": 0}, ("num_engines", "0")),
    ({"max_ongoing_requests": True}, ("max_ongoing_requests", "True")),
    ({"request_timeout_s": -1}, ("request_timeout_s", "-1")),
    ({"max_resumes": -1}, ("max_resumes", "-1")),
    ({"stream_interval_ms": 5000}, ("stream_interval_ms", "5000")),
    ({"stream_chunks_per_s": -3}, ("stream_chunks_per_s", "-3")),
    ({"engine_options": {"max_num_seqs": 0}}, ("max_num_seqs", "0")),
    ({"pool_options": {"experts_per_worker": 0}}, ("experts_per_worker", "0")),
    ({"cluster_options": {"experts_per_worker": 2}}, ("unknown cluster config field", "experts_per_worker")),
    ({"engine_autoscaling": 3}, ("engine_autoscaling", "3")),
    ({"typo_arg": 1}, ("typo_arg",)),
])
def test_bad_args_name_the_field_and_value(demo_dir: Path, args: dict[str, Any], names: tuple[str, ...]) -> None:
    with pytest.raises(ValueError) as err:
        AppSettings.from_args({"model": str(demo_dir)} | args)
    for name in names:
        assert name in str(err.value)


def test_model_is_required_and_names_default_to_the_directory(demo_dir: Path) -> None:
    with pytest.raises(ValueError, match="'model'"):
        AppSettings.from_args({"engine": "local"})
    settings = AppSettings.from_args({"model": str(demo_dir), "stream_chunks_per_s": 0})
    assert settings.model_name == demo_dir.name and settings.stream_chunks_per_s == 0
