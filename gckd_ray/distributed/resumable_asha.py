"""ASHA whose rungs survive ``Tuner.restore``.

``Tuner.restore`` rebuilds the scheduler from the Tuner as it was pickled at the start of the
sweep, so a plain ``ASHAScheduler`` comes back with empty rungs: after a resume, the first trial
to reach a rung is compared with nothing and continues however poor it is (seen on the default
protocol: a trial at target_mnn 7.4 at the first rung, where the two earlier trials had 18.9 and
25.1, ran to the end). Tune adds every restored trial to the scheduler again, finished ones
included, so this scheduler replays a trial's saved results (``result.json`` in its folder)
into its bracket when it is added. Each rung keeps a trial's first result at or past the
rung's milestone, so the rungs after the replay are the rungs before the interruption.
"""

from __future__ import annotations

import json
from pathlib import Path

from ray.tune.schedulers import ASHAScheduler

RESULT_FILE = "result.json"  # Tune's JSON logger: one result per line, in report order


def saved_results(trial_dir: str | None) -> list[dict]:
    """The results a trial reported before the sweep was interrupted (none for a new one). A
    last line cut short by the interruption is ignored."""
    path = Path(trial_dir or "") / RESULT_FILE
    if not trial_dir or not path.is_file():
        return []
    results = []
    for line in path.read_text().splitlines():
        try:
            results.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return results


class ResumableASHA(ASHAScheduler):
    """``ASHAScheduler`` that, when a trial is added, first replays its saved results."""

    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        if not trial.storage.trial_dir_name:
            return  # a new trial: no folder yet (``trial.path`` would raise), no results
        bracket = self._trial_info[trial.trial_id]
        for result in saved_results(trial.path):
            if self._time_attr in result and self._metric in result:
                bracket.on_result(trial, result[self._time_attr],
                                  self._metric_op * result[self._metric])
