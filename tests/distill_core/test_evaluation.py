"""Batched scoring and batched greedy generation agree with one-at-a-time computation."""

import torch

from distill_core.evaluation import continuation_loglikelihoods, evaluate_task, greedy_generate
from distill_core.models import load_causal_lm, load_tokenizer


def _manual_loglikelihood(model, tokenizer, context, continuation):
    ctx = [tokenizer.bos_token_id, *tokenizer(context, add_special_tokens=False)["input_ids"]]
    full = [tokenizer.bos_token_id, *tokenizer(context + continuation,
                                               add_special_tokens=False)["input_ids"]]
    n_cont = len(full) - len(ctx)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([full])).logits[0], -1)
    return sum(logprobs[i - 1, full[i]].item() for i in range(len(full) - n_cont, len(full)))


def test_batched_loglikelihoods_equal_one_at_a_time(tiny_teacher_dir, tiny_data):
    model, tok = load_causal_lm(tiny_teacher_dir), load_tokenizer(tiny_teacher_dir)
    rows = tiny_data["mmlu"]["eval"].head(4).to_dict("records")
    pairs = [(r["prompt"], c) for r in rows for c in r["choices"]]
    batched = continuation_loglikelihoods(model, tok, pairs, batch_size=5, max_length=256)
    single = [_manual_loglikelihood(model, tok, c, a) for c, a in pairs]
    torch.testing.assert_close(torch.tensor(batched), torch.tensor(single), atol=1e-3, rtol=1e-4)


def test_batched_greedy_generation_equals_unbatched(tiny_teacher_dir, tiny_data):
    model, tok = load_causal_lm(tiny_teacher_dir), load_tokenizer(tiny_teacher_dir)
    contexts = [r["prompt"] for r in tiny_data["gsm8k"]["eval"].head(4).to_dict("records")]
    contexts[1] = contexts[1] + " and more words to change the length"
    batched = greedy_generate(model, tok, contexts, max_new_tokens=12, batch_size=4)
    single = [greedy_generate(model, tok, [c], max_new_tokens=12, batch_size=1)[0] for c in contexts]
    assert batched == single


def test_accuracy_counts_the_options_argmax(tiny_teacher_dir, tiny_data):
    model, tok = load_causal_lm(tiny_teacher_dir), load_tokenizer(tiny_teacher_dir)
    rows = tiny_data["sst2"]["eval"].to_dict("records")
    result = evaluate_task(model, tok, rows, [], batch_size=8, max_length=256, max_new_tokens=4)
    pairs = [(r["prompt"], c) for r in rows for c in r["choices"]]
    scores = continuation_loglikelihoods(model, tok, pairs, batch_size=8, max_length=256)
    expected = sum(int(scores[2 * i + r["label"]] > scores[2 * i + 1 - r["label"]])
                   for i, r in enumerate(rows)) / len(rows)
    assert result == {"accuracy": expected, "n": len(rows)}
