"""Process groups and the DeepSpeed engine: everything that knows the model is distributed."""
