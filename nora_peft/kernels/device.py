"""What the hardware does fast: used by the lab (training precision) and the server (serving dtype) alike."""

from __future__ import annotations


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX-512 BF16 or AMX), where bf16 autocast is faster than fp32;
    elsewhere torch emulates bf16 and it is slower."""
    import torch

    try:
        native = _cpu_flags() & {"avx512_bf16", "amx_bf16"}
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and bool(native)
    except (AttributeError, RuntimeError):
        return False


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()
