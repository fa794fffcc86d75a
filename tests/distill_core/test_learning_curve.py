"""Learning curves: validation points reported through Tune at curve_every steps, and a trial
that scores them trains exactly as one that does not."""

import torch
from safetensors.torch import load_file

from distill_core.config import TASKS
from distill_core.grid import param_space, run_grid
from distill_core.learning_curve import curves_table


def test_curves_are_reported_and_leave_the_training_unchanged(tmp_path, ray_local, tiny_config, tiny_caches,
                                                              tiny_teacher_dir, tiny_data):
    paths = {}
    for task in TASKS:  # held-out rows: the fixture's eval rows stand in for them here
        paths[task] = str(tmp_path / f"{task}-validation.parquet")
        tiny_data[task]["eval"].head(6).to_parquet(paths[task])
    finals, histories = {}, {}
    for curve_every in (0, 10):
        cfg = tiny_config.model_copy(update={
            "data": tiny_config.data.model_copy(update={"validation_size": {t: 6 for t in TASKS}}),
            "distill": tiny_config.distill.model_copy(update={
                "groups": ["black_box"], "seeds": 1, "curve_every": curve_every})})
        out = tmp_path / f"out{curve_every}"
        space = param_space(cfg, cache_dirs=tiny_caches, teacher_dir=str(tiny_teacher_dir),
                            student_tokenizer_dir=str(tiny_teacher_dir / "student_tokenizer"),
                            output_dir=str(out), cache_version="t", code_version="t", mlflow=None,
                            validation_paths=paths)
        (result,) = run_grid(cfg, tmp_path / "ray", f"curves{curve_every}", space)
        assert result.error is None
        finals[curve_every] = load_file(str(out / "black_box-seed0" / "model.safetensors"))
        histories[curve_every] = result.metrics_dataframe.assign(group="black_box", seed=0)
    # The same weights to the bit: scoring touched neither the model nor the random state.
    assert finals[0].keys() == finals[10].keys()
    assert all(torch.equal(finals[0][k], finals[10][k]) for k in finals[0])
    curves = curves_table([histories[10]])
    assert sorted(curves["step"].unique()) == [10, 20]
    assert set(curves["metric"]) == {"val_loss", *(f"val_{t}_{m}" for t in TASKS for m in ("loss", "accuracy"))}
    accuracy = curves[curves["metric"].str.endswith("_accuracy")]["value"]
    assert accuracy.between(0, 1).all()
    assert (curves[curves["metric"] == "val_loss"]["value"] > 0).all()
    assert curves_table([histories[0]]).empty
