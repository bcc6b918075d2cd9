"""The Hugging Face face of a LaMemo model: appended, at export time, to a standalone copy of
lamemo_ds/model (see convert/hf.py), so the exported modeling file needs only torch and
transformers. Inside lamemo_ds it imports the same classes from the package.

`forward(input_ids, mems=None, labels=None)` takes and returns the memory state, so a text is
evaluated segment by segment exactly as `lamemo eval` does:

    out = model(x0); out = model(x1, mems=out.mems); ...

`generate()` (transformers' GenerationMixin, greedy or sampling) carries the memory in a
LaMemoCache between its calls of the model: the first call feeds the whole prompt, later calls
only the new token, and model/decode.py:Stepper advances the memory exactly as `lamemo generate`
does, so both give the same tokens for the same seed.
"""

from dataclasses import dataclass

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

# --- lamemo_ds imports (stripped at export: the exported file defines these names above) ---
from ..config.schema import ModelConfig  # noqa: I001
from ..model.decode import Stepper
from ..model.lm import LaMemoLM
from ..model.memory import MemoryState
from ..model.positional import SinusoidTable
from .configuration_lamemo import LaMemoConfig
from .tied import tied_aliases

# --- end lamemo_ds imports ---


@dataclass
class LaMemoOutput(ModelOutput):
    """loss: mean NLL of `labels`; logits [B, N, V] log-probabilities ([B, 1, V], the next token's,
    when decoding with a cache); mems: the memory state to pass with the next segment; nll [B, N]
    per-token NLL (with labels); cache: the decoding state to pass with the next tokens."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    mems: MemoryState | None = None
    nll: torch.Tensor | None = None
    cache: "LaMemoCache | None" = None


class LaMemoCache:
    """What `generate()` carries between its calls of the model: a Stepper (the memory state and
    the tokens of the unfinished segment). Not a transformers Cache: LaMemo's memory is not a
    key/value store that can be cropped or reordered, so beam search is not supported."""

    is_compileable = False

    def __init__(self, stepper: Stepper):
        self.stepper = stepper

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens fed so far (transformers slices a continued prompt with it)."""
        return self.stepper.seen


class LaMemoForCausalLM(PreTrainedModel, GenerationMixin):
    """A LaMemoLM (`self.lamemo`) behind the transformers loading and generation API; eager
    attention."""

    config_class = LaMemoConfig
    base_model_prefix = "lamemo"
    main_input_name = "input_ids"
    _no_split_modules = ["DecoderLayer"]

    def __init__(self, config: LaMemoConfig):
        super().__init__(config)
        fields = {k: tuple(v) if isinstance(v, list) else v
                  for k, v in config.lamemo_model.items()}
        fields["attention_impl"] = "eager"
        self.lamemo = LaMemoLM(ModelConfig(**fields))
        prefix = config.weights_prefix
        self._tied_weights_keys = {prefix + a: prefix + s
                                   for a, s in tied_aliases(self.lamemo).items()}
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        # Parameters come from the checkpoint (or LaMemoLM's own init); only the non-persistent
        # sinusoid frequencies must be recomputed when transformers materialises buffers.
        if isinstance(module, SinusoidTable):
            with torch.device("cpu"):
                fresh = SinusoidTable(module.inv_freq.shape[0] * 2).inv_freq
            module.inv_freq.copy_(fresh.to(module.inv_freq.device))

    def tie_weights(self, *args, **kwargs):
        super().tie_weights(*args, **kwargs)
        self.lamemo.tie_weights()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.lamemo.word_emb

    def init_mems(self, batch_size: int, mem_len: int | None = None) -> MemoryState:
        """Empty memory for `batch_size` streams (mem_len: the model's, or longer to evaluate)."""
        return self.lamemo.init_state(batch_size, mem_len=mem_len)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the memory travels in a LaMemoCache the first forward creates

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, **kwargs) -> dict:
        if kwargs.get("use_cache") is False:  # every step would re-run the text as one segment
            raise ValueError("LaMemo generates with its memory carried in a cache: leave "
                             "use_cache=True")
        return super().prepare_inputs_for_generation(input_ids, **kwargs)

    def forward(self, input_ids: torch.Tensor, mems: MemoryState | None = None,
                labels: torch.Tensor | None = None, return_dict: bool = True,
                cache: LaMemoCache | None = None, use_cache: bool | None = None,
                attention_mask: torch.Tensor | None = None, **kwargs) -> LaMemoOutput:
        """input_ids [B, N]; labels [B, N] the NEXT token of every position (already shifted,
        as in segment-wise evaluation); mems from the previous segment's output.

        Decoding (`generate()`, or `use_cache=True` / a `cache`): input_ids are the tokens not yet
        fed (the whole prompt first, then the new ones); returns the next token's log-probs
        [B, 1, V] and the cache to pass with the next call."""
        unknown = sorted(k for k, v in kwargs.items() if v is not None)
        if unknown:
            raise TypeError(f"LaMemoForCausalLM.forward got unsupported arguments {unknown}")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("LaMemoForCausalLM does not support padding: pass unpadded "
                             "sequences of equal length (or one at a time)")
        if cache is not None or use_cache:
            if mems is not None or labels is not None:
                raise ValueError("decoding (use_cache/cache) takes neither mems nor labels")
            if cache is None:
                cache = LaMemoCache(Stepper(self.lamemo, batch_size=input_ids.shape[0]))
            logits = cache.stepper.feed(input_ids)  # [B, V]
            result = LaMemoOutput(logits=logits[:, None], cache=cache)
        else:
            out = self.lamemo(input_ids, mems, targets=labels, return_logits=True)
            result = LaMemoOutput(loss=out.loss, logits=out.logits, mems=out.state, nll=out.nll)
        return result if return_dict else result.to_tuple()
