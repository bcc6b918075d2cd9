"""Name mapping between the authors' reference checkpoints (docs/algorithm.md §8) and ours.

A table of (reference name pattern, our name pattern); the only non-trivial entry is the
attention input projection: the reference keeps q_net [HD, d] and kv_net [2HD, d] (K then V)
for LaMemo, or one qkv_net [3HD, d] for Transformer-XL; we keep one qkv [3HD, d] (Q, K, V).
"""

from __future__ import annotations

# Per-layer names, identical apart from the prefix ({i} = layer index).
LAYER_TABLE: list[tuple[str, str]] = [
    ("layers.{i}.dec_attn.r_net.weight", "layers.{i}.r_net.weight"),
    ("layers.{i}.dec_attn.o_net.weight", "layers.{i}.o_net.weight"),
    ("layers.{i}.dec_attn.layer_norm.weight", "layers.{i}.norm.weight"),
    ("layers.{i}.dec_attn.layer_norm.bias", "layers.{i}.norm.bias"),
    ("layers.{i}.pos_ff.CoreNet.0.weight", "layers.{i}.ff.fc1.weight"),
    ("layers.{i}.pos_ff.CoreNet.0.bias", "layers.{i}.ff.fc1.bias"),
    ("layers.{i}.pos_ff.CoreNet.3.weight", "layers.{i}.ff.fc2.weight"),
    ("layers.{i}.pos_ff.CoreNet.3.bias", "layers.{i}.ff.fc2.bias"),
    ("layers.{i}.pos_ff.layer_norm.weight", "layers.{i}.ff.norm.weight"),
    ("layers.{i}.pos_ff.layer_norm.bias", "layers.{i}.ff.norm.bias"),
]

# Model-level names ({c} = adaptive cluster index).
GLOBAL_TABLE: list[tuple[str, str]] = [
    ("r_w_bias", "biases.r_w_bias"),
    ("r_r_bias", "biases.r_r_bias"),
    ("r_r_bias_future", "biases.r_r_bias_future"),
    ("r_w_bias_future", "biases.r_w_bias_future"),
    ("word_emb.emb_layers.{c}.weight", "word_emb.emb_layers.{c}.weight"),
    ("word_emb.emb_projs.{c}", "word_emb.emb_projs.{c}"),
    ("crit.out_layers.{c}.weight", "crit.out_layers.{c}.weight"),
    ("crit.out_layers.{c}.bias", "crit.out_layers.{c}.bias"),
    ("crit.out_projs.{c}", "crit.out_projs.{c}"),
    ("crit.cluster_weight", "crit.cluster_weight"),
    ("crit.cluster_bias", "crit.cluster_bias"),
]

# Reference buffers that carry no information for us.
IGNORED_REFERENCE = ("pos_emb.inv_freq", "train_logits_constant", "eval_logits_constant")


def expand(table, n_layer: int, n_clusters: int):
    """All concrete (reference, ours) pairs for a model shape."""
    pairs = []
    for ref, ours in table:
        if "{i}" in ref:
            pairs += [(ref.format(i=i), ours.format(i=i)) for i in range(n_layer)]
        elif "{c}" in ref:
            pairs += [(ref.format(c=c), ours.format(c=c)) for c in range(n_clusters + 1)]
        else:
            pairs.append((ref, ours))
    return pairs
