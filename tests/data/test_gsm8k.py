"""GSM8K: parsing the local jsonl format, splits, scoring and the errors for missing data."""
import json
from pathlib import Path

import pytest

from rlx.data.gsm8k import GSM8K, clean_completion, final_answer
from rlx.errors import RlxError

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "gsm8k"
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason=f"no GSM8K copy at {REAL}")

ROWS = [
    {"question": "Natalia sold 48 clips in April and half as many in May. How many in all?",
     "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nIn all 48+24 = <<48+24=72>>72 clips.\n#### 72"},
    {"question": "A shop sells 1,000 pens a day for 1.234 days. How many pens?",
     "answer": "It sells 1000*1.234 = <<1000*1.234=1234>>1,234 pens.\n#### 1,234"},
]


def write_folder(folder: Path, train: list[dict], test: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_answer_parsing_and_annotation_stripping():
    assert final_answer(ROWS[1]["answer"]) == "1234"
    assert clean_completion(ROWS[0]["answer"]) == " In May she sold 48/2 = 24 clips.\nIn all 48+24 = 72 clips.\n#### 72"


def test_local_folder(tmp_path):
    task = GSM8K(path=str(write_folder(tmp_path, ROWS, ROWS[:1])), num_validation=1)
    assert [len(task.split(n)) for n in ("train", "validation", "test")] == [1, 1, 1]
    example = task.split("test")[0]
    assert example == {
        "prompt": f"Question: {ROWS[0]['question']}\nAnswer:",
        "completion": clean_completion(ROWS[0]["answer"]),
        "answer": "72",
        "question": ROWS[0]["question"],
    }
    assert sorted(e["answer"] for n in ("train", "validation") for e in task.split(n)) == ["1234", "72"]


def test_score_is_numeric(tmp_path):
    task = GSM8K(path=str(write_folder(tmp_path, ROWS, ROWS)), num_validation=1)
    example = {"answer": "18"}
    assert task.score("so #### 18.0", example) == 1.0
    assert task.score("she pays 9 + 9 = 18 dollars", example) == 1.0
    assert task.score("#### 1,8", example) == 0.0
    assert task.score("#### eighteen", example) == 0.0
    assert task.score("nothing", example) == 0.0
    assert task.score(" #### 1,234", {"answer": "1234"}) == 1.0


@pytest.mark.parametrize("missing", ["folder", "train.jsonl", "test.jsonl"])
def test_missing_data_names_the_path_and_the_fix(tmp_path, missing):
    folder = write_folder(tmp_path / "gsm8k", ROWS, ROWS)
    if missing == "folder":
        folder = target = tmp_path / "nowhere"
    else:
        target = folder / missing
        target.unlink()
    with pytest.raises(RlxError) as error:
        GSM8K(path=str(folder), num_validation=1)
    assert str(target) in str(error.value)
    assert "data.path=" in str(error.value) and "data.source=hub" in str(error.value)


def test_no_path_and_bad_source():
    with pytest.raises(RlxError, match="data.path="):
        GSM8K()
    with pytest.raises(RlxError, match="local"):
        GSM8K(path="x", source="s3")


@needs_real
def test_real_splits():
    task = GSM8K(path=str(REAL))
    splits = {n: task.split(n) for n in ("train", "validation", "test")}
    assert [len(s) for s in splits.values()] == [7473 - 500, 500, 1319]
    for example in (e for s in splits.values() for e in s):
        assert "<<" not in example["completion"] and example["completion"].startswith(" ")
        assert example["completion"].rsplit("#### ", 1)[1].replace(",", "") == example["answer"]
        assert task.score(example["completion"], example) == 1.0
    assert splits["validation"] == GSM8K(path=str(REAL)).split("validation")
    assert splits["validation"] != GSM8K(path=str(REAL), seed=1).split("validation")
