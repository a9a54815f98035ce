"""The one place that knows Ray (Train, actors) and, later, DeepSpeed."""
