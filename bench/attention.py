"""What final-layer attention probabilities cost: sdpa everywhere + the final-layer hook
(kdbench's way) against eager attention in every layer with output_attentions=True, side by
side in one run, forward and backward, on the tiny preset's student and teacher shapes.
Prints one JSON object.   usage: python bench/attention.py [--repeats N]"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from distill_core.final_layer_attention import capture_final_attention


def _model(hidden, layers, heads, kv, impl):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=600, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                      max_position_embeddings=512, attn_implementation=impl)
    return LlamaForCausalLM(cfg)


def _time(fn, repeats):
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = {"batch": args.batch, "length": args.length, "threads": 1, "models": {}}
    for name, shape in {"student": (48, 2, 4, 4), "teacher": (96, 3, 4, 2),
                        "wider_deeper": (256, 8, 8, 2)}.items():
        sdpa, eager = _model(*shape, "sdpa"), _model(*shape, "eager")
        eager.load_state_dict(sdpa.state_dict())
        ids = torch.randint(0, 600, (args.batch, args.length))
        mask = torch.ones_like(ids)

        def hooked():
            with capture_final_attention(sdpa, mask) as cap:
                logits = sdpa(input_ids=ids, attention_mask=mask).logits
            (logits.mean() + cap["probs"].mean()).backward()

        def all_eager():
            out_ = eager(input_ids=ids, attention_mask=mask, output_attentions=True)
            (out_.logits.mean() + out_.attentions[-1].mean()).backward()

        def plain():
            sdpa(input_ids=ids, attention_mask=mask).logits.mean().backward()

        t_plain, t_hook, t_eager = (_time(f, args.repeats) for f in (plain, hooked, all_eager))
        out["models"][name] = {"ms_sdpa_no_attention": round(t_plain * 1e3, 2),
                               "ms_sdpa_plus_final_layer_hook": round(t_hook * 1e3, 2),
                               "ms_eager_all_layers": round(t_eager * 1e3, 2),
                               "hook_overhead_vs_no_attention": round(t_hook / t_plain, 3),
                               "eager_over_hook": round(t_eager / t_hook, 3)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
