"""Run dir or model -> perplexity, generation accuracy, logistic-map scores, the base's perplexity beside them;
``nora eval``.

Modules (mirroring ``lab/train/``):

* ``inference``: the model's device, pad id, autocast, the no-grad eval context, the bf16 decoding copy, batches of
  similar length;
* ``perplexity``: token-weighted ``exp(sum NLL / sum tokens)`` over response tokens (exactly the tokens training
  puts a loss on) and over every token, one forward pass per batch;
* ``generation``: batched greedy decoding with the KV cache, left padding, an early stop per row at EOS or once its
  ``#### N`` line is complete; what a row generates does not depend on the batch;
* ``scoring``: exact match of ``extract_answer`` against the record's ``answer`` with a 95% Wilson interval
  (``lab/stats.py``), and for the logistic-map task the error per step and *state collapse*;
* ``loading``: an adapter checked against its base, a finished run dir with the splits it was trained on;
* ``base_reference``: the base's perplexity on the same records, cached per base and records;
* ``run``: ``evaluate_records`` and ``evaluate_run(run_dir)`` (writes ``eval_<split>.json``);
* ``summary``: the result as a few lines (three significant digits, words where there is no number); ``cli``.
"""

from __future__ import annotations

from .base_reference import base_fingerprint, base_perplexity
from .cli import add_arguments, main
from .generation import default_max_new_tokens, generate, generation_accuracy, prompt_ids
from .inference import autocast, decode_weights
from .loading import AdapterMismatchError, load_adapter, load_run
from .perplexity import perplexities, perplexity
from .run import evaluate_records, evaluate_run
from .scoring import N_EXAMPLES, is_logistic, score_answers, score_logistic
from .summary import format_summary, significant

__all__ = [
    "N_EXAMPLES",
    "AdapterMismatchError",
    "add_arguments",
    "autocast",
    "base_fingerprint",
    "base_perplexity",
    "decode_weights",
    "default_max_new_tokens",
    "evaluate_records",
    "evaluate_run",
    "format_summary",
    "generate",
    "generation_accuracy",
    "is_logistic",
    "load_adapter",
    "load_run",
    "main",
    "perplexities",
    "perplexity",
    "prompt_ids",
    "score_answers",
    "score_logistic",
    "significant",
]
