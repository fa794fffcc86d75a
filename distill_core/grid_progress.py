"""What a grid shows while it runs: a Ray Tune callback, fed by the trials' own reports.

It counts trials (finished, running, pending), the steps they reported, the elapsed and the
estimated remaining time, and keeps the latest losses. Every finished trial is a line to
`trial_log` (by default `log`; a Dagster run's log, so a grid started from the UI can be
followed there), a failed one a line to `log`. On a terminal (`live`), a status line is
redrawn in place between those lines; without one, the status is also a plain line to `log`
every `every_s` seconds in which no trial finished.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from typing import TextIO

from ray.tune import Callback

LOSSES = ("loss", "L_task", "L_KD", "L_align_hidden", "L_align_attn")


def _discard(line: str) -> None:
    pass


def duration(seconds: float) -> str:
    """3m05s, 1h02m, 42s."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class GridProgress(Callback):
    """Progress of a grid of `trials` trials of `steps` steps each."""

    def __init__(self, trials: int, steps: int, log: Callable[[str], None], live: TextIO | None = None,
                 every_s: float = 30.0, clock: Callable[[], float] = time.monotonic,
                 trial_log: Callable[[str], None] | None = None):
        self.trials, self.steps, self.log, self.live = trials, steps, log, live
        self.trial_log = trial_log or log  # the finished trials' lines (a terminal has the live line)
        self.every_s, self.clock = every_s, clock
        self.started = clock()
        self._last_plain = self._last_draw = self.started
        self._first_steps: float | None = None  # when the first steps were reported (the rate's start)
        self._steps_done: dict[str, int] = {}
        self._trial_started: dict[str, float] = {}
        self._latest: dict[str, float] = {}
        self._done: set[str] = set()
        self._counts = {"done": 0, "failed": 0, "running": 0, "pending": trials}

    def __getstate__(self) -> dict:
        # Tune pickles its run config, callbacks included; a stream or a run's logger is not
        # picklable, and a resumed run brings its own (grid.run_grid).
        return {**self.__dict__, "log": _discard, "trial_log": _discard, "live": None,
                "clock": time.monotonic}

    @staticmethod
    def name(trial) -> str:
        config = trial.config or {}
        return f"{config.get('group', trial.trial_id)}-seed{config.get('seed', '?')}"

    # -- Tune's hooks --------------------------------------------------------------------------

    def on_trial_start(self, iteration, trials, trial, **info):
        self._trial_started.setdefault(trial.trial_id, self.clock())
        self._update(trials)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._steps_done[trial.trial_id] = int(result.get("step", 0))
        if self._first_steps is None:
            self._first_steps = self.clock()
        self._latest = {k: float(result[k]) for k in LOSSES if k in result}
        self._update(trials)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._steps_done[trial.trial_id] = self.steps
        self._done.add(trial.trial_id)
        self._update(trials)
        took = self.clock() - self._trial_started.get(trial.trial_id, self.started)
        result = trial.last_result or {}
        losses = " ".join(f"{k} {result[k]:.4g}" for k in LOSSES if k in result)
        self._line(f"trial {self._counts['done']}/{self.trials} done: {self.name(trial)}, "
                   f"{self.steps} steps in {duration(took)}, {losses} | {self.counts()}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._update(trials)
        self._line(f"trial {self.name(trial)} failed (Tune retries it up to its max_failures; "
                   f"the error is in its log under the grid's storage) | {self.counts()}",
                   always=True)

    def on_step_end(self, iteration, trials, **info):
        self._update(trials)

    def on_experiment_end(self, trials, **info):
        self._clear()
        self.log(f"grid finished: {self._counts['done']} of {self.trials} trials in "
                 f"{duration(self.clock() - self.started)}")

    # -- what is shown -------------------------------------------------------------------------

    def remaining_s(self) -> float | None:
        """Steps left at the rate the steps so far came (None until the rate is known)."""
        done = sum(self._steps_done.values())
        if not done or self._first_steps is None:
            return None
        elapsed = self.clock() - self._first_steps
        return (self.trials * self.steps - done) * elapsed / done if elapsed > 0 else None

    def counts(self) -> str:
        c = self._counts
        left = self.remaining_s()
        return (f"{c['done']}/{self.trials} trials done, {c['running']} running, {c['pending']} pending"
                + (f", {c['failed']} failed" if c["failed"] else "")
                + (f", ~{duration(left)} left" if left is not None else ""))

    def status(self) -> str:
        left = self.remaining_s()
        losses = " ".join(f"{k} {v:.3g}" for k, v in self._latest.items())
        return (self.counts().rsplit(", ~", 1)[0]
                + f" | steps {sum(self._steps_done.values()):,}/{self.trials * self.steps:,}"
                + f" | {duration(self.clock() - self.started)} elapsed"
                + (f", ~{duration(left)} left" if left is not None else "")
                + (f" | latest {losses}" if losses else ""))

    def _update(self, trials) -> None:
        from ray.tune.experiment import Trial

        # Tune calls on_trial_complete before it marks the trial TERMINATED: the trials this
        # callback saw complete count as done whatever their status says yet.
        done = self._done | {t.trial_id for t in trials if t.status == Trial.TERMINATED}
        failed = {t.trial_id for t in trials if t.status == Trial.ERROR} - done
        running = {t.trial_id for t in trials if t.status == Trial.RUNNING} - done
        self._counts = {"done": len(done), "failed": len(failed), "running": len(running),
                        "pending": self.trials - len(done) - len(failed) - len(running)}
        now = self.clock()
        if self.live is not None:
            if now - self._last_draw >= 0.5:
                self._draw()
        elif now - self._last_plain >= self.every_s:
            self._last_plain = now
            self.log(f"grid: {self.status()}")

    def _line(self, text: str, always: bool = False) -> None:
        self._clear()
        (self.log if always else self.trial_log)(text)
        self._last_plain = self.clock()
        if self.live is not None:
            self._draw()

    def _draw(self) -> None:
        self._last_draw = self.clock()
        # One terminal row: a wrapped line could not be redrawn in place.
        width = shutil.get_terminal_size((120, 24)).columns - 1
        self.live.write(f"\r\033[K{f'  grid: {self.status()}'[:width]}")
        self.live.flush()

    def _clear(self) -> None:
        if self.live is not None:
            self.live.write("\r\033[K")
            self.live.flush()
