"""The synthetic tasks: deterministic, disjoint, and right about their own answers."""

import re

from distill_core.config import TASKS, load_config
from distill_core.tasks import (_ANIMALS, _CITIES, _FOODS, MMLU_LETTERS, SST2_CHOICES, final_number, generate_task)


def _cfg(**sizes):
    return load_config("tiny", {"data.train_size": {t: 300 for t in TASKS},
                                "data.eval_size": {t: 100 for t in TASKS}}).data


def test_same_seed_same_rows_and_other_seed_other_rows():
    cfg = _cfg()
    a, b = generate_task("mmlu", cfg), generate_task("mmlu", cfg)
    assert a["train"].equals(b["train"])
    other = load_config("tiny", {"data.seed": 99}).data
    assert not generate_task("mmlu", other)["train"]["id"].head(20).equals(a["train"]["id"].head(20))


def test_splits_are_disjoint_ids_unique_and_sizes_as_configured():
    cfg = _cfg()
    for task in TASKS:
        splits = generate_task(task, cfg)
        assert len(splits["train"]) == 300 and len(splits["eval"]) == 100
        assert len(splits["fewshot"]) == cfg.fewshot_pool_size
        ids = [i for s in splits.values() for i in s["id"]]
        prompts = [p for s in splits.values() for p in s["prompt"]]
        assert len(set(ids)) == len(ids) and len(set(prompts)) == len(prompts)


def test_sst2_labels_follow_negation_and_the_clause_after_but():
    rows = generate_task("sst2", _cfg())["train"]
    assert set(rows["label"]) == {0, 1}
    checked = 0
    for r in rows.itertuples():
        sentence = r.prompt.split("\n")[0]
        if " but " in sentence or sentence.startswith("although"):
            continue
        positive = any(f" {w} ." in sentence for w in ("good", "great", "brilliant", "moving",
                       "charming", "delightful", "funny", "beautiful", "clever", "wonderful",
                       "sharp", "warm"))
        negated = " not " in sentence
        assert r.label == int(positive != negated), sentence
        assert r.answer == SST2_CHOICES[r.label]
        checked += 1
    assert checked > 50
    assert rows["prompt"].str.contains(" but ").any() and rows["prompt"].str.contains(" not ").any()


def test_mmlu_label_points_at_the_right_option():
    rows = generate_task("mmlu", _cfg())["train"]
    assert set(rows["subject"]) == {"comparison", "biology", "nutrition", "geography"}
    classes = {"biology": _ANIMALS, "nutrition": _FOODS, "geography": _CITIES}
    for r in rows.itertuples():
        options = dict(re.findall(r"^([ABCD])\. (.+)$", r.prompt, flags=re.M))
        right = options[MMLU_LETTERS[r.label]]
        assert r.answer == f" {MMLU_LETTERS[r.label]}"
        if r.subject == "comparison":
            assert int(right) == max(int(v) for v in options.values())
        else:  # the one option of the class asked for; every other option of another class
            cls = re.search(r" (\w+) \?", r.prompt).group(1)
            members = classes[r.subject]
            assert right in members[cls]
            assert all(v not in members[cls] for k, v in options.items() if v != right)
            assert {next(c for c, m in members.items() if v in m) for v in options.values()} == set(members)


def test_gsm8k_answers_end_with_the_final_number_that_the_steps_compute():
    rows = generate_task("gsm8k", _cfg())["train"]
    for r in rows.itertuples():
        assert r.prompt.startswith("Question: ") and r.prompt.endswith("\nAnswer:")
        assert final_number(r.answer) == r.target
        *_, last = re.findall(r"= (\d+)", r.answer)
        assert last == r.target
        assert len(re.findall(r"=", r.answer)) == 2  # two steps


def test_final_number_reads_gsm8k_conventions():
    assert final_number("so 3 + 4 = 7\n#### 1,234") == "1234"
    assert final_number("#### -5") == "-5"
    assert final_number("no answer here") is None


def test_row_problems_name_duplicates_empty_text_and_bad_labels(tiny_data):
    from distill_core.tasks import row_problems

    good = tiny_data["mmlu"]["train"]
    assert row_problems(good) == [] and row_problems(tiny_data["gsm8k"]["train"]) == []
    bad = good.head(4).copy()
    bad.loc[1, "id"] = bad.loc[0, "id"]
    bad.loc[2, "answer"] = "  "
    bad.loc[3, "label"] = 7
    found = row_problems(bad)
    assert len(found) == 3
    assert "1 duplicate ids" in found[0] and "empty answer" in found[1] and "label 7" in found[2]


def test_evaluation_table_problems_name_what_is_missing():
    import pandas as pd

    from distill_core.evaluation import table_problems

    table = pd.DataFrame({"model": ["a", "a", "b"], "task": ["sst2", "mmlu", "sst2"],
                          "accuracy": [0.5, 1.5, 0.2], "n": [10, 10, 10]})
    assert table_problems(table, ["a", "b"], ["sst2", "mmlu"]) == [
        "b x mmlu: not scored", "a x mmlu: accuracy 1.5 on n=10"]
