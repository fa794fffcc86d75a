"""The grid's progress display (a Ray Tune callback), driven through Tune's hooks as Tune drives
it, with a clock the test sets: counts, the remaining-time estimate from the steps reported,
a line per finished trial, in-place redraws on a terminal and plain lines without one. The
whole grid run through Tune with this callback is tests/orchestration/test_study.py's."""

import io
import os
import pickle

from ray.tune.experiment import Trial

from distill_core.grid_progress import GridProgress, duration


class FakeTrial:
    def __init__(self, group, seed):
        self.trial_id, self.config = f"{group}_{seed}", {"group": group, "seed": seed}
        self.status, self.last_result = Trial.PENDING, {}


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _grid():
    return [FakeTrial(g, s) for g in ("black_box", "combined") for s in (0, 1)]


def test_counts_estimate_and_a_line_per_finished_trial_without_a_terminal():
    clock, lines = Clock(), []
    progress = GridProgress(trials=4, steps=100, log=lines.append, every_s=45, clock=clock)
    trials = _grid()
    for trial in trials[:2]:
        trial.status = Trial.RUNNING
        progress.on_trial_start(0, trials, trial)
    assert "0/4 trials done, 2 running, 2 pending" in progress.status()
    assert progress.remaining_s() is None  # no steps yet: no rate
    clock.now += 10
    result = {"step": 50, "loss": 2.5, "L_task": 1.5, "L_KD": 1.0}
    progress.on_trial_result(0, trials, trials[0], result)
    clock.now += 20  # 50 steps in 20 s since the first report: 2.5 steps/s
    progress.on_trial_result(0, trials, trials[1], {**result, "step": 50})
    # 100 of 400 steps in 20 s -> 300 left at 5 steps/s
    assert progress.remaining_s() == 60
    assert lines == []  # nothing finished and under every_s since the start
    clock.now += 30
    progress.on_step_end(0, trials)
    assert len(lines) == 1 and lines[0].startswith("grid: 0/4 trials done") and "~" in lines[0]
    # Tune calls on_trial_complete before it marks the trial TERMINATED; 150 of 400 steps in
    # the 50 s since the first report: 250 left at 3 steps/s
    trials[0].last_result = {**result, "step": 100, "loss": 1.25}
    progress.on_trial_complete(0, trials, trials[0])
    assert lines[-1].startswith("trial 1/4 done: black_box-seed0, 100 steps in 1m00s, loss 1.25 ")
    assert lines[-1].endswith("| 1/4 trials done, 1 running, 2 pending, ~1m23s left") and "L_KD 1" in lines[-1]
    trials[1].status = Trial.ERROR
    progress.on_trial_error(0, trials, trials[1])
    assert "black_box-seed1 failed" in lines[-1] and "1 failed" in lines[-1]
    progress.on_experiment_end(trials)
    assert lines[-1] == "grid finished: 1 of 4 trials in 1m00s"


def test_on_a_terminal_the_status_is_redrawn_in_place_and_cleared_for_each_line():
    clock, lines, terminal = Clock(), [], io.StringIO()
    progress = GridProgress(trials=2, steps=10, log=lines.append, live=terminal, clock=clock)
    trials = _grid()[:2]
    trials[0].status = Trial.RUNNING
    clock.now += 1
    progress.on_trial_start(0, trials, trials[0])
    assert terminal.getvalue().startswith("\r\033[K  grid: 0/2 trials done, 1 running, 1 pending")
    assert "\n" not in terminal.getvalue() and lines == []  # no plain status lines on a terminal
    trials[0].status, trials[0].last_result = Trial.TERMINATED, {"step": 10, "loss": 0.5}
    clock.now += 100
    progress.on_trial_complete(0, trials, trials[0])
    assert len(lines) == 1 and lines[0].startswith("trial 1/2 done: black_box-seed0")
    # cleared before the line is logged, redrawn after it, on one terminal row
    redrawn = terminal.getvalue().rsplit("\r\033[K\r\033[K", 1)[1]
    assert redrawn.startswith("  grid: 1/2 trials done, 0 running, 1 pending") and len(redrawn) < 120


def test_it_pickles_without_its_outputs_as_tune_saves_its_run_config():
    with open(os.devnull, "w") as terminal:  # neither a stream nor a closure pickles
        progress = GridProgress(trials=2, steps=10, log=lambda line: None, live=terminal)
        restored = pickle.loads(pickle.dumps(progress))
    assert restored.live is None and restored.trials == 2
    restored.log("not printed")  # a no-op: the resumed run passes its own callbacks


def test_durations_read_as_a_person_says_them():
    assert [duration(s) for s in (42, 185, 3720)] == ["42s", "3m05s", "1h02m"]
