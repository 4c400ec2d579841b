"""Synthetic results rows (no training) for verdict and report tests."""

from __future__ import annotations

from nora_peft.lab.study.spec import StudySpec, expand_cells, parse_spec


def small_spec(**over) -> StudySpec:
    raw = {
        "name": "syn",
        "datasets": ["reasoning"],
        "methods": ["lora", "rslora", "nora"],
        "ranks": [2, 8, 32],
        "seeds": [0, 1, 2],
        "lr": {"lora": [1e-3, 3e-3], "rslora": [1e-3], "nora": [1e-3]},
        "adapter": {"dropout": 0.05},
        "ablations": {
            "rank": 8,
            "variants": {
                "module": {"granularity": "module"},
                "relu": {"activation": "relu"},
                "nodrop": {"dropout": 0.0},
            },
        },
        "train": {"max_steps": 5},
        "latency": {"skip": True},
        **over,
    }
    return parse_spec(raw)


def synthetic_rows(spec: StudySpec, ppl, er=None) -> list[dict]:
    """One row per cell; ``ppl(cell) -> (val, test)``, ``er(cell) -> er_output``."""
    rows = []
    for c in expand_cells(spec):
        val, test = ppl(c)
        row = c.describe()
        row.update({"val_ppl": val, "test_ppl": test, "params": 100 * c.r, "test_accuracy": 0.5, "val": {}, "test": {}})
        if er is not None:
            row["er_output"] = row["er_latent"] = er(c)
            row["er_update"] = float(c.r)
            row["auc90_update"] = row["auc90_latent"] = row["auc90_output"] = 1.0
        rows.append(row)
    return rows
