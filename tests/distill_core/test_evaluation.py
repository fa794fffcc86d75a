"""Batched scoring (shared context where every option is one token, one row an option
otherwise) and batched greedy generation agree with one-at-a-time computation; `kdbench
eval` scores a checkpoint of the demo's format on the real files."""

import torch

import json

import pytest

from distill_core.evaluation import (choice_loglikelihoods, evaluate_task, greedy_generate,
                                    naive_choice_loglikelihoods)
from distill_core.models import load_causal_lm, load_tokenizer


def _manual_loglikelihood(model, tokenizer, context, continuation):
    ctx = [tokenizer.bos_token_id, *tokenizer(context, add_special_tokens=False)["input_ids"]]
    full = [tokenizer.bos_token_id, *tokenizer(context + continuation,
                                               add_special_tokens=False)["input_ids"]]
    n_cont = len(full) - len(ctx)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([full])).logits[0], -1)
    return sum(logprobs[i - 1, full[i]].item() for i in range(len(full) - n_cont, len(full)))


@pytest.mark.parametrize("batch_tokens", [None, 120], ids=["rows", "tokens"])
@pytest.mark.parametrize("choices", [None, [" yes , surely", " no", " A B"]],
                         ids=["one-token options (shared context)", "multi-token options"])
def test_batched_loglikelihoods_equal_one_at_a_time(tiny_teacher_dir, tiny_data, choices, batch_tokens):
    model, tok = load_causal_lm(tiny_teacher_dir), load_tokenizer(tiny_teacher_dir)
    rows = tiny_data["mmlu"]["eval"].head(5).to_dict("records")
    contexts = [r["prompt"] for r in rows]
    contexts[2] = contexts[2] + " and a tail that makes this context the longest of all"
    options = [choices or list(r["choices"]) for r in rows]
    batched = choice_loglikelihoods(model, tok, contexts, options, batch_size=3, max_length=256,
                                    batch_tokens=batch_tokens)
    single = [[_manual_loglikelihood(model, tok, c, a) for a in xs] for c, xs in zip(contexts, options)]
    naive = naive_choice_loglikelihoods(model, tok, contexts, options, max_length=256)
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(single), atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(naive), torch.tensor(single), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("batch_tokens", [None, 150], ids=["rows", "tokens"])
def test_batched_greedy_generation_equals_unbatched(tiny_teacher_dir, tiny_data, batch_tokens):
    model, tok = load_causal_lm(tiny_teacher_dir), load_tokenizer(tiny_teacher_dir)
    contexts = [r["prompt"] for r in tiny_data["gsm8k"]["eval"].head(4).to_dict("records")]
    contexts[1] = contexts[1] + " and more words to change the length"
    batched = greedy_generate(model, tok, contexts, max_new_tokens=12, batch_size=4,
                              batch_tokens=batch_tokens)
    single = [greedy_generate(model, tok, [c], max_new_tokens=12, batch_size=1)[0] for c in contexts]
    assert batched == single


def test_token_budget_splits_batches_by_padded_tokens(tiny_teacher_dir, tiny_data, monkeypatch):
    """With batch_tokens, no forward holds more padded tokens than the budget (rows x the
    longest; generation counts the tokens it may add), unless a row alone is longer."""
    from distill_core import evaluation

    model, tok = load_causal_lm(tiny_teacher_dir), load_tokenizer(tiny_teacher_dir)
    contexts = [r["prompt"] for r in tiny_data["gsm8k"]["eval"].head(6).to_dict("records")]
    shapes = []
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: shapes.append(kw["input_ids"].shape) or generate(**kw))
    evaluation.greedy_generate(model, tok, contexts, max_new_tokens=8, batch_size=6, batch_tokens=150)
    assert len(shapes) > 1 and sum(s[0] for s in shapes) == 6
    assert all(b * (t + 8) <= 150 or b == 1 for b, t in shapes), shapes


def test_bf16_evaluation_holds_the_model_in_bf16_and_scores_alike(tiny_teacher_dir, tiny_data):
    from distill_core.evaluation import evaluate_checkpoint

    rows = tiny_data["sst2"]["eval"].to_dict("records")
    spec = {"sst2": {"rows": rows, "pool": [], "shots": 0}}
    scores = {p: evaluate_checkpoint(str(tiny_teacher_dir), spec, batch_size=8, max_length=256,
                                     max_new_tokens=4, precision=p, batch_tokens=512)["sst2"]
              for p in ("fp32", "bf16")}
    assert scores["bf16"]["n"] == scores["fp32"]["n"] == len(rows)
    assert abs(scores["bf16"]["accuracy"] - scores["fp32"]["accuracy"]) <= 2 / len(rows)
    bf16 = load_causal_lm(tiny_teacher_dir, dtype=torch.bfloat16)
    fp32 = load_causal_lm(tiny_teacher_dir)
    contexts, options = [r["prompt"] for r in rows[:4]], [list(r["choices"]) for r in rows[:4]]
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(
        torch.tensor(choice_loglikelihoods(bf16, load_tokenizer(tiny_teacher_dir), contexts, options, 8, 256)),
        torch.tensor(choice_loglikelihoods(fp32, load_tokenizer(tiny_teacher_dir), contexts, options, 8, 256)),
        atol=0.15, rtol=0.05)


def test_accuracy_counts_the_options_argmax(tiny_teacher_dir, tiny_data):
    model, tok = load_causal_lm(tiny_teacher_dir), load_tokenizer(tiny_teacher_dir)
    rows = tiny_data["sst2"]["eval"].to_dict("records")
    result = evaluate_task(model, tok, rows, [], 0, batch_size=8, max_length=256, max_new_tokens=4)
    scores = naive_choice_loglikelihoods(model, tok, [r["prompt"] for r in rows],
                                         [list(r["choices"]) for r in rows], max_length=256)
    expected = sum(int(s[r["label"]] > s[1 - r["label"]]) for s, r in zip(scores, rows)) / len(rows)
    assert result == {"accuracy": expected, "n": len(rows), "truncated": 0}


@pytest.mark.parametrize("task", ["sst2", "mmlu", "gsm8k"])
def test_kdbench_eval_scores_a_checkpoint_on_the_real_files(task, tiny_teacher_dir, shared_data,
                                                            tmp_path, capsys):
    from orchestration.cli import main

    predictions = tmp_path / "predictions.jsonl"
    args = ["eval", "--checkpoint", str(tiny_teacher_dir), "--task", task, "--data-dir",
            str(shared_data), "--limit", "6", "--predictions", str(predictions),
            "--max-new-tokens", "16"]
    if task == "mmlu":
        args += ["--subjects", "high_school_physics,high_school_biology"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["task"] == task and out["n"] == 6 and 0 <= out["accuracy"] <= 1
    records = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(records) == 6 and out["accuracy"] == sum(r["correct"] for r in records) / 6
    if task == "mmlu":
        assert out["shots"] == 5 and sum(s["n"] for s in out["per_subject"].values()) == 6
        assert out["truncated"] == 6  # 5 shots do not fit the tiny model's 256 positions
    if task == "gsm8k":
        assert {"strict_match", "flexible_match"} <= set(out) and out["strict_match"] == out["accuracy"]
        assert all(r["reference"] == r["reference"].strip() and r["reference"] for r in records)


def test_kdbench_eval_names_a_bad_checkpoint_or_data_dir(tiny_teacher_dir, tmp_path, capsys):
    from orchestration.cli import main

    assert main(["eval", "--checkpoint", str(tmp_path), "--task", "sst2", "--data-dir", str(tmp_path)]) == 2
    assert "not an HF model folder" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tiny_teacher_dir), "--task", "sst2",
                 "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--data-dir" in err and "no file" in err and "dev.tsv" in err
