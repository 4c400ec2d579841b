"""The study's latency step (claim 5): the latency benchmark on the study's model, stored as ``latency.json``.

Spec keys (``latency:``): ``rank`` (default: the claim-1 NoRA rank), ``batch_size``, ``seq_len``, ``repeats``,
``rounds``, ``decode_tokens`` (0: prefill only), ``decode_repeats``, ``model`` (default: the study's model; e.g.
``smollm2-135m`` measures at a real width while the cells train the tiny base), ``skip``. The adapters use the spec's
``adapter:`` settings (targets, dropout...). Measured once: an existing ``latency.json`` is kept.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .results import read_latency, write_latency
from .spec import StudySpec


def latency_step(spec: StudySpec, out_dir: str | Path, log: Callable[[str], None]) -> dict[str, Any] | None:
    """Measure and store the latency unless stored already or ``latency.skip``; returns what is stored (or None)."""
    stored = read_latency(out_dir)
    if stored is not None or spec.latency.get("skip"):
        return stored
    from ...bases.named import load_model_and_tokenizer
    from ..bench.harness import pick_device
    from ..bench.latency import measure_latency
    from ..train import base_dtype, resolve_precision

    lat = spec.latency
    model_name = lat.get("model", spec.model)
    r = int(lat.get("rank", spec.verdict_ranks()[0]))
    device = pick_device("auto")  # where the cells ran: the GPU if there is one
    dtype = base_dtype(resolve_precision(spec.train.get("precision", "auto")))  # the cells' base dtype there
    log(f"latency: LoRA vs NoRA at r={r} on {model_name or 'the embedded base'} ({device}, {dtype})")
    model, _ = load_model_and_tokenizer(model_name, dtype=dtype)
    result = measure_latency(
        model.to(device).eval(),
        spec.adapter,
        rank=r,
        batch_size=int(lat.get("batch_size", 1)),
        seq_len=int(lat.get("seq_len", 128)),
        repeats=int(lat.get("repeats", 20)),
        rounds=int(lat.get("rounds", 3)),
        decode_tokens=int(lat.get("decode_tokens", 32)),
        decode_repeats=int(lat.get("decode_repeats", 3)),
        warmup=3,
    )
    result["model"] = model_name or "embedded default base"
    result["cells_model"] = model_name == spec.model  # the report pairs rows with trained cells only if True
    write_latency(out_dir, result)
    return result
