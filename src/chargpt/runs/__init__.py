"""A run directory: the weights, configs and vocabulary a training run leaves (`directory`) and
its loss log, `metrics.jsonl` (`metrics`)."""
