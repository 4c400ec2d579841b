"""Which backend computes the NoRA branch for a device and dtype (vLLM's punica selector).

Two backends have the same three inference entry points -- ``add_`` (one adapter), ``mixed_add_`` (a per-row
adapter index over stacked adapters) and ``segmented_add_`` (rank buckets) -- and :func:`select` picks one:

* ``"torch"`` (``reference.py``): plain torch ops, every device and dtype; the default on CPU;
* ``"triton"`` (``triton.py``): one fused launch per adapted layer; the default on CUDA when ``triton`` is
  importable and the dtype is fp32, fp16 or bf16.

The environment variable ``NORA_KERNELS`` forces a choice: ``torch``, ``triton`` or ``auto`` (the default). Forcing
``triton`` for CPU tensors needs ``TRITON_INTERPRET=1`` (Triton's interpreter, how the tests run it without a GPU).
Training always runs the torch autograd function (``reference.nora_delta``).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import reference

#: the environment variable that forces a backend
ENV = "NORA_KERNELS"
CHOICES = ("auto", "torch", "triton")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Backend:
    """One backend's inference entry points (see ``reference.py`` for their contracts)."""

    name: str
    add_: Callable
    mixed_add_: Callable
    segmented_add_: Callable


TORCH = Backend("torch", reference.add_, reference.mixed_add_, reference.segmented_add_)


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether ``triton`` can be imported (checked once)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        importlib.import_module("triton.language")
    except Exception:  # a broken install (wrong CUDA libraries, ...) counts as absent
        return False
    return True


@functools.lru_cache(maxsize=1)
def _triton() -> Backend:
    from . import triton as kt

    return Backend("triton", kt.add_, kt.mixed_add_, kt.segmented_add_)


def select(device: torch.device | str, dtype: torch.dtype, choice: str | None = None) -> Backend:
    """The backend for tensors on ``device`` computed in ``dtype``; ``choice`` (else ``$NORA_KERNELS``) forces one.

    Raises ``ValueError`` for an unknown choice and when ``triton`` is forced where it cannot run.
    """
    choice = choice or os.environ.get(ENV) or "auto"
    if choice not in CHOICES:
        raise ValueError(f"{ENV}={choice!r} is not a kernel backend; choose one of {CHOICES}.")
    device = torch.device(device)
    if choice == "torch":
        return TORCH
    if choice == "triton":
        if not triton_available():
            raise ValueError(f"{ENV}=triton, but triton is not installed: `pip install triton`, or use {ENV}=auto.")
        interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
        if device.type != "cuda" and not interpret:
            raise ValueError(
                f"{ENV}=triton runs on CUDA tensors; these are on {device.type}. Move the model to a GPU, set "
                f"TRITON_INTERPRET=1 to run the kernels in Triton's (slow) interpreter, or use {ENV}=auto."
            )
        if dtype not in TRITON_DTYPES:
            raise ValueError(f"{ENV}=triton computes in {TRITON_DTYPES}, not {dtype}; use {ENV}=auto.")
        return _triton()
    if device.type == "cuda" and dtype in TRITON_DTYPES and triton_available():
        return _triton()
    return TORCH


def compute_dtype(device: torch.device | str, dtype: torch.dtype) -> torch.dtype:
    """The dtype adapter weights are cached in for a base computing in ``dtype`` on ``device``.

    The base's own dtype, except half precision on a CPU: CPU matmuls in bf16/fp16 are several times slower than in
    float32 at adapter sizes, and the branch is small next to the base matmuls.
    """
    if torch.device(device).type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype
