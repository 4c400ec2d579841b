"""``AdapterPool``'s registry side: names, paths, start-up scan, load/unload, 409, validation and redacted messages."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time

import pytest
import torch

from nora_peft.methods import AdapterSpec
from nora_peft.serve.errors import AdapterError
from nora_peft.serve.layers import MultiAdapterLinear
from nora_peft.serve.pool import AdapterPool, check_adapter_name, scan_adapters_dir
from tests.test_checkpoint import edit_config, save
from tests.tiny_models import tiny_causal_lm


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """An adapters dir with two good adapters, one bad config, one badly named folder; a good one outside it."""
    root = tmp_path_factory.mktemp("pool")
    base = tiny_causal_lm("llama")
    adapters = root / "adapters"
    save(base, AdapterSpec(r=4), adapters / "good-a")
    save(base, AdapterSpec(method="lora", r=2), adapters / "run-b" / "adapter")  # a `nora train` run dir
    save(base, AdapterSpec(r=4), adapters / "bad-scaling")
    edit_config(adapters / "bad-scaling", scaling="bogus")
    save(base, AdapterSpec(r=4), adapters / "bad name")
    save(base, AdapterSpec(r=8), root / "outside")
    os.symlink(root / "outside", adapters / "link-out")  # leaves the adapters dir
    return root


def pool_for(folders, **kwargs) -> AdapterPool:
    options = dict(adapters_dir=str(folders / "adapters"), reserved={"base"}) | kwargs
    return AdapterPool(tiny_causal_lm("llama"), 2, **options)


def test_names_are_full_matched():
    assert check_adapter_name("a.b_c-1") == "a.b_c-1"
    for bad in ["ok\n", "../x", "a/b", "", ".hidden", "a..b", 3, "x" * 129, "é"]:
        with pytest.raises(AdapterError) as err:
            check_adapter_name(bad)
        assert err.value.status == 400


def test_startup_scan_skips_bad_adapters_with_a_logged_reason(folders, caplog):
    assert set(scan_adapters_dir(folders / "adapters")) == {"good-a", "run-b", "bad-scaling", "link-out"}
    pool = pool_for(folders)
    with caplog.at_level(logging.ERROR, logger="nora_peft.serve"):
        pool.load_dir()
    assert set(pool.registry) == {"good-a", "run-b"}
    assert list(pool.slots) == ["good-a", "run-b"]  # loaded while slots were free
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "bad-scaling" in messages and "scaling must be one of" in messages
    assert "link-out" in messages and "bad name" in messages
    assert all(isinstance(pool.model.get_submodule(m), MultiAdapterLinear) for m in pool.layers)


def test_load_checks_in_order_and_unload(folders):
    pool = pool_for(folders)
    pool.load_dir()

    def refused(name, path, status, needle):
        with pytest.raises(AdapterError) as err:
            pool.prepare(name, path)
        assert err.value.status == status and needle in str(err.value), str(err.value)
        assert str(folders) not in str(err.value)

    refused("base", "good-a", 400, "base model's name")
    refused("good-a", "run-b/adapter", 409, "already loaded")
    refused("new", str(folders / "outside"), 403, "outside --adapters-dir")
    refused("new", "link-out", 403, "outside --adapters-dir")
    refused("new", "../outside", 403, "outside --adapters-dir")
    refused("new", "a\x00b", 400, "NUL")
    refused("new", "missing", 400, "not a peft adapter folder")
    refused("new", "bad-scaling", 400, "scaling must be one of")
    assert pool.refused == 8
    adapter, folder = pool.prepare("new", "good-a")
    pool.install(adapter, folder)
    assert "new" in pool.registry and "new" in pool.slots and len(pool.slots) == 2  # LRU evicted one
    pool.unload("new")
    assert "new" not in pool.registry and "new" not in pool.slots
    with pytest.raises(AdapterError) as err:
        pool.unload("new")
    assert err.value.status == 404


def test_external_paths_and_rank_limit(folders):
    pool = pool_for(folders, allow_external_paths=True, max_rank=4)
    with pytest.raises(AdapterError, match="max rank 4"):
        pool.prepare("out", str(folders / "outside"))  # r = 8 > 4
    pool = pool_for(folders, allow_external_paths=True)
    adapter, folder = pool.prepare("out", str(folders / "outside"))
    assert adapter.max_rank == 8
    with pytest.raises(AdapterError, match="relative but the server has no --adapters-dir"):
        AdapterPool(tiny_causal_lm("llama"), 1).prepare("x", "good-a")


def test_an_evicted_adapter_is_validated_again_when_read_back(folders, tmp_path):
    shutil.copytree(folders / "adapters", tmp_path / "adapters", symlinks=True)
    pool = AdapterPool(tiny_causal_lm("llama"), 1, adapters_dir=str(tmp_path / "adapters"), max_cpu_adapters=0)
    pool.load_dir()
    assert list(pool.slots) == ["good-a"]
    edit_config(tmp_path / "adapters" / "good-a", activation="bogus")  # changed on disk after registration
    assert pool.ensure_loaded("run-b", set(), wait=True) == 0  # evicts good-a (no host memory: forgotten)
    with pytest.raises(AdapterError, match="activation must be one of") as err:
        pool.ensure_loaded("good-a", set(), wait=True)
    assert str(tmp_path) not in str(err.value)


def test_evicted_adapters_come_back_from_host_memory_without_a_read(folders, tmp_path):
    shutil.copytree(folders / "adapters", tmp_path / "adapters", symlinks=True)
    pool = AdapterPool(tiny_causal_lm("llama"), 1, adapters_dir=str(tmp_path / "adapters"), max_cpu_adapters=1)
    pool.load_dir()  # good-a gets the slot, run-b (read at start-up) waits in host memory
    assert list(pool.slots) == ["good-a"] and list(pool.host) == ["run-b"]
    reads = pool.reads
    shutil.rmtree(tmp_path / "adapters" / "good-a")  # host memory answers without touching the folder
    for name in ["run-b", "good-a", "run-b", "good-a"]:
        assert pool.ensure_loaded(name, set()) == 0  # at once: no read to wait for
        assert list(pool.slots) == [name] and set(pool.host) == {"good-a", "run-b"} - {name}
    assert pool.reads == reads and pool.host_hits == 4
    pool.unload("run-b")  # an unloaded adapter is forgotten, in host memory too
    assert not pool.host and list(pool.slots) == ["good-a"]


def test_check_fits_names_layers_the_base_does_not_have(folders):
    pool = pool_for(folders)
    pool.load_dir()
    adapter = pool.read("good-a")
    inner = {f"{m}.base": w for m, w in adapter.modules.items()}  # the server's own wrapped layer
    adapter.modules = inner
    with pytest.raises(AdapterError, match="no such layer"):
        pool.check_fits(adapter)
    adapter.modules = {m: (torch.zeros(4, 7), down, s) for m, (_, down, s) in pool.read("good-a").modules.items()}
    with pytest.raises(AdapterError, match="the model needs"):
        pool.check_fits(adapter)


def test_a_read_that_hangs_is_a_504_after_the_deadline(folders, monkeypatch):
    from nora_peft.serve import pool as pool_module

    gate = threading.Event()
    monkeypatch.setattr(pool_module, "read_checkpoint", lambda *a, **k: gate.wait(60))
    pool = pool_for(folders, read_timeout_s=0.2)
    try:
        started = time.monotonic()
        with pytest.raises(AdapterError, match="took over 0.2s") as err:
            pool.prepare("new", "good-a")  # the load route: the HTTP thread waits at most the deadline
        assert err.value.status == 504 and time.monotonic() - started < 5
        pool.registry["slow"] = str(folders / "adapters" / "good-a")
        assert pool.ensure_loaded("slow", set()) is None  # the step loop never waits: ask again later
        with pytest.raises(AdapterError, match="took over"):
            pool.ensure_loaded("slow", set(), wait=True)
    finally:
        gate.set()
