"""The training loop: the trainer, its parallel strategies (data, pipeline), the Stateful training
state, metrics and signals (the `train` command is commands/train.py)."""
