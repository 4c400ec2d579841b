"""``ServeConfig``: the CLI's flags build it whole (their defaults are its defaults), it refuses nonsense, and the
engine and app read their settings from it."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from nora_peft.serve import ServeConfig
from nora_peft.serve.cli import add_arguments, config_from_args
from tests.serve.conftest import make_engine


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_flag_defaults_are_the_config_defaults(monkeypatch):
    monkeypatch.delenv("NORA_API_KEY", raising=False)
    monkeypatch.delenv("NORA_ADMIN_KEY", raising=False)
    assert config_from_args(_parse(), "base") == ServeConfig(base_name="base")


def test_every_flag_reaches_the_config():
    args = _parse(
        "--max-batch-size", "3", "--request-timeout", "7", "--max-connections", "9", "--max-connections-per-client",
        "4", "--served-model-name", "mine", "--scheduler", "wave", "--api-key", "k", "--max-cpu-adapters", "0",
        "--adapter-read-timeout", "2.5", "--max-parallel-reads", "3",
    )  # fmt: skip
    config = config_from_args(args, "ignored")
    assert (config.max_batch_size, config.request_timeout_s, config.max_connections) == (3, 7.0, 9)
    assert (config.max_connections_per_client, config.base_name, config.scheduler, config.api_key) == (
        4, "mine", "wave", "k",
    )  # fmt: skip
    assert (config.max_cpu_adapters, config.adapter_read_timeout_s, config.max_parallel_reads) == (0, 2.5, 3)


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_batch_size", 0),
        ("request_timeout_s", 0.0),
        ("max_connections", -1),
        ("scheduler", "x"),
        ("max_cpu_adapters", -1),
        ("adapter_read_timeout_s", 0.0),
        ("max_parallel_reads", 0),
    ],
)
def test_nonsense_is_refused(field, value):
    with pytest.raises(ValueError, match=field):
        ServeConfig(**{field: value})


def test_the_engine_reads_its_config(serve_env):
    engine = make_engine(
        serve_env, max_batch_size=3, request_timeout_s=5.0, max_queue=7, max_cpu_adapters=1, adapter_read_timeout_s=4.0
    )
    try:
        assert engine.scheduler.max_batch_size == 3 and engine.scheduler.max_queue == 7
        assert (engine.pool.max_cpu_adapters, engine.pool.read_timeout_s) == (1, 4.0)
        assert engine.scheduler.request_timeout_s == 5.0 == engine.config.request_timeout_s
        with pytest.raises(dataclasses.FrozenInstanceError):
            engine.config.max_queue = 1  # type: ignore[misc]
    finally:
        engine.stop()
