"""How large a teacher cache will be, before it is built: bytes per signal and in total.

From exact row shapes (both tokenizations aligned, as the cache build does them) when the
tokenizers are at hand, or, for a preset whose models cannot be downloaded here, from the
preset's declared model sizes and its `estimate` section (measured text lengths and an assumed
characters-per-token ratio). The layout is teacher_cache.CACHE_SCHEMA's: payload bytes
(Parquet's framing and its compression of the small integer lists are not modelled; the bf16
signals, which dominate, do not compress, except the causally masked keys of attention rows,
which are zeros: Parquet's snappy pages take them to almost nothing, so only the (query, key)
pairs with key <= query are counted).
"""

from __future__ import annotations

from dataclasses import dataclass

from distill_core.config import TASKS, CacheConfig, ExperimentConfig

GIB = 2**30


@dataclass(frozen=True)
class RowShape:
    student_tokens: int
    teacher_tokens: int
    chunks: int
    queries: int  # attention rows kept (chunks)
    attention_pairs: int  # (query, key) chunk pairs with key <= query over the kept rows


def row_bytes(shape: RowShape, d_teacher: int, heads: int, cache: CacheConfig,
              id_bytes: int = 16) -> dict[str, int]:
    n, c, q = shape.student_tokens, shape.chunks, shape.queries
    k = cache.top_k if cache.logits == "topk" else 0
    return {
        "tokens": 5 * n + 8 + id_bytes,       # input_ids int32 + answer_mask int8, counts, id/task
        "alignment": 8 * c,                   # chunk ends on both sides, int32
        "hidden": 2 * c * d_teacher,          # bf16 at chunk ends
        "topk": 6 * c * k,                    # int32 ids + bf16 log-probs
        "attention": 2 * heads * shape.attention_pairs + 4 * q,  # bf16 [H, Q, C]'s causal part
    }


def estimate(shapes: dict[str, list[RowShape]], d_teacher: int, heads: int,
             cache: CacheConfig, method: str) -> dict:
    """The JSON the estimator prints and teacher_cache records: per task and in total, bytes
    per signal, tokens, bytes per (student) token, and whether it fits `cache.budget_gib`."""
    per_task = {}
    for task, rows in shapes.items():
        signals: dict[str, int] = {}
        for shape in rows:
            for name, b in row_bytes(shape, d_teacher, heads, cache).items():
                signals[name] = signals.get(name, 0) + b
        tokens = sum(s.student_tokens for s in rows)
        per_task[task] = {"rows": len(rows), "student_tokens": tokens,
                          "teacher_tokens": sum(s.teacher_tokens for s in rows),
                          "chunks": sum(s.chunks for s in rows), "bytes": signals,
                          "total_bytes": sum(signals.values())}
    total = sum(t["total_bytes"] for t in per_task.values())
    tokens = sum(t["student_tokens"] for t in per_task.values())
    signals = {k: sum(t["bytes"][k] for t in per_task.values())
               for k in next(iter(per_task.values()))["bytes"]} if per_task else {}
    return {"method": method, "d_teacher": d_teacher, "teacher_heads": heads,
            "logits": cache.logits, "attention_queries": cache.attention_queries,
            "tasks": per_task, "bytes": signals, "total_bytes": total,
            "total_gib": round(total / GIB, 4),
            "bytes_per_token": {k: round(v / max(1, tokens), 1) for k, v in signals.items()},
            "budget_gib": cache.budget_gib,
            "within_budget": cache.budget_gib is None or total <= cache.budget_gib * GIB}


def check_budget(estimated: dict, what: str) -> None:
    """Refuse, before any compute, a cache larger than the preset's budget."""
    if not estimated["within_budget"]:
        raise ValueError(
            f"{what}: the teacher cache would take {estimated['total_gib']:.2f} GiB "
            f"({estimated['bytes']}), over cache.budget_gib={estimated['budget_gib']}; keep "
            "fewer attention rows (cache.attention_queries: answer), use fewer or shorter "
            "rows, or raise the budget")


def shapes_from_aligned(aligned) -> list[RowShape]:
    """Exact shapes of the rows the cache build will write (teacher_cache.aligned_rows)."""
    cols = aligned.select(["n_tokens", "teacher_n_tokens", "student_chunk_ends",
                           "attn_queries"]).to_pydict()
    return [RowShape(n, n_t, len(ends), len(queries), sum(q + 1 for q in queries))
            for n, n_t, ends, queries in zip(cols["n_tokens"], cols["teacher_n_tokens"],
                                             cols["student_chunk_ends"], cols["attn_queries"])]


def shapes_from_rows(contexts, student_tokenizer, teacher_tokenizer, max_length: int,
                     attention_queries: str) -> list[RowShape]:
    """Exact shapes: the rows aligned as the cache build aligns them."""
    from distill_core.teacher_cache import aligned_rows

    return shapes_from_aligned(aligned_rows(contexts, student_tokenizer, teacher_tokenizer,
                                            max_length, attention_queries))


def shapes_from_hints(cfg: ExperimentConfig) -> dict[str, list[RowShape]]:
    """Typical shapes from the preset's `estimate` section: one representative row a task,
    repeated train_size times. Chunks are bounded by the coarser tokenization (a chunk holds
    at least one token of each side), so this is an upper bound on chunks."""
    hints = cfg.estimate
    if hints is None:
        raise ValueError(f"preset {cfg.name}: its tokenizers are not at hand and it has no "
                         "`estimate` section (chars_per_row, answer_chars_per_row, chars_per_token)")
    out = {}
    for task in TASKS:
        chars, answer = hints.chars_per_row[task], hints.answer_chars_per_row[task]
        n_s = round(chars / hints.chars_per_token["student"]) + 2   # + BOS, EOS
        n_t = round(chars / hints.chars_per_token["teacher"]) + 2
        c = min(n_s, n_t)
        answer_chunks = max(1, round(answer / max(hints.chars_per_token.values())))
        if cfg.cache.attention_queries == "all":
            q, pairs = c - 1, (c - 1) * c // 2
        else:  # the answer's chunks close the row
            q = min(c - 1, answer_chunks + 1)
            pairs = sum(c - 1 - i for i in range(q))
        out[task] = [RowShape(n_s, n_t, c, q, pairs)] * cfg.data.train_size[task]
    return out


def estimate_preset(cfg: ExperimentConfig) -> dict:
    """`kdbench estimate`: the whole cache of a preset, before anything is built. Tokenizers
    the project trains are trained here as the teacher_model asset trains them (seconds), so
    the tiny preset's figures are exact shapes, as are those of a preset whose tokenizers are
    named by local path (paper-shapes); hub models use the preset's declared sizes and
    `estimate` hints."""
    t = cfg.teacher
    if t.hidden_size is None or t.num_heads is None:
        raise ValueError(f"preset {cfg.name}: teacher.hidden_size and teacher.num_heads are "
                         "needed to estimate the cache (declare them for a hub model)")
    if t.source == "hub" or cfg.student.source == "hub" or cfg.data.source == "hub":
        return estimate(shapes_from_hints(cfg), t.hidden_size, t.num_heads, cfg.cache,
                        "declared sizes and estimate hints (upper bound on chunks)")
    import pandas as pd

    from distill_core.tasks import load_task
    from distill_core.teacher_cache import training_contexts
    from distill_core.tokenizer_training import model_tokenizer

    train = {task: load_task(task, cfg.data)["train"] for task in TASKS}
    contexts = training_contexts(pd.concat(list(train.values()), ignore_index=True))
    texts = list(contexts["context"] + contexts["answer"])
    teacher_tok = model_tokenizer(t, texts)
    student_tok = model_tokenizer(cfg.student, texts)
    shapes = {task: shapes_from_rows(training_contexts(rows), student_tok, teacher_tok,
                                     cfg.max_length, cfg.cache.attention_queries)
              for task, rows in train.items()}
    return estimate(shapes, t.hidden_size, t.num_heads, cfg.cache,
                    "exact shapes (both tokenizers trained or loaded, rows aligned)")
