"""Files copied into Hugging Face export folders (configuration_lamemo.py; hf_wrapper.py and
tied.py, which `convert/hf.py` appends to a standalone copy of lamemo_ds/model).

Rule: these modules must run inside an export folder with only torch and transformers: package
imports only inside hf_wrapper's marked block (stripped at export), and tied.py imports torch
only; the package's converters import tied.py from here (one tied-weight detector).
"""
