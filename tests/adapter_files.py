"""Edit a saved adapter folder in place (tests of what loading refuses)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file


def edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def edit_tensors(folder: Path, change) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))
