"""Eq. 2's branch for the tuner: the training autograd function, the float reference and the activation table.

The math lives in the kernel seam (``nora_peft.kernels``: ``reference.py`` for torch, ``activations.py`` for the
table); this module names what the tuner and its users import, so ``from nora_peft.tuner.ops import nora_delta``
keeps working.
"""

from __future__ import annotations

from ..kernels.activations import ACTIVATIONS, activation_backward, activation_fn
from ..kernels.reference import nora_delta, nora_delta_reference

__all__ = ["ACTIVATIONS", "activation_backward", "activation_fn", "nora_delta", "nora_delta_reference"]
