"""Fused attention kernels and the dispatch between them and the eager oracle.

Rule: every kernel has an eager twin in attention.py that is the oracle (the kernels are tested
against it, and the Hugging Face export runs it); dispatch.py alone chooses between them. Ops
are pure functions of tensors: no modules, no parameters, no model config.
"""
