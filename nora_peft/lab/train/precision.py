"""Precision: which of fp32 / bf16 / fp16 a run uses, and the dtype its frozen base is loaded in."""

from __future__ import annotations

from ...kernels.device import cpu_has_bf16

__all__ = ["base_dtype", "cpu_has_bf16", "resolve_precision"]


def resolve_precision(precision: str) -> str:
    """``auto`` -> ``bf16`` on a GPU or CPU that supports it natively, else ``fp32``; explicit choices are checked."""
    import torch

    if precision == "auto":
        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if cpu_has_bf16() else "fp32"
    if precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("precision='fp16' needs a CUDA GPU (loss scaling); use 'fp32' or 'bf16' on CPU.")
    return precision


def base_dtype(precision: str):
    """The dtype the frozen base is loaded in. On a GPU, the precision's own dtype; on a CPU the base stays fp32 and
    bf16 runs as autocast (measured faster on CPUs with bf16 units, and the weights keep full precision)."""
    import torch

    if not torch.cuda.is_available():
        return torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
