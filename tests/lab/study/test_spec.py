"""Spec parsing, cell enumeration and sharding."""

from __future__ import annotations

import pytest

from nora_peft.lab.study.spec import expand_cells, load_spec, parse_shard, parse_spec, shard_cells

from .synthetic import small_spec


def test_presets_parse_and_expand():
    paper = load_spec("paper")
    assert paper.ranks == [16, 64, 128, 512] and len(paper.seeds) >= 3
    assert paper.verdict_ranks() == (64, 512)
    cells = expand_cells(paper)
    ids = [c.cell_id for c in cells]
    assert len(ids) == len(set(ids))
    # every method at every rank with every lr of its grid and every seed, on both datasets
    main = [c for c in cells if c.variant == "default"]
    assert len(main) == 2 * 4 * 3 * (3 + 3 + 3)  # datasets x ranks x seeds x (lr grids of lora, rslora, nora)
    # ablations: 5 variants x 3 lrs x 3 seeds per dataset, all NoRA at r=128
    abl = [c for c in cells if c.variant != "default"]
    assert len(abl) == 2 * 5 * 3 * 3 and all(c.method == "nora" and c.r == 128 for c in abl)
    demo = load_spec("demo")
    assert demo.model is None and len(expand_cells(demo)) > 0


def test_cells_deterministic_and_ablation_default_shared():
    spec = small_spec()
    a, b = expand_cells(spec), expand_cells(spec)
    assert [c.cell_id for c in a] == [c.cell_id for c in b]
    # the ablation's default variant (SiLU, weight, dropout 0.05, r=8) is the main-sweep NoRA r=8 cell, not a copy
    nora8 = [c for c in a if c.method == "nora" and c.r == 8]
    assert {c.variant for c in nora8} == {"default", "module", "relu", "nodrop"}
    assert len(nora8) == 4 * 3  # 4 variants x 1 lr x 3 seeds
    # a variant equal to the default (activation silu) collapses into the default cell
    spec2 = small_spec(ablations={"rank": 8, "variants": {"silu": {"activation": "silu"}}})
    assert len(expand_cells(spec2)) == len([c for c in a if c.variant == "default"])
    cfg = next(c for c in a if c.variant == "relu").adapter_spec
    assert (cfg.activation, cfg.dropout, cfg.r) == ("relu", 0.05, 8)


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_shards_cover_every_cell_exactly_once(n):
    cells = expand_cells(load_spec("paper"))
    seen = [c.cell_id for i in range(n) for c in shard_cells(cells, (i, n))]
    assert sorted(seen) == sorted(c.cell_id for c in cells)
    assert shard_cells(cells, (0, n)) == shard_cells(expand_cells(load_spec("paper")), (0, n))


def test_parse_shard_and_bad_specs():
    assert parse_shard("2/4") == (2, 4) and parse_shard(None) == (0, 1)
    for bad in ("4/4", "a/b", "1"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)
    base = {"name": "x", "datasets": ["reasoning"], "lr": 1e-3}
    with pytest.raises(ValueError, match="unknown key"):
        parse_spec({**base, "rank": [1]})
    with pytest.raises(ValueError, match="method 'lorax'"):
        parse_spec({**base, "methods": ["lorax"]})
    with pytest.raises(ValueError, match="learning-rate grid"):
        parse_spec({**base, "lr": {"lora": [1e-3]}})
    with pytest.raises(ValueError, match="train.seed"):
        parse_spec({**base, "train": {"seed": 3}})
    with pytest.raises(ValueError, match="ablation variant"):
        parse_spec({**base, "ablations": {"rank": 8, "variants": {"x": {"colour": "red"}}}, "ranks": [8]})
    with pytest.raises(ValueError, match=r"unknown eval key\(s\) \['max_gen'\]"):
        parse_spec({**base, "eval": {"max_gen": 3}})
    with pytest.raises(FileNotFoundError, match="preset"):
        load_spec("no-such-preset")


def test_lr_grid_per_rank():
    base = {"name": "x", "datasets": ["reasoning"], "methods": ["lora", "rslora"], "ranks": [1, 16]}
    spec = parse_spec({**base, "lr": {"lora": [1e-2, 2e-2], "rslora": {1: [1e-2, 2e-2], 16: [2.5e-3]}}})
    got = sorted((c.method, c.r, c.lr) for c in expand_cells(spec))
    assert got == [
        ("lora", 1, 1e-2), ("lora", 1, 2e-2), ("lora", 16, 1e-2), ("lora", 16, 2e-2),
        ("rslora", 1, 1e-2), ("rslora", 1, 2e-2), ("rslora", 16, 2.5e-3),
    ]  # fmt: skip
    assert spec.lr_grid("rslora", 16) == [2.5e-3] and spec.lr_grid("lora", 16) == [1e-2, 2e-2]
    with pytest.raises(ValueError, match=r"lr grid of 'rslora' has no entry for rank\(s\) \[16\]"):
        parse_spec({**base, "lr": {"lora": 1e-2, "rslora": {1: [1e-2]}}})
