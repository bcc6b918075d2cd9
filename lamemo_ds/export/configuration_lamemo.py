"""Hugging Face configuration of an exported LaMemo model (copied verbatim into export folders).

The whole lamemo_ds ModelConfig travels as one dict (`lamemo_model`), so the exported model is
built from exactly the fields it was trained with; `weights_prefix` is where the model's tensors
live in the safetensors files.
"""

from transformers import PretrainedConfig


class LaMemoConfig(PretrainedConfig):
    model_type = "lamemo"

    def __init__(self, lamemo_model: dict | None = None, weights_prefix: str = "lamemo.",
                 tie_word_embeddings: bool = True, **kwargs):
        self.lamemo_model = dict(lamemo_model or {})
        self.weights_prefix = weights_prefix
        self.vocab_size = self.lamemo_model.get("vocab_size")
        self.hidden_size = self.lamemo_model.get("d_model")
        self.num_hidden_layers = self.lamemo_model.get("n_layer")
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
