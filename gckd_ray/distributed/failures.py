"""Which worker errors Ray Train may retry. Faults (a killed worker, OOM, a lost node) are
retried from the last checkpoint up to ``train.max_failures`` times; a deterministic input error
(bad data, bad config: ``InputError``) would fail the same way again, so it ends the run at once
and reaches the command line as its one ``<kind> error: ...`` line."""

from __future__ import annotations

import logging
import sys

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy
from ray.train.v2._internal.execution.failure_handling.failure_policy import FailureDecision

from gckd_ray.errors import InputError


def input_error_of(error: BaseException) -> InputError | None:
    """The first worker's ``InputError`` inside a Train failure, or None (a fault)."""
    for failure in getattr(error, "worker_failures", {}).values():
        base = getattr(failure, "_base_exc", failure)  # Train wraps it with its traceback text
        while base is not None and not isinstance(base, InputError):
            base = base.__cause__
        if base is not None:
            return base
    return None


class _NoInputErrorTraceback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not isinstance(sys.exc_info()[1], InputError)


def quiet_input_error_tracebacks() -> None:
    """In a Train worker: Ray logs every training-function error with its traceback; an input
    error's one line reaches the driver anyway (``input_error_of``), so its traceback is not
    logged. Idempotent."""
    logger = logging.getLogger("ray.train.v2._internal.util")  # "Error in training function"
    if not any(isinstance(f, _NoInputErrorTraceback) for f in logger.filters):
        logger.addFilter(_NoInputErrorTraceback())


class InputErrorsAreFinal(DefaultFailurePolicy):
    """Ray Train's default policy, except that an input error is raised, never retried."""

    def make_decision(self, training_failed_error) -> FailureDecision:
        if input_error_of(training_failed_error) is not None:
            return FailureDecision.RAISE
        return super().make_decision(training_failed_error)


class Trainer(TorchTrainer):
    """``TorchTrainer`` with :class:`InputErrorsAreFinal` as its failure policy."""

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        controller_init_kwargs["failure_policy"] = InputErrorsAreFinal(
            self.run_config.failure_config)
        return super()._initialize_and_run_controller(**controller_init_kwargs)
