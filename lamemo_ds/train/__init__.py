"""The training loop: trainer, schedules, state banks, metrics, signals and the `train` command."""
