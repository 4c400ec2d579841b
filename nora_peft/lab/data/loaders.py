"""Data sources -> records ``{"id", "prompt", "response", "answer"}``, through ``datasets`` for real files.

``load_source(source)`` understands:

* ``"arith"``, ``"logistic"``, ``"reasoning"``: the synthetic tasks (options ``n``, ``seed`` ...);
* ``"gsm8k"``: ``$NORA_DATA_DIR/gsm8k/{train,test}.jsonl`` (``question`` / ``answer`` with ``#### N``); the prompt is
  the question plus :data:`GSM8K_INSTRUCTION` (option ``instruction=""`` leaves it out), the response the worked
  solution without calculator annotations, ending with the ``#### N`` line;
* ``"slimorca"``, ``"mathinstruct"``: need ``path=`` (a local file or folder) or ``"slimorca:PATH"``; without a path
  the hub ids ``Open-Orca/SlimOrca`` / ``TIGER-Lab/MathInstruct`` are tried (only where a hub is reachable);
* any local ``.jsonl/.json/.parquet/.csv`` file or folder of them, or a hub id, with ``field_map``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from ...io import data_dir
from . import synthetic

SYNTHETIC = {
    "arith": synthetic.arithmetic_problems,
    "logistic": synthetic.logistic_map_problems,
    "reasoning": synthetic.reasoning_mix,
}
HUB_IDS = {"slimorca": "Open-Orca/SlimOrca", "mathinstruct": "TIGER-Lab/MathInstruct", "gsm8k": "openai/gsm8k"}
PROMPT_FIELDS = ("prompt", "instruction", "question", "input", "query")
RESPONSE_FIELDS = ("response", "output", "completion", "solution", "answer")
CONVERSATION_FIELDS = ("conversations", "messages")
SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
#: Appended to each GSM8K question: asks for the final answer in GSM8K's own "#### N" form, which the scorer reads and
#: where generation stops early (an instruct model answers zero-shot in this form more often when told to).
GSM8K_INSTRUCTION = "\n\nSolve it step by step. End with the final answer, a number, on its own line as: #### <number>"


def load_source(
    source: str,
    *,
    field_map: dict[str, str] | None = None,
    limit: int | None = None,
    seed: int = 0,
    **options: Any,
) -> dict[str, list[dict]]:
    """The splits ``source`` natively has (``{"train": [...]}`` or with ``"test"``), as records."""
    kind, _, path = source.partition(":") if source.split(":", 1)[0] in (*HUB_IDS, "svamp") else (source, "", "")
    path = options.pop("path", None) or path
    if kind in SYNTHETIC:
        n = options.pop("n", 2000 if limit is None else limit)
        splits = {"train": SYNTHETIC[kind](n=n, seed=seed, **options)}
    elif kind == "gsm8k":
        splits = _gsm8k(path or str(data_dir() / "gsm8k"), options.pop("instruction", GSM8K_INSTRUCTION))
    elif kind == "svamp":
        splits = {"train": _svamp(Path(path) if path else data_dir() / "svamp")}
    elif kind in ("slimorca", "mathinstruct"):
        local = data_dir() / kind
        raw = _read_any(path or (str(local) if local.exists() else HUB_IDS[kind]))
        fm = (
            {"conversations": "conversations"}
            if kind == "slimorca"
            else {"prompt": "instruction", "response": "output"}
        )
        splits = {name: _to_records(rows, {**fm, **(field_map or {})}, f"{kind}-{name}") for name, rows in raw.items()}
    else:
        raw = _read_any(source)
        splits = {name: _to_records(rows, field_map, f"{Path(source).stem}-{name}") for name, rows in raw.items()}
    if limit is not None:
        splits = {k: v[:limit] for k, v in splits.items()}
    if not any(splits.values()):
        raise ValueError(f"Data source {source!r} gave no records (empty files, or limit={limit}).")
    return splits


def _gsm8k(folder: str, instruction: str = GSM8K_INSTRUCTION) -> dict[str, list[dict]]:
    if not os.path.isdir(folder):
        raw = _read_any(HUB_IDS["gsm8k"], hub_name="main")
    else:
        raw = {s: _read_file(os.path.join(folder, f"{s}.jsonl")) for s in ("train", "test")}
    splits = {}
    for split, rows in raw.items():
        records = []
        for i, row in enumerate(rows):
            solution, _, final = row["answer"].rpartition("####")
            answer = normalize_number(final)
            steps = re.sub(r"<<[^>]*>>", "", solution).strip()  # drop the calculator annotations
            records.append(
                {
                    "id": f"gsm8k-{split}-{i}",
                    "prompt": row["question"].strip() + instruction,
                    "response": f"{steps}\n#### {answer}",
                    "answer": answer,
                }
            )
        splits[split] = records
    return splits


def _svamp(path: Path) -> list[dict]:
    """SVAMP (``SVAMP.json``: Body, Question, Equation, Answer): response = the equation, then the answer line."""
    file = path / "SVAMP.json" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"SVAMP not found at {file}; set NORA_DATA_DIR or pass `svamp:/path/to/SVAMP.json`.")
    records = []
    for row in json.loads(file.read_text()):
        answer = normalize_number(str(row["Answer"]))
        equation = " ".join(row["Equation"].replace(".0 ", " ").replace(".0)", ")").split())
        records.append(
            {
                "id": f"svamp-{row['ID']}",
                "prompt": f"{row['Body'].strip().rstrip('.')}. {row['Question'].strip()}",
                "response": f"{equation} = {answer}\nThe answer is {answer}.",
                "answer": answer,
            }
        )
    return records


def normalize_number(text: str) -> str:
    """``" $1,234.50. "`` -> ``"1234.5"``, ``"0.6190"`` -> ``"0.619"``, ``"18.0"`` -> ``"18"``, ``"- 7"`` and
    ``"\u22127"`` (unicode minus) -> ``"-7"``; other text: stripped of commas, ``$`` and a final period."""
    s = text.strip().replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = float("".join(s.replace("\u2212", "-").split()))
    except ValueError:
        return s
    return str(int(value)) if value.is_integer() else str(value)


def _read_file(path: str) -> list[dict]:
    from datasets import load_dataset

    fmt = SUFFIXES[Path(path).suffix]
    if fmt != "parquet" and _is_blank(path):
        raise ValueError(f"Data file {path} is empty: it holds no records. Pass a file with at least one row.")
    try:
        return list(load_dataset(fmt, data_files=path, split="train"))
    except Exception as e:  # datasets raises bare StopIteration / ArrowInvalid on broken files
        raise ValueError(
            f"Could not read {path} as {fmt} ({type(e).__name__}: {e}). Check that the file is valid {fmt}."
        ) from None


def _is_blank(path: str) -> bool:
    """True when a text file holds only whitespace (read in chunks: data files can be gigabytes)."""
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return False
    return True


def _read_any(source: str, hub_name: str | None = None) -> dict[str, list[dict]]:
    """A local file, a folder of files (``train.*`` / ``test.*`` name the splits) or a hub id."""
    p = Path(source)
    if p.is_file():
        if p.suffix not in SUFFIXES:
            raise ValueError(f"Unsupported data file {source}: use one of {sorted(SUFFIXES)}.")
        return {"train": _read_file(str(p))}
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in SUFFIXES)
        if not files:
            raise ValueError(f"Folder {source} holds no {sorted(SUFFIXES)} files.")
        splits: dict[str, list[dict]] = {}
        for f in files:
            split = "test" if f.stem.startswith("test") else "validation" if f.stem.startswith("val") else "train"
            splits.setdefault(split, []).extend(_read_file(str(f)))
        return splits
    if source.startswith((".", "/", "~")) or Path(source).suffix in SUFFIXES:
        raise FileNotFoundError(f"Data file {source} does not exist.")
    from datasets import load_dataset

    try:
        ds = load_dataset(source, hub_name) if hub_name else load_dataset(source)
    except Exception as e:  # offline machines: say what to do instead
        raise ValueError(
            f"Could not load {source!r} from the hub ({type(e).__name__}: {e}). Offline, pass a local file or "
            "folder instead (e.g. `--data slimorca:/path/to/slimorca.jsonl` or `--data my.jsonl --field-map ...`)."
        ) from None
    return {name: list(split) for name, split in ds.items()}


def _to_records(rows: list[dict], field_map: dict[str, str] | None, prefix: str) -> list[dict]:
    if not rows:
        return []
    fields = list(rows[0].keys())
    fm = dict(field_map or {})
    for key in fm.values():
        if key not in fields:
            raise ValueError(f"Field {key!r} (from field_map {fm}) is not in the data; fields that exist: {fields}.")
    conv = fm.get("conversations") or next((f for f in CONVERSATION_FIELDS if f in fields and "prompt" not in fm), None)
    if conv:
        return [_conversation_record(row[conv], row, fm, f"{prefix}-{i}") for i, row in enumerate(rows)]
    prompt = fm.get("prompt") or next((f for f in PROMPT_FIELDS if f in fields), None)
    response = fm.get("response") or next((f for f in RESPONSE_FIELDS if f in fields and f != prompt), None)
    if prompt is None or response is None:
        raise ValueError(
            f"Could not find prompt/response fields; fields that exist: {fields}. Pass a field map, e.g. "
            "--field-map prompt=question,response=solution (or conversations=messages)."
        )
    answer = fm.get("answer")
    out = []
    for i, row in enumerate(rows):
        if row[prompt] is None or row[response] is None:
            continue
        rid = str(row[fm["id"]]) if "id" in fm else f"{prefix}-{i}"
        out.append(
            {
                "id": rid,
                "prompt": str(row[prompt]),
                "response": str(row[response]),
                "answer": None if answer is None or row[answer] is None else normalize_number(str(row[answer])),
            }
        )
    return out


def _conversation_record(turns: list[dict], row: dict, fm: dict, rid: str) -> dict:
    """ShareGPT / chat turns -> one record: everything before the last assistant turn is the prompt."""

    def role(t: dict) -> str:
        return str(t.get("from", t.get("role", ""))).lower()

    def text(t: dict) -> str:
        return str(t.get("value", t.get("content", "")))

    last = max((i for i, t in enumerate(turns) if role(t) in ("gpt", "assistant")), default=None)
    if last is None:
        return {"id": rid, "prompt": "\n\n".join(text(t) for t in turns), "response": "", "answer": None}
    prompt = "\n\n".join(text(t) for t in turns[:last])
    return {
        "id": str(row[fm["id"]]) if "id" in fm else rid,
        "prompt": prompt,
        "response": text(turns[last]),
        "answer": None,
    }
