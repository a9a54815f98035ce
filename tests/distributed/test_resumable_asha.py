"""ASHA after ``Tuner.restore``: the rungs are rebuilt from the trials' saved results, so a poor
trial is still stopped at a rung the earlier trials passed before the interruption."""

import json
from types import SimpleNamespace

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from gckd_ray.config import load_config
from gckd_ray.distributed import sweep
from gckd_ray.distributed.resumable_asha import saved_results

# target_mnn per epoch of two trials of the default-protocol sweep (first rung: epoch 14).
EARLIER = {"a": {13: 20.9, 14: 18.9, 15: 22.3}, "b": {13: 27.5, 14: 25.1, 15: 28.0}}


class _Trial:
    """A trial as the scheduler sees it: its id and, once Tune has named its folder, the folder
    (holding Tune's result.json); like Tune's ``Trial.path``, ``path`` raises before that."""

    def __init__(self, trial_id: str, folder=None):
        self.trial_id = trial_id
        self.storage = SimpleNamespace(trial_dir_name=folder.name if folder else None)
        self._folder = folder

    @property
    def path(self) -> str:
        if self._folder is None:
            raise RuntimeError("Should not access `trial_fs_path` without setting "
                               "`trial_dir_name`")
        return str(self._folder)


def _trial(tmp_path, trial_id: str, results: dict[int, float] | None = None, cut_short=False):
    """A restored trial with ``results`` saved, or (no results) a new one."""
    if not results:
        return _Trial(trial_id)
    folder = tmp_path / trial_id
    folder.mkdir(parents=True)
    lines = [json.dumps({"epoch": e, "target_mnn": v}) for e, v in results.items()]
    text = "\n".join(lines) + "\n" + ('{"epoch": 16, "target_' if cut_short else "")
    (folder / "result.json").write_text(text)
    return _Trial(trial_id, folder)


def _restored(scheduler, tmp_path):
    """The scheduler as Tune resumes a sweep: fresh, then every earlier trial added again."""
    scheduler.set_search_properties("target_mnn", "max")
    for trial_id, results in EARLIER.items():
        scheduler.on_trial_add(None, _trial(tmp_path, trial_id, results, cut_short=True))
    poor = _trial(tmp_path, "c")  # new: added before Tune names its folder
    scheduler.on_trial_add(None, poor)
    return scheduler, poor


def test_restored_rungs_stop_a_poor_trial_that_a_plain_asha_would_let_run(tmp_path):
    cfg = load_config(None, ["train.epochs=30", "gckd.warmup_epochs=10", "tune.grace_epochs=4"])
    scheduler, poor = _restored(sweep.asha(cfg), tmp_path / "resumable")
    rungs = dict(scheduler._brackets[0]._rungs)
    assert rungs[14] == {"a": 18.9, "b": 25.1}  # the first result at or past the milestone
    assert scheduler.on_trial_result(None, poor, {"epoch": 14, "target_mnn": 7.4}) \
        == TrialScheduler.STOP

    plain = ASHAScheduler(time_attr="epoch", max_t=31, grace_period=14, reduction_factor=2.0)
    plain, poor = _restored(plain, tmp_path / "plain")
    assert plain.on_trial_result(None, poor, {"epoch": 14, "target_mnn": 7.4}) \
        == TrialScheduler.CONTINUE  # the bug: empty rungs after Tuner.restore


def test_saved_results_of_a_new_trial_and_a_cut_short_file(tmp_path):
    assert saved_results(None) == [] and saved_results(str(tmp_path)) == []
    trial = _trial(tmp_path, "t", {1: 0.5, 2: 0.75}, cut_short=True)
    assert trial.storage.trial_dir_name == "t"
    assert saved_results(trial.path) == [{"epoch": 1, "target_mnn": 0.5},
                                         {"epoch": 2, "target_mnn": 0.75}]
