"""The training loop: the trainer (trainer.py), its parallel strategies behind one Protocol
(strategy.py; data_parallel.py, pipeline_parallel.py), the Stateful training state, metrics,
signals and the run lock (the `train` command is commands/train.py).

Rule: a strategy owns how a step, an evaluation and the weights are made for its layout; the
trainer owns everything else and talks to a strategy only through `Strategy`.
"""
