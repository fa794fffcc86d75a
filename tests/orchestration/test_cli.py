"""`kdbench demo` refuses a bad preset before any compute, naming the field; `kdbench
estimate` prints the cache's size as JSON."""

import json

import pytest

from orchestration.cli import main


def test_bad_override_fails_before_compute_naming_the_field(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--set", "distill.seeds=0"]) == 2
    err = capsys.readouterr().err
    assert "distill.seeds" in err and "greater than or equal to 1" in err
    assert not (tmp_path / ".dagster").exists() and not (tmp_path / "artifacts").exists()


def test_unknown_preset_and_malformed_set(capsys):
    assert main(["demo", "--preset", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="key=value"):
        main(["demo", "--set", "distill.seeds"])


def test_estimate_of_the_paper_preset_needs_no_download(capsys):
    assert main(["estimate", "--preset", "paper"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["d_teacher"] == 4096 and out["teacher_heads"] == 32
    sst2 = out["tasks"]["sst2"]
    assert sst2["rows"] == 20000
    # hidden: 2 bytes x 4096 dims at every chunk end
    assert sst2["bytes"]["hidden"] == 2 * 4096 * sst2["chunks"]
    assert out["total_bytes"] == sum(out["bytes"].values()) and out["within_budget"]


def test_estimate_of_the_same_vocabulary_pair_needs_no_download(capsys):
    from distill_core.config import load_config

    cfg = load_config("paper-same-vocab")
    assert cfg.teacher.vocab_size == cfg.student.vocab_size == 128256
    assert cfg.student.hub_id == "meta-llama/Llama-3.2-1B" and cfg.student.num_layers == 16
    assert main(["estimate", "--preset", "paper-same-vocab"]) == 0
    out = json.loads(capsys.readouterr().out)
    paper = _estimate("paper", capsys)
    for task, shapes in out["tasks"].items():
        # one tokenizer: every student token is a chunk, as many as the teacher's tokens
        assert shapes["student_tokens"] == shapes["teacher_tokens"] == shapes["chunks"], task
        assert shapes["chunks"] == paper["tasks"][task]["chunks"], task  # the teacher's side is paper's


def _estimate(preset, capsys) -> dict:
    assert main(["estimate", "--preset", preset]) == 0
    return json.loads(capsys.readouterr().out)


def test_estimate_says_when_a_preset_exceeds_its_budget(capsys):
    assert main(["estimate", "--preset", "paper", "--set", "cache.budget_gib=1"]) == 0
    assert json.loads(capsys.readouterr().out)["within_budget"] is False


def test_compare_writes_two_studies_side_by_side_under_the_storage_root(capsys, tmp_path, monkeypatch):
    import pandas as pd

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    monkeypatch.setenv("KDBENCH_STORAGE_ROOT", str(tmp_path / "store"))
    (tmp_path / "dagster_home").mkdir()
    paths = []
    for name, lift in (("a", 0.0), ("b", 0.2)):
        rows = [{"model": f"{g}-seed{s}", "group": g, "seed": s, "task": "sst2",
                 "accuracy": 0.5 + 0.01 * s + (lift if g == "black_box" else 0.0)}
                for g in ("task_only", "black_box") for s in range(3)]
        path = tmp_path / name / "evaluation_table.parquet"
        path.parent.mkdir()
        pd.DataFrame(rows).to_parquet(path)
        paths.append(str(path))
    assert main(["compare", *paths]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# b against a")
    table = pd.read_csv(tmp_path / "store" / "artifacts" / "comparisons" / "a--b" / "comparison.csv")
    assert table.set_index("group").loc["black_box", "diff_of_diffs"] == pytest.approx(0.2)
    assert main(["compare", "tiny", paths[1]]) == 2  # no tiny study in this instance
    assert "kdbench demo --preset tiny" in capsys.readouterr().err
