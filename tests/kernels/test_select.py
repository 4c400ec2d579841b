"""Which backend runs where: torch on CPU, Triton on CUDA when importable, a forced choice, and clear refusals."""

from __future__ import annotations

import pytest
import torch

from nora_peft.kernels import select as sel


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(sel.ENV, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_cpu_gets_torch(no_env):
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        assert sel.select("cpu", dtype) is sel.TORCH


def test_cuda_gets_triton_when_importable(no_env, monkeypatch):
    monkeypatch.setattr(sel, "triton_available", lambda: True)
    monkeypatch.setattr(sel, "_triton", lambda: "triton-backend")
    assert sel.select("cuda", torch.bfloat16) == "triton-backend"
    assert sel.select("cuda", torch.float64) is sel.TORCH  # no fp64 Triton kernel
    assert sel.select("cuda", torch.bfloat16, "torch") is sel.TORCH
    monkeypatch.setattr(sel, "triton_available", lambda: False)
    assert sel.select("cuda", torch.bfloat16) is sel.TORCH


def test_environment_forces_a_backend(no_env, monkeypatch):
    monkeypatch.setattr(sel, "triton_available", lambda: True)
    monkeypatch.setattr(sel, "_triton", lambda: "triton-backend")
    monkeypatch.setenv(sel.ENV, "torch")
    monkeypatch.setattr(sel, "triton_available", lambda: True)
    assert sel.select("cuda", torch.bfloat16) is sel.TORCH
    monkeypatch.setenv(sel.ENV, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert sel.select("cpu", torch.float32) == "triton-backend"


def test_refusals_name_the_fix(no_env, monkeypatch):
    with pytest.raises(ValueError, match=r"NORA_KERNELS='cutlass' is not a kernel backend; choose one of"):
        sel.select("cpu", torch.float32, "cutlass")
    monkeypatch.setattr(sel, "triton_available", lambda: False)
    with pytest.raises(ValueError, match="pip install triton"):
        sel.select("cuda", torch.float32, "triton")
    monkeypatch.setattr(sel, "triton_available", lambda: True)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        sel.select("cpu", torch.float32, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="not torch.float64"):
        sel.select("cpu", torch.float64, "triton")


def test_compute_dtype():
    assert sel.compute_dtype("cpu", torch.bfloat16) == torch.float32  # CPU half matmuls are slow
    assert sel.compute_dtype("cpu", torch.float64) == torch.float64
    assert sel.compute_dtype("cuda", torch.bfloat16) == torch.bfloat16


def test_the_triton_backend_is_imported_only_when_chosen():
    import json
    import subprocess
    import sys

    code = (
        "import sys, json, torch; import nora_peft; from nora_peft.kernels.select import select; "
        "select('cpu', torch.float32); print(json.dumps('nora_peft.kernels.triton' in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) is False
