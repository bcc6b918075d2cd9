"""Files copied into Hugging Face export folders (configuration_lamemo.py, and hf_wrapper.py,
which `convert/hf.py` appends to a standalone copy of lamemo_ds/model)."""
