"""The hook's final-layer attention equals eager attention's own probabilities, with padding,
while every layer stays on sdpa."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from distill_core.final_layer_attention import capture_final_attention


def _model(attn_implementation):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      attn_implementation=attn_implementation)
    return LlamaForCausalLM(cfg).eval()


def test_hook_probabilities_equal_eager_attentions_with_gqa_and_padding():
    sdpa, eager = _model("sdpa"), _model("eager")
    eager.load_state_dict(sdpa.state_dict())
    ids = torch.randint(0, 50, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0  # right padding on the second row
    with torch.no_grad():
        reference = eager(input_ids=ids, attention_mask=mask, output_attentions=True).attentions[-1]
        with capture_final_attention(sdpa, mask) as captured:
            logits = sdpa(input_ids=ids, attention_mask=mask).logits
    probs = captured["probs"]
    assert sdpa.config._attn_implementation == "sdpa"
    assert probs.shape == (2, 4, 9, 9)
    torch.testing.assert_close(probs[0], reference[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(probs[1, :, :6, :6], reference[1, :, :6, :6], atol=1e-5, rtol=1e-4)
    assert probs[1, :, :6, 6:].abs().max() == 0  # padding keys get no probability
    torch.testing.assert_close(probs[:, :, :6].sum(-1), torch.ones(2, 4, 6))
    assert torch.triu(probs[0], diagonal=1).abs().max() == 0  # causal
    torch.testing.assert_close(logits[0], eager(input_ids=ids, attention_mask=mask).logits[0],
                               atol=1e-4, rtol=1e-4)


def test_captured_probabilities_carry_gradients_to_the_model():
    model = _model("sdpa").train()
    ids = torch.randint(0, 50, (1, 7))
    mask = torch.ones(1, 7, dtype=torch.long)
    with capture_final_attention(model, mask) as captured:
        model(input_ids=ids, attention_mask=mask)
    captured["probs"][0, 0, -1, 0].backward()
    q_grad = model.model.layers[-1].self_attn.q_proj.weight.grad
    assert q_grad is not None and q_grad.abs().sum() > 0


def test_the_hook_is_removed_after_the_block():
    model = _model("sdpa")
    mask = torch.ones(1, 5, dtype=torch.long)
    with capture_final_attention(model, mask) as captured:
        pass
    model(input_ids=torch.randint(0, 50, (1, 5)), attention_mask=mask)
    assert "probs" not in captured


def test_selected_query_rows_equal_the_full_matrix_rows():
    model = _model("sdpa")
    ids = torch.randint(0, 50, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    queries = torch.tensor([[8, 0, 3], [5, 2, -1]])  # -1: no query
    with torch.no_grad():
        with capture_final_attention(model, mask) as full:
            model(input_ids=ids, attention_mask=mask)
        with capture_final_attention(model, mask, queries) as some:
            model(input_ids=ids, attention_mask=mask)
    assert some["probs"].shape == (2, 4, 3, 9)
    for b in range(2):
        for j, pos in enumerate(queries[b].tolist()):
            if pos >= 0:
                torch.testing.assert_close(some["probs"][b, :, j], full["probs"][b, :, pos])
