"""Process groups, the DeepSpeed engines with their optimizer and LR schedule, and the pipeline
stages: everything that knows the model is distributed."""
