"""Checkpoint I/O of training: atomic save and resume of a step folder (manager.py), the files
DeepSpeed writes (deepspeed_files.py: check and merge them; layer_map.py: a pipeline's layer
files), the run folder's history (run_folder.py) and the one restricted .pt loader (safe_load.py).

Rule: this folder knows training checkpoints only, as files: it imports config/ and fileio (never
convert/, train/ or parallel/), and every .pt it reads goes through safe_load. Export formats
(safetensors folders, hf, reference) live one layer up in convert/.
"""
