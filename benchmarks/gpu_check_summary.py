"""``gpu_check.sh``'s last step: issue 18's targets next to what the check measured, as ``OUT/summary.json``.

Usage: ``python benchmarks/gpu_check_summary.py OUT``. Reads ``latency.json``, ``mixed.json``, ``train.json`` and
``steps.jsonl`` from ``OUT`` (a missing file leaves its targets ``"met": null`` with the reason).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _load(out: Path, name: str) -> dict[str, Any] | None:
    path = out / name
    return json.loads(path.read_text()) if path.is_file() else None


def _target(name: str, value: float | None, limit: float, at_most: bool) -> dict[str, Any]:
    met = None if value is None else (value <= limit if at_most else value >= limit)
    return {"target": f"{name} {'<=' if at_most else '>='} {limit}", "value": value, "met": met}


def latency_targets(lat: dict[str, Any]) -> list[dict[str, Any]]:
    """Eager: unmerged NoRA <= 1.10x merged LoRA; graph: merged >= 150 tok/s and NoRA <= 1.05x merged."""
    rows = {(r["path"], r["label"]): r for r in lat["table"]}
    out = []
    for path, limit in (("eager", 1.10), ("graph", 1.05)):
        for label in (f"nora-r{r}" for r in lat["ranks"]):
            row = rows.get((path, label))
            out.append(_target(f"{path} {label} latency / merged LoRA", row and row["rel_latency"], limit, True))
    merged = next((r for r in lat["table"] if r["path"] == "graph" and r["merged"]), None)
    out.append(_target("graph merged LoRA tok/s", merged and merged["tokens_per_s"], 150, False))
    if merged is not None:
        out[-1]["cuda_graph"] = merged["cuda_graph"]
    return out


def mixed_targets(mixed: dict[str, Any]) -> list[dict[str, Any]]:
    """32 rows on 32 adapters: <= 1.25x one adapter's overhead, >= 3x the throughput of peft's per-adapter loop."""
    row = next(r for r in mixed["mixed_decode"] if r["n_adapters"] == 32)
    return [
        _target("mixed decode overhead 32 adapters / one (peft adapter_names)", row["overhead_ratio_mixed_over_one"],
                1.25, True),
        _target("mixed decode overhead 32 adapters / one (stacked)", row["overhead_ratio_stacked_mixed_over_one"],
                1.25, True),
        _target("mixed decode throughput / peft's per-adapter loop", row["throughput_ratio_mixed_over_peft_loop"],
                3.0, False),
    ]  # fmt: skip


def train_targets(train: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """NoRA / LoRA training step time (paired median) and memory <= 1.00, per dropout."""
    out = []
    for row in train:
        tag = f"r={row['r']} dropout={row['dropout']}"
        out.append(_target(f"train step time NoRA / LoRA {tag}", row["time_ratio_paired_median"], 1.0, True))
        out.append(_target(f"train step memory NoRA / LoRA {tag}", row["mem_ratio_nora_over_lora"], 1.0, True))
    return out


def main(out: Path) -> int:
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines() if line.strip()]
    summary: dict[str, Any] = {"steps": steps, "targets": [], "missing": []}
    for name, fn, pick in (
        ("latency.json", latency_targets, lambda d: d["latency"]),
        ("mixed.json", mixed_targets, lambda d: d),
        ("train.json", train_targets, lambda d: d["train"]),
    ):
        data = _load(out, name)
        if data is None:
            summary["missing"].append(f"{name}: its step failed or timed out (see log.txt)")
            continue
        summary.setdefault("meta", data.get("meta"))
        try:
            summary["targets"] += fn(pick(data))
        except (KeyError, StopIteration) as exc:
            summary["missing"].append(f"{name}: no {exc} in it")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "gpu_check_out")))
