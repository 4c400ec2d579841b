"""``nora bench`` smoke test: it runs every section on tiny sizes and emits valid JSON (no timing assertions)."""

from __future__ import annotations

import json

import pytest
import torch

from nora_peft.cli import main as cli_main
from nora_peft.lab.bench import latency_table, saved_activation_bytes, small_llama
from nora_peft.methods import AdapterSpec


def test_nora_bench_quick_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli_main(["bench", "--quick", "--threads", "1", "--device", "cpu", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert {"meta", "train", "infer", "mixed"} <= set(results)
    train = results["train"][0]
    assert train["lora_ms"] > 0 and train["nora_ms"] > 0 and train["mem_ratio_nora_over_lora"] > 0
    labels = [row["label"] for row in results["infer"]["prefill_b1"]]
    assert labels[0] == "base" and {"lora-r8", "lora-r8-merged", "nora-r8"} <= set(labels)
    assert [row["n_adapters"] for row in results["mixed"]] == [1, 4]
    assert "training step" in capsys.readouterr().out


def test_latency_table_rows():
    model = small_llama(hidden=32, layers=1, vocab=64)
    rows = latency_table(model, [AdapterSpec(method="nora", r=4)], seq_len=8, repeats=2, warmup=1)
    assert [r["label"] for r in rows] == ["base", "nora-r4"]
    assert rows[0]["rel_latency"] == 1.0 and all(r["tokens_per_s"] > 0 for r in rows)
    assert not any("nora" in n for n, _ in model.named_modules())  # the caller's model is left untouched


def test_saved_activation_bytes_counts_unique_storages():
    lin = torch.nn.Linear(8, 8)
    x = torch.randn(4, 8, requires_grad=True)
    # tanh saves its output (4*8 floats); x is a leaf the matmul saves too -> 2 unique storages of 128 bytes
    got = saved_activation_bytes(lin, lambda: torch.tanh(lin(x)).sum())
    assert got == 2 * 4 * 8 * 4


def test_sections_registry_dispatches_and_names_the_choices(tmp_path):
    from nora_peft.lab import bench

    assert {"train", "infer", "mixed", "latency", "real"} <= set(bench.available_sections())
    for name in bench.available_sections():
        module = bench.section_module(name)
        assert callable(module.run) and callable(module.print_tables), name
    with pytest.raises(SystemExit, match=r"unknown section\(s\) \['nope'\]; choose from train, infer"):
        cli_main(["bench", "--what", "nope", "--quick"])


def test_latency_section_measures_prefill_and_decode_alternately(tmp_path):
    out = tmp_path / "lat.json"
    assert (
        cli_main(["bench", "--what", "latency", "--quick", "--threads", "1", "--device", "cpu", "--json", str(out)])
        == 0
    )
    lat = json.loads(out.read_text())["latency"]
    assert len(lat["rounds"]) == len(lat["decode_rounds"]) == 2
    for rnd in lat["rounds"] + lat["decode_rounds"]:
        assert sorted(r["role"] for r in rnd) == ["base", "lora_merged", "lora_unmerged", "nora_unmerged"]
        assert all(r["ms"] > 0 for r in rnd)
    assert "decode" in lat["decode_setting"] and "threads" in lat["setting"]


def test_real_section_rows_on_a_random_llama(tmp_path):
    out = tmp_path / "real.json"
    argv = ["bench", "--what", "real", "--quick", "--threads", "1", "--device", "cpu", "--json", str(out)]
    assert cli_main(argv + ["--precision", "fp32,bf16"]) == 0
    real = json.loads(out.read_text())["real"]
    assert [r["precision"] for r in real["train"]] == ["fp32", "bf16"]
    assert all(r["time_ratio_nora_over_lora"] > 0 and r["mem_ratio_nora_over_lora"] > 0 for r in real["train"])
    assert {"base", "nora-r4", "lora-r4-merged"} <= {r["label"] for r in real["decode"]["b1"]}


def test_stacked_mixed_variant_computes_what_peft_adapter_names_computes():
    """The mixed section's core-only stacked path is a fair variant: the same logits as NoRA's ``adapter_names=``."""
    from nora_peft.lab.bench.mixed import StackedModel, multi_adapter_model

    base = small_llama(hidden=32, layers=1, vocab=64)
    spec = AdapterSpec(method="nora", r=4, target_modules=["q_proj", "v_proj"], extra={"init_weights": False})
    nora, names = multi_adapter_model(base, spec, 3)
    ids = torch.randint(3, 64, (4, 5))
    rows = [names[i % 3] for i in range(4)]
    with torch.inference_mode():
        want = nora(input_ids=ids, adapter_names=rows).logits
    stacked = StackedModel(base, nora, names)
    seen = []
    stacked.model.register_forward_hook(lambda m, i, o: seen.append(o.logits))
    stacked(ids, torch.tensor([i % 3 for i in range(4)]))
    torch.testing.assert_close(seen[0], want, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        assert not torch.allclose(base(input_ids=ids).logits, want, atol=1e-3)  # the adapters do change the output


def test_latency_section_gives_table3_rows_on_a_shape_for_every_decode_path(tmp_path):
    out = tmp_path / "t3.json"
    argv = ["bench", "--what", "latency", "--quick", "--threads", "1", "--device", "cpu", "--json", str(out)]
    argv += ["--model", "shape:tiny", "--targets", "q_proj,v_proj", "--ranks", "4,8", "--merged-rank", "16"]
    assert cli_main(argv + ["--decode", "eager,static,graph"]) == 0
    lat = json.loads(out.read_text())["latency"]
    assert lat["model_parameters"] == 106_816 and "bfloat16" in lat["setting"]
    assert (
        sorted(lat["decode_paths"]) == ["eager", "graph", "static"]  # (JSON keys are written sorted)
        and lat["decode_rounds"] == lat["decode_paths"]["eager"]
    )
    table = lat["table"]
    labels = ["base", "lora-r16-merged", "lora-r4", "lora-r8", "nora-r4", "nora-r8"]
    assert [(r["path"], r["label"]) for r in table] == [
        (p, label) for p in ("eager", "static", "graph") for label in labels
    ]
    # shape:tiny: q 64 -> 64 and v 64 -> 32 in each of 2 layers: r * (64 + 64 + 64 + 32) * 2 adapter parameters
    assert all(r["adapter_parameters"] == 448 * r["r"] for r in table)
    assert all(r["rel_latency"] == 1.0 for r in table if r["label"] == "lora-r16-merged")
    assert all(r["tokens_per_s"] > 0 and not r["cuda_graph"] for r in table)  # no CUDA here: graph runs as static


def test_train_and_mixed_sections_take_a_shape_and_decode_paths_are_checked(tmp_path):
    out = tmp_path / "s.json"
    argv = ["bench", "--what", "train,mixed", "--quick", "--threads", "1", "--device", "cpu", "--json", str(out)]
    assert cli_main(argv + ["--model", "shape:tiny", "--targets", "q_proj,v_proj", "--rank", "16"]) == 0
    results = json.loads(out.read_text())
    assert results["train"][0]["precision"] == "bf16" and results["train"][0]["nora_ms"] > 0
    assert {row["hidden"] for row in results["mixed"]} == {64} and {row["r"] for row in results["mixed"]} == {16}
    with pytest.raises(SystemExit, match=r"--decode: unknown path\(s\) \['cudagraph'\]; choose from eager, static"):
        cli_main(["bench", "--what", "latency", "--quick", "--decode", "cudagraph"])


@pytest.mark.parametrize("when", ["run", "build"])
def test_a_failing_decode_path_is_recorded_and_the_others_still_measured(monkeypatch, when):
    from nora_peft.lab.bench import latency

    real = latency.decode_fn

    def decode_fn(model, ids, new_tokens, path):
        if path != "static":
            return real(model, ids, new_tokens, path)

        def fail():
            raise RuntimeError("operation not permitted when stream is capturing")

        if when == "build":  # the decoder refuses the model when it is built (StaticDecoder's checks)
            fail()
        return fail

    monkeypatch.setattr(latency, "decode_fn", decode_fn)
    model = small_llama(hidden=32, layers=1, vocab=64)
    got = latency.measure_latency(
        model, rank=4, seq_len=8, repeats=1, rounds=2, decode_tokens=3, decode_repeats=1, paths=("static", "eager")
    )
    assert got["errors"] == {"static": "RuntimeError: operation not permitted when stream is capturing"}
    assert list(got["decode_paths"]) == ["eager"] and len(got["decode_paths"]["eager"]) == 2
    assert {row["path"] for row in got["table"]} == {"eager"}
