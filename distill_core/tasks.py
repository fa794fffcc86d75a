"""Unified task rows and the tiny preset's synthetic tasks.

A row is a dict with `id` (stable, unique per task), `task`, `subject`, `description` (text
before the shots, as the harness's MMLU subject line; empty otherwise), `prompt`, `answer`, and
for multiple choice `choices` (the scored continuations) and `label` (index of the right one).
The math task keeps the full reasoning in `answer` and the final number in `target`. The real
datasets' rows come from distill_core.real_datasets.

The three generators imitate the shapes of SST-2 (binary sentiment with negation and mixed
clauses), MMLU (4-way multiple choice that needs a small reasoning step) and GSM8K (multi-step
arithmetic word problems whose answer ends ``#### N``). Everything is deterministic from a seed.
"""

from __future__ import annotations

import hashlib
import random
import re
from typing import TYPE_CHECKING
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from distill_core.study_design import TASKS

if TYPE_CHECKING:
    from distill_core.config import DataConfig

SST2_QUESTION = "\nQuestion: Is this sentence positive or negative?\nAnswer:"
SST2_CHOICES = [" negative", " positive"]
MMLU_LETTERS = ["A", "B", "C", "D"]
FEWSHOT_SEPARATOR = "\n\n"

ROW_COLUMNS = ["id", "task", "subject", "description", "prompt", "answer", "choices", "label",
               "target", "doc_index"]  # doc_index: the row's place in its real split (harness order)
HARNESS_FEWSHOT_SEED = 1234  # lm-evaluation-harness's default fewshot_random_seed


def row_id(task: str, split: str, text: str) -> str:
    # Content-derived, so an id names the same example across regenerations.
    return f"{task}-{split}-" + hashlib.sha1(text.encode()).hexdigest()[:12]


# --- SST-2 shaped ------------------------------------------------------------------------------

_SUBJECTS = ["the movie", "the film", "this story", "the acting", "the plot", "the music",
             "the ending", "the cast", "the script", "the dialogue", "the pacing", "the director"]
_VERBS = ["is", "was", "feels", "seemed", "remains"]
_POSITIVE = ["good", "great", "brilliant", "moving", "charming", "delightful", "funny",
             "beautiful", "clever", "wonderful", "sharp", "warm"]
_NEGATIVE = ["bad", "dull", "boring", "awful", "clumsy", "tedious", "weak", "bland",
             "messy", "painful", "flat", "cold"]
_INTENSIFIERS = ["", "", "very ", "really ", "truly ", "rather "]


def _clause(rng: random.Random) -> tuple[str, int]:
    positive = rng.random() < 0.5
    adjective = rng.choice(_POSITIVE if positive else _NEGATIVE)
    negated = rng.random() < 0.3
    verb = rng.choice(_VERBS)
    neg = " not" if negated else ""
    text = f"{rng.choice(_SUBJECTS)} {verb}{neg} {rng.choice(_INTENSIFIERS)}{adjective}"
    return text, int(positive != negated)


def _sst2_example(rng: random.Random) -> tuple[str, int]:
    kind = rng.random()
    first, label = _clause(rng)
    if kind < 0.5:
        return f"{first} .", label
    second, label2 = _clause(rng)
    if kind < 0.8:  # "X but Y": the clause after "but" decides
        return f"{first} , but {second} .", label2
    return f"although {first} , {second} .", label2


def _sst2_row(rng: random.Random, split: str) -> dict:
    sentence, label = _sst2_example(rng)
    prompt = sentence + SST2_QUESTION
    return {"id": row_id("sst2", split, sentence), "task": "sst2", "subject": "sentiment",
            "description": "", "prompt": prompt, "answer": SST2_CHOICES[label], "choices": list(SST2_CHOICES),
            "label": label, "target": None}


# --- MMLU shaped -------------------------------------------------------------------------------

_ANIMALS = {"mammal": ["cat", "dog", "whale", "horse", "bat", "mouse"],
            "bird": ["eagle", "sparrow", "owl", "penguin", "crow", "duck"],
            "fish": ["salmon", "shark", "trout", "tuna", "cod", "carp"],
            "insect": ["ant", "bee", "beetle", "moth", "wasp", "fly"]}
_FOODS = {"fruit": ["apple", "pear", "plum", "grape", "lemon", "peach"],
          "vegetable": ["carrot", "onion", "potato", "pepper", "leek", "bean"],
          "grain": ["rice", "wheat", "oat", "corn", "barley", "rye"],
          "dairy": ["milk", "cheese", "butter", "yogurt", "cream", "kefir"]}
_CITIES = {"europe": ["paris", "rome", "berlin", "madrid", "vienna", "oslo"],
           "asia": ["tokyo", "delhi", "beijing", "seoul", "bangkok", "hanoi"],
           "africa": ["cairo", "lagos", "nairobi", "accra", "dakar", "tunis"],
           "america": ["lima", "quito", "boston", "denver", "toronto", "havana"]}


def _mmlu_question(rng: random.Random) -> tuple[str, str, str, list[str]]:
    """(subject, question, right option, three wrong options). Each is knowledge of the options
    themselves (the largest number, an animal's class, a food's group, a city's continent),
    which a small model learns from a few thousand rows. Measured on the tiny teacher and
    student: questions whose answer must first be computed and then matched against the
    options (the day after X, a + b) stayed at chance for the teacher; parity and weekday
    questions took the student several times longer; "largest" beside "smallest" halved the
    teacher's comparison accuracy."""
    kind = rng.randrange(4)
    if kind == 0:
        numbers = rng.sample(range(10), 4)
        return ("comparison", "which number is the largest ?", str(max(numbers)),
                [str(n) for n in numbers if n != max(numbers)])
    classes, noun, subject = [(_ANIMALS, "animal", "biology"), (_FOODS, "food", "nutrition"),
                              (_CITIES, "city", "geography")][kind - 1]
    cls = rng.choice(sorted(classes))
    right = rng.choice(classes[cls])
    wrong = [rng.choice(classes[c]) for c in sorted(classes) if c != cls]
    article = "an" if cls[0] in "aeiou" else "a"
    question = f"which city is in {cls} ?" if noun == "city" else f"which {noun} is {article} {cls} ?"
    return subject, question, right, wrong


def mmlu_prompt(question: str, options: list[str]) -> str:
    lines = [question] + [f"{letter}. {opt}" for letter, opt in zip(MMLU_LETTERS, options)]
    return "\n".join(lines) + "\nAnswer:"


def _mmlu_row(rng: random.Random, split: str) -> dict:
    subject, question, right, wrong = _mmlu_question(rng)
    label = rng.randrange(4)
    options = list(wrong)
    options.insert(label, right)
    prompt = mmlu_prompt(question, options)
    choices = [f" {letter}" for letter in MMLU_LETTERS]
    return {"id": row_id("mmlu", split, prompt), "task": "mmlu", "subject": subject,
            "description": "", "prompt": prompt, "answer": choices[label], "choices": choices, "label": label,
            "target": None}


# --- GSM8K shaped ------------------------------------------------------------------------------

_NAMES = ["tom", "ana", "li", "sara", "omar", "mia", "ivan", "zoe"]
_ITEMS = ["apples", "pens", "cards", "coins", "books", "shells"]


def _gsm8k_row(rng: random.Random, split: str) -> dict:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randrange(1, 10), rng.randrange(1, 10)
    s = a + b
    if rng.random() < 0.5:
        c = rng.randrange(1, s + 1)
        r = s - c
        question = (f"{name} has {a} {item} . {name} gets {b} more and then gives away {c} . "
                    f"how many {item} does {name} have now ?")
        steps = f"{name} has {a} + {b} = {s} {item} . then {s} - {c} = {r} ."
    else:
        k = rng.randrange(2, 4)
        r = s * k
        question = (f"{name} has {a} {item} and buys {b} more . then the number of {item} "
                    f"grows {k} times . how many {item} does {name} have ?")
        steps = f"{name} has {a} + {b} = {s} {item} . then {s} * {k} = {r} ."
    prompt = f"Question: {question}\nAnswer:"
    return {"id": row_id("gsm8k", split, question), "task": "gsm8k", "subject": "math",
            "description": "", "prompt": prompt, "answer": f" {steps}\n#### {r}", "choices": None, "label": None,
            "target": str(r)}


_GENERATORS = {"sst2": _sst2_row, "mmlu": _mmlu_row, "gsm8k": _gsm8k_row}


def _unique_rows(task: str, split: str, n: int, rng: random.Random, taken: set[str]) -> list[dict]:
    rows: list[dict] = []
    for _ in range(n * 200 + 1):
        if len(rows) == n:
            return rows
        row = _GENERATORS[task](rng, split)
        key = row["prompt"]
        if key not in taken:  # no example is in two splits, none twice in one
            taken.add(key)
            rows.append(row)
    raise ValueError(f"the {task} generator cannot make {n} distinct {split} rows; lower data sizes")


def generate_task(task: str, cfg: DataConfig) -> dict[str, pd.DataFrame]:
    """The `train`, `eval`, `fewshot` and `validation` splits of one synthetic task, disjoint
    by prompt (validation last: its size changes no other split)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks are {list(TASKS)}")
    rng = random.Random(f"{cfg.seed}-{task}")
    taken: set[str] = set()
    splits = {}
    for split, n in (("fewshot", cfg.fewshot_pool_size), ("eval", cfg.eval_size[task]),
                     ("train", cfg.train_size[task]), ("validation", cfg.validation_size[task])):
        splits[split] = pd.DataFrame(_unique_rows(task, split, n, rng, taken), columns=ROW_COLUMNS)
    return splits


@dataclass
class TaskSplits:
    """The `train`, `eval` and `fewshot` rows of one task, and the source rows skipped as
    malformed ("file:line: why"; only with data.bad_rows: skip)."""

    splits: dict[str, pd.DataFrame]
    skipped: list[str] = field(default_factory=list)


def load_task_splits(task: str, cfg: DataConfig) -> TaskSplits:
    """The splits of one task from the preset's data source: generated, or the real dataset
    (a local folder of its release files, or the hub) subsampled to the preset's sizes."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks are {list(TASKS)}")
    if cfg.source == "synthetic":
        return TaskSplits(generate_task(task, cfg))
    from distill_core import real_datasets as real

    def load(split: str):
        if cfg.source == "local":
            return real.load_local(task, Path(cfg.dir), split, subjects=cfg.subjects, bad_rows=cfg.bad_rows)
        return real.load_hub(task, split, subjects=cfg.subjects, bad_rows=cfg.bad_rows)

    train_split = real.TRAIN_SPLIT[task]
    loaded = {s: load(s) for s in {train_split, real.EVAL_SPLIT[task], real.FEWSHOT_SPLIT[task]}}
    # The harness's pool (MMLU's dev split, the others' train split), when shots are asked for.
    pool = real.fewshot_pool(task, loaded[real.FEWSHOT_SPLIT[task]].rows) if cfg.fewshot[task] else []
    pool_ids = {r["id"] for r in pool}
    splits = {"fewshot": pool}
    for split, source, n in (("train", train_split, cfg.train_size[task]),
                             ("eval", real.EVAL_SPLIT[task], cfg.eval_size[task])):
        # A shot is never evaluated on; training rows may be shots (the harness draws them
        # from the train split a model is trained on).
        rows = [r for r in loaded[source].rows if split == "train" or r["id"] not in pool_ids]
        if n > len(rows):
            raise ValueError(f"data.{split}_size.{task}={n}, but {task} {source} has {len(rows)} rows")
        splits[split] = random.Random(f"{cfg.seed}-{task}-{split}").sample(rows, n)
    # Validation: held-out rows of the training source, none of them sampled for training.
    trained = {r["id"] for r in splits["train"]}
    rest = [r for r in loaded[train_split].rows if r["id"] not in trained]
    n = cfg.validation_size[task]
    if n > len(rest):
        raise ValueError(f"data.validation_size.{task}={n}, but {task} {train_split} has {len(rest)} "
                         f"rows beside the {len(trained)} trained on")
    splits["validation"] = random.Random(f"{cfg.seed}-{task}-validation").sample(rest, n)
    skipped = sorted({w for s in loaded.values() for w in s.skipped})
    return TaskSplits({k: pd.DataFrame(v, columns=ROW_COLUMNS) for k, v in splits.items()}, skipped)


def source_version(task: str, cfg: DataConfig, role: str) -> str:
    """A hash of what a task's `train` or `eval` rows are made from: the release files' bytes
    (local), the dataset ids (hub: pin a revision to make them mean something), or this
    generator's source and the data settings (synthetic)."""
    import inspect
    import sys

    digest = hashlib.sha256(f"{task}/{role}/{cfg.model_dump_json()}".encode())
    if cfg.source == "local":
        from distill_core import real_datasets as real

        for path in real.source_files(task, Path(cfg.dir), role, cfg.subjects):
            digest.update(path.name.encode())
            digest.update(path.read_bytes() if path.is_file() else b"<missing>")
    elif cfg.source == "synthetic":
        digest.update(inspect.getsource(sys.modules[__name__]).encode())
    return digest.hexdigest()[:16]


def load_task(task: str, cfg: DataConfig) -> dict[str, pd.DataFrame]:
    """The splits of one task from the preset's data source (see load_task_splits)."""
    return load_task_splits(task, cfg).splits


# --- prompts -----------------------------------------------------------------------------------

def fewshot_prefix(shots: list[dict]) -> str:
    return "".join(s["prompt"] + s["answer"] + FEWSHOT_SEPARATOR for s in shots)


def select_shots(row: dict, pool: list[dict], k: int) -> list[dict]:
    """The k exemplars lm-evaluation-harness puts before `row`.
    MMLU (and the synthetic tasks, whose rows have no document index): its first_n sampler,
    the first k of the pool, the row's subject first (MMLU's dev split holds 5 a subject).
    GSM8K and SST-2: its default sampler, one Random(HARNESS_FEWSHOT_SEED) for the task, drawing
    k of the pool (the train split, in file order) for each evaluation document in turn; the
    row at `doc_index` gets that draw, whichever rows are evaluated."""
    if k == 0:
        return []
    index = row.get("doc_index")
    if row["task"] == "mmlu" or index is None or index != index:  # None, or NaN from pandas
        same = [s for s in pool if s["subject"] == row["subject"]]
        return (same + [s for s in pool if s["subject"] != row["subject"]])[:k]
    if k > len(pool):
        raise ValueError(f"{k} shots from a pool of {len(pool)} rows")
    return [pool[i] for i in _harness_draw(len(pool), k, int(index))]


_DRAWS: dict[tuple[int, int], tuple[random.Random, list[list[int]]]] = {}


def _harness_draw(pool_size: int, k: int, index: int) -> list[int]:
    """The positions the harness's sampler draws for document `index`: Random.sample picks
    positions from the pool's size and its state alone, so positions stand for documents."""
    rnd, draws = _DRAWS.setdefault((pool_size, k), (random.Random(HARNESS_FEWSHOT_SEED), []))
    while len(draws) <= index:
        draws.append(rnd.sample(range(pool_size), k))
    return draws[index]


def render_prompt(row: dict, shots: list[dict]) -> str:
    """The text the model is conditioned on: the description, k solved shots, then the row's
    prompt (the harness's description + fewshot context + doc_to_text)."""
    return (row.get("description") or "") + fewshot_prefix(shots) + row["prompt"]


_FINAL_NUMBER = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
# lm-evaluation-harness gsm8k (v3): the strict-match and flexible-extract filters, and the
# normalisation its exact_match applies to both sides (regexes_to_ignore, ignore_case).
GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
GSM8K_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_GSM8K_IGNORE = [re.compile(p) for p in (r",", r"\$", r"(?s).*#### ", r"\.$")]


def final_number(text: str) -> str | None:
    """The number after ``####`` (GSM8K's answer convention), commas removed."""
    match = _FINAL_NUMBER.search(text)
    return match.group(1).replace(",", "") if match else None


def gsm8k_normalize(text: str) -> str:
    for pattern in _GSM8K_IGNORE:
        text = pattern.sub("", text)
    return text.strip().lower()


def gsm8k_strict(generated: str) -> str:
    """strict-match: the first ``#### N``; "[invalid]" when there is none."""
    match = GSM8K_STRICT.search(generated)
    return match.group(1) if match else "[invalid]"


def gsm8k_flexible(generated: str) -> str:
    """flexible-extract: the last number-like run of the text."""
    matches = GSM8K_FLEXIBLE.findall(generated)
    if not matches:
        return "[invalid]"
    return next(g for g in matches[-1] if g)


def row_problems(rows: pd.DataFrame) -> list[str]:
    """What is wrong with a split's rows (empty when nothing): duplicate ids, empty prompts or
    answers, labels that are not an index of the row's choices, math rows without a target."""
    problems = []
    duplicated = rows["id"][rows["id"].duplicated()].unique().tolist()
    if duplicated:
        problems.append(f"{len(duplicated)} duplicate ids, e.g. {duplicated[:3]}")
    for column in ("prompt", "answer"):
        empty = rows["id"][rows[column].fillna("").str.strip() == ""].tolist()
        if empty:
            problems.append(f"{len(empty)} rows with an empty {column}, e.g. {empty[:3]}")
    for r in rows.itertuples():
        if r.choices is not None and len(r.choices) and not 0 <= int(r.label) < len(r.choices):
            problems.append(f"row {r.id}: label {r.label} is not an index of its {len(r.choices)} choices")
        elif (r.choices is None or not len(r.choices)) and not r.target:
            problems.append(f"row {r.id}: a generation row without a target")
    return problems
