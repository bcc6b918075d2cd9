"""Checkpoint conversion: one registry of formats (deepspeed, consolidated, hf, reference), each
with a reader and a writer, shared by `lamemo convert` and the programs in tools/."""
