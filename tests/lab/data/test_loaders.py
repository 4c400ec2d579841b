"""Loaders: real GSM8K from the shared data dir, SlimOrca / MathInstruct / generic files, errors, splits."""

from __future__ import annotations

import json

import pytest

from nora_peft.lab.data import describe_splits, extract_answer, load_source, make_splits
from nora_peft.lab.data.loaders import GSM8K_INSTRUCTION


def test_gsm8k_real_files(gsm8k_dir):
    splits = load_source("gsm8k", path=str(gsm8k_dir))
    assert len(splits["train"]) == 7473 and len(splits["test"]) == 1319
    first = splits["train"][0]
    # GSM8K's own final line stays (the scorer reads it); the calculator annotations go
    assert first["answer"] == "72" and first["response"].endswith("\n#### 72") and "<<" not in first["response"]
    assert first["prompt"].startswith("Natalia sold clips") and first["prompt"].endswith(GSM8K_INSTRUCTION)
    assert all(extract_answer(r["response"]) == r["answer"] for r in splits["test"])
    bare = load_source("gsm8k", path=str(gsm8k_dir), instruction="")["train"][0]
    assert bare["prompt"] + GSM8K_INSTRUCTION == first["prompt"]
    final = make_splits(splits, seed=0, val_size=100)
    assert len(final["test"]) == 1319 and len(final["validation"]) == 100 and len(final["train"]) == 7373


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_slimorca_conversations(tmp_path):
    rows = [
        {
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": f"Q{i}?"},
                {"from": "gpt", "value": f"A{i}."},
            ]
        }
        for i in range(5)
    ]
    recs = load_source("slimorca", path=str(_write_jsonl(tmp_path / "so.jsonl", rows)))["train"]
    assert recs[2]["prompt"] == "Be brief.\n\nQ2?" and recs[2]["response"] == "A2." and recs[2]["answer"] is None
    same = load_source(f"slimorca:{tmp_path / 'so.jsonl'}")["train"]
    assert same == recs


def test_mathinstruct_and_generic_formats(tmp_path):
    rows = [{"instruction": f"Add {i} and 1.", "output": f"{i + 1}", "source": "x"} for i in range(6)]
    recs = load_source("mathinstruct", path=str(_write_jsonl(tmp_path / "mi.jsonl", rows)))["train"]
    assert recs[3]["prompt"] == "Add 3 and 1." and recs[3]["response"] == "4"
    import pandas as pd

    frame = pd.DataFrame({"q": ["a?", "b?"], "sol": ["A", "B"], "final": ["1,000", "2.0"]})
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_parquet(tmp_path / "d.parquet")
    for name in ("d.csv", "d.parquet"):
        out = load_source(str(tmp_path / name), field_map={"prompt": "q", "response": "sol", "answer": "final"})
        assert [r["answer"] for r in out["train"]] == ["1000", "2"] and out["train"][1]["prompt"] == "b?"


def test_unknown_field_names_list_the_fields(tmp_path):
    path = _write_jsonl(tmp_path / "x.jsonl", [{"question": "a", "solution": "b"}])
    with pytest.raises(ValueError, match=r"'prompt_text'.*fields that exist: \['question', 'solution'\]"):
        load_source(str(path), field_map={"prompt": "prompt_text", "response": "solution"})
    bad = _write_jsonl(tmp_path / "y.jsonl", [{"foo": 1, "bar": 2}])
    with pytest.raises(ValueError, match=r"fields that exist: \['foo', 'bar'\]"):
        load_source(str(bad))


def test_missing_file_and_empty_data(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_source(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="gave no records"):
        load_source("arith", limit=0)


def test_empty_and_broken_files_name_the_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match=r"empty\.jsonl is empty"):
        load_source(str(empty))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "response": "b"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"Could not read .*broken\.jsonl as json"):
        load_source(str(broken))


def test_splits_are_deterministic_disjoint_and_sized():
    native = load_source("reasoning", n=200, seed=1)
    a = make_splits(native, seed=5, val_size=0.1, test_size=0.2)
    b = make_splits(native, seed=5, val_size=0.1, test_size=0.2)
    c = make_splits(native, seed=6, val_size=0.1, test_size=0.2)
    assert a == b and a != c
    assert (len(a["train"]), len(a["validation"]), len(a["test"])) == (140, 20, 40)
    ids = [set(r["id"] for r in part) for part in a.values()]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2]) and sum(map(len, ids)) == 200
    desc = describe_splits(a, source="reasoning", seed=5)
    assert desc["counts"] == {"train": 140, "validation": 20, "test": 40} and desc["ids"]["test"] == [
        r["id"] for r in a["test"]
    ]


def test_svamp_real_file_equations_recompute_the_answers():
    from nora_peft.io import data_dir

    file = data_dir() / "svamp" / "SVAMP.json"
    if not file.exists():
        pytest.skip(f"SVAMP not found at {file}")
    raw = json.loads(file.read_text())
    recs = load_source("svamp")["train"]
    assert len(recs) == len(raw) == 1000 and len({r["id"] for r in recs}) == 1000
    for rec, row in zip(recs, raw):
        equation, final = rec["response"].split("\n")
        lhs, rhs = equation.rsplit(" = ", 1)
        value = eval(lhs, {"__builtins__": {}})  # the equation as written gives the answer ...
        assert abs(value - row["Answer"]) < 1e-6 or rec["id"] == "svamp-chal-680"  # ... except SVAMP's one mislabel
        assert (
            final == f"The answer is {rec['answer']}."
            and float(rec["answer"]) == row["Answer"]
            and rhs == rec["answer"]
        )
        assert row["Question"].strip() in rec["prompt"]
