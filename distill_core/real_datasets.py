"""The real SST-2, MMLU and GSM8K as unified task rows, with the lm-evaluation-harness prompts.

Two sources, one row format (distill_core.tasks.ROW_COLUMNS):
- a local folder of the original release files, laid out as ../shared/data is:
  `sst2/{train,dev}.tsv` (GLUE: header `sentence<TAB>label`), `mmlu/{dev,val,test}/<subject>_<split>.csv`
  (the official release: no header, `question,A,B,C,D,answer`, quoted fields with newlines, CRLF
  in some files), `gsm8k/{train,test}.jsonl` (`question`, `answer` ending `#### N`);
- the Hugging Face hub with `datasets` (nyu-mll/glue sst2, cais/mmlu, openai/gsm8k).

Prompts are the harness's, byte for byte (lm_eval/tasks/glue/sst2, mmlu/default, gsm8k v3):
  SST-2  "{sentence}\\nQuestion: Is this sentence positive or negative?\\nAnswer:"  over
         " negative" / " positive";
  MMLU   description "The following are multiple choice questions (with answers) about
         {subject words}.\\n\\n", shots from the subject's dev split (first 5), then
         "{question.strip()}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:" over " A".." D";
  GSM8K  "Question: {question}\\nAnswer:", the answer " {solution}" (target delimiter " ").
A malformed row is an error naming its file and line, or, with `bad_rows: skip`, skipped and
reported (`Loaded.skipped`); never dropped silently.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from distill_core.tasks import (MMLU_LETTERS, SST2_CHOICES, SST2_QUESTION, final_number,
                                mmlu_prompt, row_id)

# The split a paper reports, and the one the few-shot exemplars come from (the harness's).
TRAIN_SPLIT = {"sst2": "train", "mmlu": "val", "gsm8k": "train"}  # MMLU has no train split
EVAL_SPLIT = {"sst2": "dev", "mmlu": "test", "gsm8k": "test"}
FEWSHOT_SPLIT = {"sst2": "train", "mmlu": "dev", "gsm8k": "train"}
HARNESS_SHOTS = {"sst2": 0, "mmlu": 5, "gsm8k": 5}
HUB = {"sst2": ("nyu-mll/glue", "sst2"), "mmlu": ("cais/mmlu", None), "gsm8k": ("openai/gsm8k", "main")}
HUB_SPLIT = {"sst2": {"train": "train", "dev": "validation"},
             "mmlu": {"dev": "dev", "val": "validation", "test": "test"},
             "gsm8k": {"train": "train", "test": "test"}}
HIGH_SCHOOL_SUBJECTS = [
    "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography",
    "high_school_government_and_politics", "high_school_macroeconomics",
    "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history",
    "high_school_world_history"]


class BadRow(ValueError):
    """A row of a data file that is not what its format says."""


@dataclass
class Loaded:
    rows: list[dict]
    skipped: list[str] = field(default_factory=list)  # "file:line: why" of every skipped row

    def extend(self, other: "Loaded") -> None:
        self.rows += other.rows
        self.skipped += other.skipped


def fewshot_pool(task: str, rows: list[dict]) -> list[dict]:
    """The exemplars shots are drawn from (FEWSHOT_SPLIT's rows, in file order), as
    lm-evaluation-harness draws them: MMLU's dev split (5 a subject, first_n), the others'
    whole train split (its seeded sampler; see tasks.select_shots)."""
    return list(rows)


def mmlu_description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


# --- rows ---------------------------------------------------------------------------------------

def sst2_row(sentence: str, label: int, split: str) -> dict:
    return {"id": row_id("sst2", split, sentence), "task": "sst2", "subject": "sentiment",
            "description": "", "prompt": sentence + SST2_QUESTION, "answer": SST2_CHOICES[label],
            "choices": list(SST2_CHOICES), "label": label, "target": None}


def mmlu_row(subject: str, question: str, options: list[str], label: int, split: str) -> dict:
    prompt = mmlu_prompt(question.strip(), options)
    choices = [f" {letter}" for letter in MMLU_LETTERS]
    return {"id": row_id("mmlu", split, subject + prompt), "task": "mmlu", "subject": subject,
            "description": mmlu_description(subject), "prompt": prompt, "answer": choices[label],
            "choices": choices, "label": label, "target": None}


def gsm8k_row(question: str, solution: str, split: str) -> dict:
    target = final_number(solution)
    if target is None:
        raise BadRow("the answer has no '#### <number>' final answer")
    return {"id": row_id("gsm8k", split, question), "task": "gsm8k", "subject": "math",
            "description": "", "prompt": f"Question: {question}\nAnswer:", "answer": f" {solution}",
            "choices": None, "label": None, "target": target}


# --- local files --------------------------------------------------------------------------------

def _bad(path: Path, line: int, why: str, bad_rows: str, out: Loaded) -> None:
    where = f"{path}:{line}: {why}"
    if bad_rows != "skip":
        raise BadRow(where + " (set data.bad_rows: skip to skip such rows; they are counted)")
    out.skipped.append(where)


def read_sst2(path: Path, split: str, bad_rows: str = "error") -> Loaded:
    out = Loaded([])
    with open(path, encoding="utf-8", newline="") as f:
        header = f.readline().rstrip("\r\n")
        if header.split("\t") != ["sentence", "label"]:
            raise BadRow(f"{path}:1: expected the header 'sentence<TAB>label', got {header!r}")
        for n, line in enumerate(f, start=2):
            line = line.rstrip("\r\n")
            sentence, tab, label = line.rpartition("\t")
            if not tab or not sentence.strip():
                _bad(path, n, "expected 'sentence<TAB>label'", bad_rows, out)
            elif label not in ("0", "1"):
                _bad(path, n, f"label {label!r} is not 0 or 1", bad_rows, out)
            else:
                out.rows.append(sst2_row(sentence, int(label), split))
    return out


def read_mmlu(path: Path, subject: str, split: str, bad_rows: str = "error") -> Loaded:
    out = Loaded([])
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        line = 1
        for record in reader:
            if len(record) != 6:
                _bad(path, line, f"{len(record)} fields, expected 6 (question, A, B, C, D, answer)",
                     bad_rows, out)
            elif record[5].strip() not in MMLU_LETTERS:
                _bad(path, line, f"answer {record[5]!r} is not one of A, B, C, D", bad_rows, out)
            elif not record[0].strip():
                _bad(path, line, "empty question", bad_rows, out)
            else:
                out.rows.append(mmlu_row(subject, record[0], record[1:5],
                                         MMLU_LETTERS.index(record[5].strip()), split))
            line = reader.line_num + 1  # a quoted field may span lines: the next record's start
    return out


def read_gsm8k(path: Path, split: str, bad_rows: str = "error") -> Loaded:
    out = Loaded([])
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                _bad(path, n, f"not JSON ({err.msg})", bad_rows, out)
                continue
            if not isinstance(record, dict) or not all(
                    isinstance(record.get(k), str) and record[k].strip() for k in ("question", "answer")):
                _bad(path, n, "expected an object with 'question' and 'answer' strings", bad_rows, out)
                continue
            try:
                out.rows.append(gsm8k_row(record["question"], record["answer"], split))
            except BadRow as err:
                _bad(path, n, str(err), bad_rows, out)
    return out


def mmlu_subjects(data_dir: Path, split: str) -> list[str]:
    """Every subject with a file of `split` in a local MMLU folder."""
    suffix = f"_{split}.csv"
    return sorted(p.name[:-len(suffix)] for p in (Path(data_dir) / "mmlu" / split).glob(f"*{suffix}"))


def split_files(task: str, data_dir: Path, split: str,
                subjects: list[str] | None = None) -> list[tuple[Path, str | None]]:
    """The release files of one split of a task in a folder laid out as ../shared/data, each
    with its MMLU subject (None for the others)."""
    root = Path(data_dir)
    if task == "mmlu":
        return [(root / "mmlu" / split / f"{s}_{split}.csv", s)
                for s in subjects or mmlu_subjects(root, split)]
    if task not in ("sst2", "gsm8k"):
        raise ValueError(f"unknown task {task!r}")
    return [(root / task / f"{split}{'.tsv' if task == 'sst2' else '.jsonl'}", None)]


def load_local(task: str, data_dir: Path, split: str, *, subjects: list[str] | None = None,
               bad_rows: str = "error") -> Loaded:
    """One split of one task from a folder laid out as ../shared/data."""
    out = Loaded([])
    for path, subject in split_files(task, data_dir, split, subjects):
        if not path.is_file():
            raise FileNotFoundError(f"{task} {split}: no file {path}")
        if task == "sst2":
            out.extend(_numbered(read_sst2(path, split, bad_rows)))
        elif task == "gsm8k":
            out.extend(_numbered(read_gsm8k(path, split, bad_rows)))
        else:
            out.extend(_numbered(read_mmlu(path, subject, split, bad_rows)))
    if not out.rows:
        raise ValueError(f"{task} {split} in {Path(data_dir)}: no rows")
    return _unique_ids(out)


def _numbered(loaded: Loaded) -> Loaded:
    """Each row's place in its file (an MMLU subject's, a task's split): the harness's
    document order, which its few-shot sampler follows."""
    for i, r in enumerate(loaded.rows):
        r["doc_index"] = i
    return loaded


def _unique_ids(loaded: Loaded) -> Loaded:
    """Ids derive from content; the releases repeat some items (11 MMLU test questions, GLUE
    train sentences), which stay rows of their own, numbered in file order."""
    seen: dict[str, int] = {}
    for r in loaded.rows:
        k = seen[r["id"]] = seen.get(r["id"], 0) + 1
        if k > 1:
            r["id"] = f"{r['id']}-{k}"
    return loaded


# --- the hub ------------------------------------------------------------------------------------

def rows_from_hub_records(task: str, records, split: str, bad_rows: str = "error",
                          subject: str | None = None) -> Loaded:
    """Rows from the hub datasets' records (dicts with their documented fields)."""
    out = Loaded([])
    where = f"{HUB[task][0]}[{split}]"
    for n, r in enumerate(records):
        try:
            if task == "sst2":
                if r["label"] not in (0, 1):
                    raise BadRow(f"label {r['label']!r} is not 0 or 1")
                out.rows.append(sst2_row(r["sentence"], int(r["label"]), split))
            elif task == "mmlu":
                if len(r["choices"]) != 4 or r["answer"] not in range(4):
                    raise BadRow(f"expected 4 choices and an answer 0-3, got {r['choices']!r}, {r['answer']!r}")
                out.rows.append(mmlu_row(subject or r["subject"], r["question"], list(r["choices"]),
                                         int(r["answer"]), split))
            else:
                out.rows.append(gsm8k_row(r["question"], r["answer"], split))
        except (BadRow, KeyError, TypeError) as err:
            _bad(Path(where), n, f"{type(err).__name__}: {err}", bad_rows, out)
    return _numbered(out)


def load_hub(task: str, split: str, *, subjects: list[str] | None = None, bad_rows: str = "error",
             revision: str | None = None) -> Loaded:
    """One split of one task from the Hugging Face hub (needs the hub, or its local cache)."""
    from datasets import load_dataset

    path, name = HUB[task]
    hub_split = HUB_SPLIT[task][split]
    out = Loaded([])
    for subject in (subjects or HIGH_SCHOOL_SUBJECTS) if task == "mmlu" else [None]:
        records = load_dataset(path, subject or name, split=hub_split, revision=revision)
        out.extend(rows_from_hub_records(task, records, split, bad_rows, subject))
    return _unique_ids(out)


def source_files(task: str, data_dir: Path, role: str, subjects: list[str] | None = None) -> list[Path]:
    """The release files a task's `train` or `eval` rows are read from (eval includes the
    split its few-shot exemplars come from)."""
    splits = {"train": [TRAIN_SPLIT[task]], "eval": [EVAL_SPLIT[task], FEWSHOT_SPLIT[task]]}[role]
    return [path for s in splits for path, _ in split_files(task, data_dir, s, subjects)]