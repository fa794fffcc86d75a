"""`kdbench demo` refuses a bad preset before any compute, naming the field."""

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
