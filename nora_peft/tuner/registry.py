"""Register NoRA with peft: the one shim this project needs.

peft 0.21 has no public plugin registry: ``peft.utils.register_peft_method`` only accepts members of its closed
``PeftType`` enum (peft #2273, #2282). ``PeftConfig.peft_type`` is typed ``Union[str, PeftType]`` and string peft
types are supported since peft #2635, so NoRA is registered under the *string* ``"NORA"`` in peft's three mapping
dicts (config class, tuner class, parameter prefix). Nothing is written to disk and no peft object other than those
three dicts is touched; registering twice is a no-op. ``PeftType`` is a ``str`` enum, so the string key cannot
collide with or shadow any built-in method.
"""

from __future__ import annotations

from peft import mapping

from .config import NORA_PEFT_TYPE, NoraConfig
from .model import NoraModel


def register() -> None:
    """Make ``get_peft_model``, ``PeftModel.from_pretrained`` and ``PeftConfig.from_pretrained`` know NoRA."""
    entries = [
        (mapping.PEFT_TYPE_TO_CONFIG_MAPPING, NoraConfig),
        (mapping.PEFT_TYPE_TO_TUNER_MAPPING, NoraModel),
        (mapping.PEFT_TYPE_TO_PREFIX_MAPPING, NoraModel.prefix),
    ]
    for table, value in entries:
        current = table.get(NORA_PEFT_TYPE)
        if current is not None and repr(current) != repr(value):  # another package claimed "NORA"
            raise RuntimeError(f"peft already has a different method registered as {NORA_PEFT_TYPE!r}: {current!r}")
        table[NORA_PEFT_TYPE] = value


def is_registered() -> bool:
    """True when peft resolves the ``"NORA"`` peft type to this package's classes."""
    return (
        mapping.PEFT_TYPE_TO_CONFIG_MAPPING.get(NORA_PEFT_TYPE) is NoraConfig
        and mapping.PEFT_TYPE_TO_TUNER_MAPPING.get(NORA_PEFT_TYPE) is NoraModel
        and mapping.PEFT_TYPE_TO_PREFIX_MAPPING.get(NORA_PEFT_TYPE) == NoraModel.prefix
    )
