"""``results.json`` (gckd_ray.results): what a run reports it ran."""

from __future__ import annotations

from gckd_ray.config import load_config
from gckd_ray.results import phases


def _cfg(*overrides: str):
    return load_config(None, list(overrides))


def test_phases_say_what_ran():
    cfg = _cfg("train.epochs=3", "gckd.warmup_epochs=1")
    history = [{"epoch": 1, "itc": 1.0, "id": 2.0, "loss": 3.0, "R1": 5.0},
               {"epoch": 2, "itc": 1.0, "id": 2.0, "cmkd": 1.0, "gmp": 0.5, "loss": 4.5},
               {"epoch": 3, "itc": 1.0, "id": 2.0, "cmkd": 1.0, "itm": 0.1, "loss": 4.1}]
    assert phases(cfg, history) == {
        "source": {"epochs": 1, "losses": ["itc", "id"]},
        "adaptation": {"epochs": 2, "losses": ["itc", "id", "cmkd", "gmp", "itm"]}}
    assert phases(_cfg("method=source_only"), history[:1]) == {
        "source": {"epochs": 1, "losses": ["itc", "id"]}}
