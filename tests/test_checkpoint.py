"""``nora_peft.checkpoint``: adapter folders read and validated without layers; each hostile file named and refused."""

from __future__ import annotations

import copy
import math
import os
import threading
from pathlib import Path

import pytest
import torch

from nora_peft.checkpoint import CheckpointError, check_fits_model, check_shapes, read_checkpoint, read_config
from nora_peft.methods import AdapterSpec, build_peft_model
from tests.adapter_files import edit_config, edit_tensors
from tests.tiny_models import tiny_causal_lm

ATTN = "model.layers.0.self_attn"


@pytest.fixture(scope="module")
def base():
    return tiny_causal_lm("llama")


@pytest.fixture(scope="module")
def linear_shapes(base):
    return {n: (m.out_features, m.in_features) for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}


def save(base, spec: AdapterSpec, folder: Path):
    spec = copy.deepcopy(spec)
    spec.extra = {"init_weights": False} if spec.method == "nora" else {"init_lora_weights": False}
    model = build_peft_model(copy.deepcopy(base), spec)
    model.save_pretrained(str(folder))
    return model


@pytest.mark.parametrize(
    "spec",
    [
        AdapterSpec(r=4, activation="relu", alpha=12, target_modules=["q_proj", "down_proj"]),
        AdapterSpec(r=4, scaling="rslora", target_modules=["v_proj"]),
        AdapterSpec(method="lora", r=4, alpha=6),
        AdapterSpec(method="rslora", r=2, alpha=5),
    ],
    ids=["nora", "nora-rslora", "lora", "rslora"],
)
def test_read_matches_peft_weights_and_scaling(tmp_path, base, linear_shapes, spec):
    model = save(base, spec, tmp_path)
    ckpt = read_checkpoint(tmp_path, name="a", expected=linear_shapes)
    layers = {n: m for n, m in model.base_model.model.named_modules() if hasattr(m, "nora_up") or hasattr(m, "lora_A")}
    assert set(ckpt.modules) == set(layers) and ckpt.modules
    for module, (up, down, scaling) in ckpt.modules.items():
        layer = layers[module]
        if spec.method == "nora":
            ref_up, ref_down = layer.nora_up["default"].weight, layer.nora_down["default"].weight
        else:
            ref_up, ref_down = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert torch.equal(up, ref_up.detach()) and torch.equal(down, ref_down.detach())
        # independent reference: the scaling rule written out
        expected = spec.resolved_alpha / (math.sqrt(spec.r) if "rslora" in (spec.method, spec.scaling) else spec.r)
        assert scaling == pytest.approx(expected) == pytest.approx(layer.scaling["default"])
    assert ckpt.activation == (spec.activation if spec.method == "nora" else "identity")


def refused(folder, match: str, **kwargs) -> str:
    with pytest.raises(CheckpointError, match=match) as err:
        read_checkpoint(folder, label="'x'", **kwargs)
    assert str(folder) not in str(err.value)  # the label, never the path
    return str(err.value)


@pytest.fixture
def nora_dir(tmp_path, base):
    save(base, AdapterSpec(r=4, target_modules=["q_proj"]), tmp_path / "a")
    return tmp_path / "a"


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"activation": "bogus"}, "activation must be one of"),  # finding 1
        ({"scaling": "bogus"}, "scaling must be one of"),  # finding 2
        ({"alpha": "8"}, "alpha must be a finite number"),  # finding 14
        ({"alpha": float("inf")}, "alpha must be a finite number"),
        ({"r": 0}, "r must be a positive integer"),
        ({"peft_type": "IA3"}, "only 'NORA' and 'LORA'"),
        ({"granularity": "module"}, "per-weight"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ],
)
def test_bad_nora_config_is_refused(nora_dir, changes, match):
    edit_config(nora_dir, **changes)
    refused(nora_dir, match)


def test_bad_lora_config_is_refused(tmp_path, base):
    save(base, AdapterSpec(method="lora", r=4, target_modules=["q_proj"]), tmp_path)
    for changes, match in [
        ({"lora_alpha": "8"}, "lora_alpha must be a finite number"),
        ({"r": -1}, "r must be a positive integer"),
        ({"use_dora": True}, "use_dora"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
    ]:
        original = (tmp_path / "adapter_config.json").read_text()
        edit_config(tmp_path, **changes)
        refused(tmp_path, match)
        (tmp_path / "adapter_config.json").write_text(original)


def test_config_that_is_not_an_object(nora_dir):
    (nora_dir / "adapter_config.json").write_text("[1, 2]")
    refused(nora_dir, "must be a JSON object")
    (nora_dir / "adapter_config.json").write_text("{not json")
    refused(nora_dir, "not readable JSON")


def test_pickle_only_folder_gets_the_pickle_message(nora_dir):  # finding 16
    (nora_dir / "adapter_model.safetensors").rename(nora_dir / "adapter_model.bin")
    refused(nora_dir, "safetensors only, never pickle")


def test_no_config_is_not_an_adapter_folder(tmp_path):
    refused(tmp_path, "not a peft adapter folder")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda t: t.update({k: v.to(torch.int32) for k, v in t.items()}), "must be floating point"),  # 17
        (lambda t: t.update({k: v.fill_(float("nan")) for k, v in t.items() if "up" in k}), "NaN or infinite"),  # 17
        (lambda t: t.update({k: v[:0] for k, v in t.items()}), "2-D with r >= 1"),  # 14: rank 0
        (lambda t: t.update({k: v[0, 0].clone() for k, v in t.items()}), "2-D with r >= 1"),  # 14: 0-d
        (lambda t: t.update({"x.weight": torch.zeros(2, 2)}), "not a nora_up/nora_down weight"),
        (lambda t: [t.pop(k) for k in [k for k in t if "down" in k]], "only half"),
        (lambda t: t.update({k: torch.zeros(6, v.shape[1]) for k, v in t.items() if "up" in k}), "needs"),
    ],
    ids=["int32", "nan", "rank0", "0d", "foreign-key", "half", "rank-vs-config"],
)
def test_bad_tensors_are_refused(nora_dir, linear_shapes, change, match):
    edit_tensors(nora_dir, change)
    refused(nora_dir, match, expected=linear_shapes)


def test_huge_alpha_is_refused(nora_dir, linear_shapes):  # finding 17
    edit_config(nora_dir, alpha=1e300)
    refused(nora_dir, "scaling", expected=linear_shapes)


def test_targets_must_be_the_bases_own_linear_layers(nora_dir, linear_shapes):  # finding 4
    def retarget(t):
        for k in list(t):
            t[k.replace("q_proj.", "q_proj.base.")] = t.pop(k)

    edit_tensors(nora_dir, retarget)
    message = refused(nora_dir, "no such layer", expected=linear_shapes)
    assert "q_proj.base" in message


def test_rank_limit(tmp_path, base, linear_shapes):  # finding 6
    save(base, AdapterSpec(r=16, target_modules=["k_proj"]), tmp_path)  # k_proj is 32 -> 16: min(d, k) = 16
    assert read_checkpoint(tmp_path, expected=linear_shapes).max_rank == 16
    refused(tmp_path, r"max rank 8", expected=linear_shapes, max_rank=8)
    edit_config(tmp_path, r=32)
    edit_tensors(
        tmp_path, lambda t: t.update({k: torch.zeros(32, 32) if "up" in k else torch.zeros(16, 32) for k in t})
    )
    refused(tmp_path, r"min\(out, in\) of that layer, 16", expected=linear_shapes)


def test_wider_base_names_layer_and_shapes(tmp_path, linear_shapes):
    wide = tiny_causal_lm("llama", hidden_size=48)
    save(wide, AdapterSpec(r=4, target_modules=["q_proj"]), tmp_path)
    message = refused(tmp_path, "does not fit this base model", expected=linear_shapes)
    assert f"{ATTN}.q_proj.nora_up" in message and "(4, 48)" in message and "(4, 32)" in message


def test_check_shapes_lists_every_problem():
    with pytest.raises(CheckpointError) as err:
        check_shapes({"a": (2, 3), "b": (1,)}, {"a": (2, 4), "c": (5,)}, "'x'")
    text = str(err.value)
    assert "a: adapter has shape (2, 3), the model needs (2, 4)" in text
    assert "b: in the adapter but the model has no such layer" in text
    assert "c: expected by the config but missing" in text
    check_shapes({"a": (2, 3)}, {"a": (2, 3), "c": (1,)}, "'x'", require_all=False)


def test_read_config_returns_the_validated_config(nora_dir):
    config = read_config(nora_dir)
    assert config.r == 4 and config.activation == "silu"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["nora", "lora", "dora"])
def test_check_fits_model_before_peft_loads(tmp_path, arch, method):
    """The lab's check: header shapes against the model's linear (or Conv1D) layers and the config's rank."""
    base = tiny_causal_lm(arch)
    save(base, AdapterSpec(method=method, r=4), tmp_path / "a")
    check_fits_model(tmp_path / "a", base)  # fits the model it was trained on (DoRA's magnitudes left to peft)
    wider = tiny_causal_lm(arch, **({"n_embd": 48} if arch == "gpt2" else {"hidden_size": 48}))
    with pytest.raises(CheckpointError, match=r"(?s)does not fit.*needs \(4, 48\)"):
        check_fits_model(tmp_path / "a", wider, label="'a'")


# -- hostile files: nesting, FIFOs, links out of the folder, values that overflow the compute dtype ----------------
def nested_safetensors(path: Path, depth: int = 100_000) -> None:
    """A weights file whose header is valid-looking JSON nested ``depth`` brackets deep."""
    header = b'{"a":' + b"[" * depth + b"]" * depth + b"}"
    header += b" " * (-len(header) % 8)
    path.write_bytes(len(header).to_bytes(8, "little") + header)


def test_deeply_nested_config_is_refused(nora_dir):
    (nora_dir / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    refused(nora_dir, "nested too deeply")


def test_deeply_nested_weights_header_is_refused(nora_dir):
    nested_safetensors(nora_dir / "adapter_model.safetensors")
    refused(nora_dir, "nested too deeply")


def finishes_within(seconds: float, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``'s result or exception, failing the test if it blocks longer than ``seconds``."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 -- handed back to the test
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{fn.__name__} blocked for over {seconds}s"
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json"])
def test_a_fifo_is_refused_without_blocking(nora_dir, name):
    (nora_dir / name).unlink()
    os.mkfifo(nora_dir / name)
    with pytest.raises(CheckpointError, match=f"{name} is not a regular file") as err:
        finishes_within(10, read_checkpoint, nora_dir, label="'x'")
    assert str(nora_dir) not in str(err.value)


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json"])
def test_links_that_leave_the_folder_are_refused_unread(tmp_path, base, name):
    root = tmp_path / "adapters"
    save(base, AdapterSpec(r=4, target_modules=["q_proj"]), root / "a")
    secret, inside = tmp_path / "secret", root / "a" / "moved"
    for folder in (secret, inside):
        folder.mkdir()
        (folder / name).write_bytes((root / "a" / name).read_bytes())
    (root / "a" / name).unlink()
    os.symlink(secret / name, root / "a" / name)
    message = refused(root / "a", f"{name} is a link to a file outside", within=root)
    assert str(secret) not in message
    assert read_checkpoint(root / "a", within=tmp_path).modules  # the same link, inside the allowed folder
    (root / "a" / name).unlink()
    os.symlink(inside / name, root / "a" / name)
    assert read_checkpoint(root / "a", within=root).modules  # a link that stays inside is followed


def test_values_that_overflow_the_compute_dtype_are_refused(nora_dir, linear_shapes):
    def huge(tensors):
        for k, v in tensors.items():
            if "up" in k:
                tensors[k] = v.to(torch.float64)
                tensors[k][0, 0] = 1e300  # finite in float64, inf in float32 and bfloat16

    edit_tensors(nora_dir, huge)
    assert read_checkpoint(nora_dir, expected=linear_shapes, dtype=torch.float64).modules  # fits float64
    message = refused(nora_dir, "too large for float32", expected=linear_shapes, dtype=torch.float32)
    assert "1e+300" in message
    refused(nora_dir, "too large for bfloat16", expected=linear_shapes, dtype=torch.bfloat16)


def test_the_scaling_folded_into_w_down_must_not_overflow(nora_dir, linear_shapes):
    edit_config(nora_dir, alpha=40)  # scaling alpha/r = 10
    scaling = next(iter(read_checkpoint(nora_dir).modules.values()))[2]
    assert scaling == pytest.approx(10)
    big = torch.finfo(torch.float32).max / 2  # finite in float32 on its own, not times 10

    def huge(tensors):
        for k, v in tensors.items():
            if "down" in k:
                v[0, 0] = big

    edit_tensors(nora_dir, huge)
    read_checkpoint(nora_dir, expected=linear_shapes, dtype=torch.float64)
    refused(nora_dir, "times the scaling 10", expected=linear_shapes, dtype=torch.float32)


def test_peft_s_own_loader_refuses_a_nested_header_and_a_fifo_cleanly(nora_dir):
    """``NoraConfig.from_pretrained`` (what ``PeftModel.from_pretrained`` calls first) checks the weights file through
    ``adapter_files``: a header nested too deeply is a clear error, not a RecursionError, and a FIFO never blocks."""
    from nora_peft import NoraConfig

    weights = nora_dir / "adapter_model.safetensors"
    nested_safetensors(weights)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        NoraConfig.from_pretrained(str(nora_dir))
    weights.unlink()
    os.mkfifo(weights)
    with pytest.raises(CheckpointError, match="not a regular file"):
        finishes_within(10, NoraConfig.from_pretrained, str(nora_dir))
