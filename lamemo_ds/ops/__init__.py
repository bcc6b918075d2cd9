"""Fused attention kernels and the dispatch between them and the eager oracle."""
