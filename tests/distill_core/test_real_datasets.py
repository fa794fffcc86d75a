"""The real datasets from their release files: every file of ../shared/data loads with the
counts SOURCES.md gives, prompts are the lm-evaluation-harness's byte for byte, malformed rows
are errors naming file and line (or skipped and counted), and GSM8K is scored as the harness
scores it."""

import json

import pytest

from distill_core import real_datasets as real
from distill_core.config import load_config
from distill_core.tasks import (gsm8k_flexible, gsm8k_normalize, gsm8k_strict, load_task_splits,
                                render_prompt, select_shots)

# SOURCES.md: rows per file.
MMLU_COUNTS = {  # subject: (dev, val, test or None when withheld)
    "biology": (5, 32, 310), "chemistry": (5, 22, 203), "computer_science": (5, 9, 100),
    "european_history": (5, 18, 165), "geography": (5, 22, 198),
    "government_and_politics": (5, 21, 193), "macroeconomics": (5, 43, 390),
    "mathematics": (5, 29, 270), "microeconomics": (5, 26, 238), "physics": (5, 17, 151),
    "psychology": (5, 60, 545), "statistics": (5, 23, None), "us_history": (5, 22, 204),
    "world_history": (5, 26, None)}


def test_every_file_loads_with_the_documented_counts(shared_data):
    assert len(real.load_local("sst2", shared_data, "train").rows) == 67349
    dev = real.load_local("sst2", shared_data, "dev").rows
    assert len(dev) == 600 and sum(r["label"] for r in dev) == 306  # 306 positive / 294 negative
    assert len(real.load_local("gsm8k", shared_data, "train").rows) == 7473
    assert len(real.load_local("gsm8k", shared_data, "test").rows) == 1000
    for i, split in enumerate(("dev", "val", "test")):
        found = {s.removeprefix("high_school_") for s in real.mmlu_subjects(shared_data, split)}
        assert found == {s for s, n in MMLU_COUNTS.items() if n[i] is not None}
        for subject in found:
            rows = real.load_local("mmlu", shared_data, split, subjects=[f"high_school_{subject}"]).rows
            assert len(rows) == MMLU_COUNTS[subject][i], (subject, split)  # CRLF files included
    test = real.load_local("mmlu", shared_data, "test").rows
    assert len(test) == 2967 and len({r["id"] for r in test}) == 2967


def test_prompts_are_the_harness_prompts_byte_for_byte(shared_data):
    sst2 = real.load_local("sst2", shared_data, "dev").rows[0]
    assert render_prompt(sst2, []) == ("it 's a charming and often affecting journey . "
                                       "\nQuestion: Is this sentence positive or negative?\nAnswer:")
    assert sst2["choices"] == [" negative", " positive"] and sst2["label"] == 1

    dev = real.load_local("mmlu", shared_data, "dev", subjects=["high_school_biology"]).rows
    test = real.load_local("mmlu", shared_data, "test", subjects=["high_school_biology"]).rows[0]
    prompt = render_prompt(test, select_shots(test, dev, 5))
    first_shot = ("Which of the following is not a way to form recombinant DNA?\nA. Translation\n"
                  "B. Conjugation\nC. Specialized transduction\nD. Transformation\nAnswer: A\n\n")
    assert prompt.startswith("The following are multiple choice questions (with answers) about "
                             "high school biology.\n\n" + first_shot)
    assert prompt.count("\nAnswer:") == 6 and prompt.count("\n\n") == 6
    q = test["prompt"]
    assert prompt.endswith("\n\n" + q) and q.endswith("\nAnswer:") and "\nD. " in q
    assert test["choices"] == [" A", " B", " C", " D"]

    train = real.load_local("gsm8k", shared_data, "train").rows
    gsm = real.load_local("gsm8k", shared_data, "test").rows[0]
    with open(shared_data / "gsm8k" / "train.jsonl", encoding="utf-8") as f:
        shots = [json.loads(next(f)) for _ in range(5)]
    with open(shared_data / "gsm8k" / "test.jsonl", encoding="utf-8") as f:
        doc = json.loads(next(f))
    expected = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
    assert render_prompt(gsm, train[:5]) == expected + f"Question: {doc['question']}\nAnswer:"
    assert gsm["target"] == "18"


def test_malformed_rows_name_file_and_line_or_are_skipped_and_counted(tmp_path):
    (tmp_path / "sst2").mkdir()
    bad = tmp_path / "sst2" / "dev.tsv"
    bad.write_text("sentence\tlabel\ngood film . \t1\nno label here\nbad film . \t7\n")
    with pytest.raises(real.BadRow, match=r"dev.tsv:3: expected 'sentence<TAB>label'"):
        real.load_local("sst2", tmp_path, "dev")
    skipped = real.load_local("sst2", tmp_path, "dev", bad_rows="skip")
    assert len(skipped.rows) == 1 and len(skipped.skipped) == 2
    assert "dev.tsv:4: label '7' is not 0 or 1" in skipped.skipped[1]

    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text(
        json.dumps({"question": "1+1?", "answer": "1+1=2\n#### 2"}) + "\n"
        + json.dumps({"question": "2+2?", "answer": "four"}) + "\n{not json\n")
    with pytest.raises(real.BadRow, match=r"test.jsonl:2: the answer has no '#### <number>'"):
        real.load_local("gsm8k", tmp_path, "test")
    assert len(real.load_local("gsm8k", tmp_path, "test", bad_rows="skip").skipped) == 2

    (tmp_path / "mmlu" / "test").mkdir(parents=True)
    # A quoted field with a newline spans two lines: the bad row after it is on line 3.
    (tmp_path / "mmlu" / "test" / "x_test.csv").write_text(
        '"a\nquestion",1,2,3,4,B\r\nq,1,2,3,4,E\r\n')
    with pytest.raises(real.BadRow, match=r"x_test.csv:3: answer 'E' is not one of A, B, C, D"):
        real.load_local("mmlu", tmp_path, "test")
    with pytest.raises(FileNotFoundError, match="y_test.csv"):
        real.load_local("mmlu", tmp_path, "test", subjects=["y"])


def test_gsm8k_scoring_is_the_harness_strict_and_flexible_match():
    assert gsm8k_strict("so 3 + 4 = 7\n#### 7") == "7"
    assert gsm8k_strict("the answer is 7") == "[invalid]"
    assert gsm8k_flexible("3 + 4 = 7 apples, total $1,200.") == "$1,200."
    assert gsm8k_normalize("$1,200.") == gsm8k_normalize(" 12*100=<<12*100=1200>>\n#### 1200") == "1200"
    assert gsm8k_flexible("no digits") == "[invalid]"


def test_hub_records_become_the_same_rows(shared_data):
    local = real.load_local("sst2", shared_data, "dev").rows[:3]
    records = [{"sentence": r["prompt"].split("\nQuestion:")[0], "label": r["label"], "idx": i}
               for i, r in enumerate(local)]
    assert real.rows_from_hub_records("sst2", records, "dev").rows == local
    with pytest.raises(real.BadRow, match=r"nyu-mll/glue\[dev\]:0: .*label 5"):
        real.rows_from_hub_records("sst2", [{"sentence": "x", "label": 5}], "dev")


def test_the_real_preset_samples_disjoint_splits_of_the_configured_sizes(shared_data):
    cfg = load_config("real", {"data.dir": str(shared_data)})
    splits = {}
    for task in ("sst2", "mmlu", "gsm8k"):
        loaded = load_task_splits(task, cfg.data)
        s = splits[task] = loaded.splits
        assert len(s["train"]) == cfg.data.train_size[task] and len(s["eval"]) == cfg.data.eval_size[task]
        assert not set(s["eval"]["id"]) & set(s["fewshot"]["id"])  # a shot is never evaluated on
        assert not set(s["train"]["id"]) & set(s["eval"]["id"]) and loaded.skipped == []
    assert splits["sst2"]["fewshot"].empty  # zero shots: no pool (SST-2's would be 67k rows)
    # GSM8K's pool is its whole train split, as the harness's sampler draws from it.
    assert len(splits["gsm8k"]["fewshot"]) == len(real.load_local("gsm8k", shared_data, "train").rows)
    assert set(splits["gsm8k"]["train"]["subject"]) == {"math"}
    mmlu = splits["mmlu"]
    assert set(mmlu["eval"]["subject"]) <= set(cfg.data.subjects) and len(mmlu["fewshot"]) == 50
