"""`lamemo generate`: sample text from an exported model, with memory carried across segments.

    lamemo generate --model out/ --prompt "The " --max-new-tokens 200 --top-p 0.9 --seed 1

The memory is carried by model/decode.py:Stepper, the same code the Hugging Face export's
`generate()` runs, so both give the same tokens for the same seed (tests/test_generate.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..checkpoint.safe_load import add_trust_argument

    p.add_argument("--model", required=True, help="folder written by `lamemo convert`, or a "
                   "DeepSpeed checkpoint (run folder, its checkpoints/ or a step-N/), as eval")
    p.add_argument("--prompt", default="", help="text to continue (empty: start a document)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="softmax temperature (0: greedy)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling: keep the smallest set with this probability mass")
    p.add_argument("--seed", type=int, default=0, help="random seed of the sampler")
    p.add_argument("--mem-len", type=int, default=None,
                   help="memory length (default: the model's)")
    p.add_argument("--tokenizer", default=None,
                   help="folder holding lamemo_tokenizer.json (default: the model folder, else "
                   "the data folder the model was trained on)")
    p.add_argument("--stop-at-eos", action="store_true", help="stop at the end-of-document token")
    p.add_argument("--no-stream", action="store_true", help="print the text only at the end")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--no-verify", action="store_true",
                   help="use the model even if a file fails its manifest's sha256 check")
    add_trust_argument(p)


def sample(logprobs, *, temperature: float, top_k: int, top_p: float, generator) -> int:
    """One token id from log-probabilities [V] with temperature, top-k and nucleus filtering."""
    import torch

    if temperature <= 0:
        return int(logprobs.argmax())
    scores = logprobs.float() / temperature
    if 0 < top_k < scores.numel():
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, -1)
        before = torch.cumsum(probs, -1) - probs  # mass of the tokens ranked above
        drop = before >= top_p  # the first token always stays (its `before` is 0)
        scores = scores.clone()
        scores[order[drop]] = float("-inf")
    probs = torch.softmax(scores, -1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def generate_ids(model, prompt: list[int], *, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, mem_len: int | None = None,
                 eos_id: int | None = None, on_token=None) -> list[int]:
    """Generated ids (without the prompt); `on_token(id)` is called as each one is drawn."""
    import torch

    from ..model.decode import Stepper

    gen = torch.Generator().manual_seed(seed)
    stepper = Stepper(model, mem_len=mem_len)
    logprobs = stepper.feed(prompt)
    out: list[int] = []
    for _ in range(max_new_tokens):
        tok = sample(logprobs, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
        out.append(tok)
        if on_token is not None:
            on_token(tok)
        if eos_id is not None and tok == eos_id:
            break
        logprobs = stepper.feed([tok])
    return out


class _Printer:
    """Streams decoded text, holding back an incomplete UTF-8 tail (shown as U+FFFD)."""

    def __init__(self, tokenizer, stream: bool):
        self.tok, self.stream, self.ids, self.shown = tokenizer, stream, [], 0

    def __call__(self, tok: int) -> None:
        self.ids.append(tok)
        if not self.stream:
            return
        text = self.tok.decode(self.ids).rstrip("\ufffd")
        sys.stdout.write(text[self.shown:])
        sys.stdout.flush()
        self.shown = max(self.shown, len(text))

    def finish(self) -> None:
        text = self.tok.decode(self.ids)
        sys.stdout.write(text[self.shown:] + "\n")
        sys.stdout.flush()


def check_ranges(args) -> None:
    """Sampling settings a sampler can use (UserError, exit 2, naming the flag and its range)."""
    from ..config.errors import UserError

    rules = (("--temperature", args.temperature, args.temperature >= 0, ">= 0 (0: greedy)"),
             ("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1] (1: off)"),
             ("--top-k", args.top_k, args.top_k >= 0, ">= 0 (0: off)"),
             ("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 0, ">= 0"),
             ("--mem-len", args.mem_len, args.mem_len is None or args.mem_len >= 0, ">= 0"))
    for flag, value, ok, allowed in rules:
        if not ok:
            raise UserError(f"{flag} {value}: must be {allowed}")


def _tokenizer(args, model, run_config):
    """The tokenizer for the model: --tokenizer, its export folder or its training data; its
    vocabulary (and id, where the model has its own tokenizer) must be the model's."""
    from ..config.errors import UserError
    from ..data.contract import folder_tokenizer
    from ..data.tokenizer import load_tokenizer
    from .eval import tokenizer_folder

    own = tokenizer_folder(args.model, run_config)
    tok_dir = Path(args.tokenizer) if args.tokenizer else own
    if tok_dir is None or folder_tokenizer(tok_dir) is None:
        raise UserError(f"no tokenizer in {tok_dir or args.model}: pass --tokenizer DATA_DIR "
                        "(the data folder the model was trained on)")
    tokenizer = load_tokenizer(tok_dir)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise UserError(f"the model {args.model} has vocab_size {model.config.vocab_size} but "
                        f"the tokenizer in {tok_dir} has {tokenizer.vocab_size}: pass --tokenizer "
                        "with the data folder the model was trained on")
    if own is not None and folder_tokenizer(own) != folder_tokenizer(tok_dir):
        raise UserError(f"the tokenizer in {tok_dir} is not the model's (the one in {own}): "
                        "same vocab_size, different ids; drop --tokenizer or pass that folder")
    return tokenizer


def run(args) -> int:
    import torch

    from ..checkpoint.manager import CheckpointError
    from .eval import load_model

    check_ranges(args)
    try:
        model, run_config = load_model(args.model, "auto", verify=not args.no_verify)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"lamemo generate: {e}", file=sys.stderr)
        return 1
    tokenizer = _tokenizer(args, model, run_config)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    prompt = tokenizer.encode(args.prompt) if args.prompt else []
    prompt = prompt or [tokenizer.eos_id]
    sys.stdout.write(args.prompt)
    printer = _Printer(tokenizer, stream=not args.no_stream)
    generate_ids(model, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                 top_k=args.top_k, top_p=args.top_p, seed=args.seed, mem_len=args.mem_len,
                 eos_id=tokenizer.eos_id if args.stop_at_eos else None, on_token=printer)
    printer.finish()
    return 0
