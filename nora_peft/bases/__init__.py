"""Named base models, shared by the lab and the server (below both; heavy imports happen inside the functions).

- ``named``: ``--model NAME`` resolution (``default``, ``smollm2-135m``, else a local folder or hub id) and loading;
- ``embedded``: the embedded 0.8M-parameter default base, pretrained on generated text (``nora base``);
- ``shapes``: random-init models of real architectures for benchmarks (``shape:llama-3-8b``, ...).
"""

from .named import NAMED_BASES, load_model_and_tokenizer, resolve_model

__all__ = ["NAMED_BASES", "load_model_and_tokenizer", "resolve_model"]
