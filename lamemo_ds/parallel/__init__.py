"""Process groups, the DeepSpeed engines with their optimizer and LR schedule, and the pipeline
stages: everything that knows the model is distributed.

Rule: parallel/ wraps the model and never changes its numbers: a pipeline stage runs the
model's own modules through the model's own `layer_step`, so data parallel and pipeline train
the same function. DeepSpeed's private API is used only in ds_adapter.py (checked by
tests/test_ds_adapter.py); engine.initialize is the one place an engine is built; dist.py is
the one module here that reads the environment.
"""
