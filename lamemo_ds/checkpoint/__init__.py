"""Checkpoint I/O: atomic save and resume of training state (manager.py), the files DeepSpeed
writes (deepspeed_io.py, layer_map.py) and consolidated model folders (safetensors_io.py).
Conversion between formats builds on these in lamemo_ds/convert."""
