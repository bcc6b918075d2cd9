"""Tied weights: the parameter names that share one tensor with an earlier name.

The one detector of the package: the writers store each tied tensor once (convert/), and the
exported transformers model (hf_wrapper.py) declares the same pairs, so this module is also
copied into every hf export's modeling file (convert/hf.py MODEL_SOURCES): plain torch only.
"""

import torch


def tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """{alias: first name} for parameters that share one tensor (tied weights)."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases
