"""The one place that knows Ray (Train, Tune, the memory actor) and DeepSpeed."""
