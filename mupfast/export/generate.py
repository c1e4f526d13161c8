"""``mupfast generate``: sample from a trained run with a KV cache, streaming the text as it comes.

Decoding is the model's own forward with its :class:`~mupfast.model.KVCache`: each block keeps its
keys and values (after RoPE, at their absolute positions), so a step feeds one new token through the
stack and attends to everything before it, with the same logits as a full recomputation (tests pin
it to ~1e-5).

Sampling controls, applied in this order to the last position's logits (the usual order, as in
Hugging Face's ``generate``): temperature (0 means greedy), top-k, top-p (nucleus). Draws come from
a ``torch.Generator`` seeded by ``--seed``, so a seed gives the same text every time (on the same
device). Generation stops after ``--max-new-tokens`` or when the sequence reaches model.max_seq_len.
"""

from __future__ import annotations

import argparse
import codecs
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mupfast.errors import ConfigError
from mupfast.model import KVCache, Transformer

# ----------------------------------------------------------------------------------------------
# Sampling


def filtered_probs(
    logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """The sampling distribution over the last dim of ``logits`` after temperature, top-k and top-p.

    temperature 0 gives the one-hot of the argmax (greedy); top_k 0 and top_p 1 turn those filters
    off. Top-p keeps the smallest set of most likely tokens whose mass reaches p (at least one).
    """
    logits = logits.float()
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the more likely tokens
        drop_sorted = mass_before >= top_p  # the first token always stays (mass before it is 0)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def check_sampling_args(temperature: float, top_k: int, top_p: float, max_new_tokens: int) -> None:
    """One-line errors naming the flag, for the CLI and the API alike."""
    if not temperature >= 0:
        raise ConfigError(f"--temperature: must be >= 0 (0 is greedy; got {temperature})")
    if top_k < 0:
        raise ConfigError(f"--top-k: must be >= 0 (0 turns it off; got {top_k})")
    if not 0 < top_p <= 1:
        raise ConfigError(f"--top-p: must be in (0, 1] (1 turns it off; got {top_p})")
    if max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens: must be >= 0 (got {max_new_tokens})")


@torch.no_grad()
def generate_ids(
    model: Transformer,
    prompt: list[int],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    allowed_vocab: int | None = None,
    on_token: Callable[[int], None] | None = None,
    use_cache: bool = True,
) -> list[int]:
    """New token ids after ``prompt``; ``on_token`` sees each one as it is drawn.

    ``allowed_vocab`` masks ids at and above it (a model vocab padded past the tokenizer's).
    ``use_cache=False`` recomputes the whole sequence every step (the reference the cache must match).
    """
    check_sampling_args(temperature, top_k, top_p, max_new_tokens)
    cfg = model.cfg
    if not prompt:
        raise ConfigError("--prompt: empty (the model needs at least one token to continue)")
    if len(prompt) > cfg.max_seq_len:
        raise ConfigError(
            f"--prompt: {len(prompt)} tokens is longer than model.max_seq_len ({cfg.max_seq_len})"
        )
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    seq = torch.tensor([prompt], dtype=torch.long, device=device)
    cache = KVCache(model, 1) if use_cache else None
    new: list[int] = []
    step_input = seq
    while len(new) < max_new_tokens and seq.shape[1] < cfg.max_seq_len:
        logits = model(step_input, cache=cache) if cache else model(seq)
        last = logits[0, -1]
        if allowed_vocab is not None and allowed_vocab < last.shape[-1]:
            last = last.clone()
            last[allowed_vocab:] = float("-inf")
        probs = filtered_probs(last, temperature=temperature, top_k=top_k, top_p=top_p)
        if temperature == 0:
            nxt = int(probs.argmax())
        else:
            nxt = int(torch.multinomial(probs, 1, generator=gen))
        new.append(nxt)
        if on_token is not None:
            on_token(nxt)
        step_input = torch.tensor([[nxt]], dtype=torch.long, device=device)
        seq = torch.cat([seq, step_input], dim=1)
    return new


# ----------------------------------------------------------------------------------------------
# Streaming text


class TextStream:
    """Turns token ids into text pieces as they come, never splitting a UTF-8 character.

    Byte-level: an incremental UTF-8 decoder holds back a partial multi-byte sequence until it is
    complete (invalid bytes become U+FFFD). Other tokenizers: the decoded text of all ids so far,
    emitted past what was already emitted, holding back a trailing U+FFFD (an unfinished character).
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""
        self._bytes = (
            codecs.getincrementaldecoder("utf-8")(errors="replace") if tokenizer.kind == "byte" else None
        )

    def push(self, token: int) -> str:
        if self._bytes is not None:
            return self._bytes.decode(bytes([token]))
        self.ids.append(token)
        stable = self.tokenizer.decode(self.ids).rstrip("\ufffd")
        if not stable.startswith(self.emitted):  # the decoder rewrote earlier text: wait for more
            return ""
        piece, self.emitted = stable[len(self.emitted) :], stable
        return piece

    def finish(self) -> str:
        if self._bytes is not None:
            return self._bytes.decode(b"", final=True)
        text = self.tokenizer.decode(self.ids)
        return text[len(self.emitted) :] if text.startswith(self.emitted) else ""


# ----------------------------------------------------------------------------------------------
# The verb


@dataclass
class Generation:
    prompt_ids: list[int]
    new_ids: list[int]
    text: str
    """The generated continuation (without the prompt)."""
    seconds: float


def generate(
    run_dir: str,
    prompt: str,
    *,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    device: str = "cpu",
    config: str | None = None,
    overrides: list[str] = (),
    write: Callable[[str], None] | None = None,
    echo_prompt: bool = False,
) -> Generation:
    """Load RUN's latest checkpoint and continue ``prompt``; ``write`` receives the text as it comes
    (preceded by the prompt itself when ``echo_prompt``)."""
    from mupfast.export import load_run, run_tokenizer

    check_sampling_args(temperature, top_k, top_p, max_new_tokens)
    loaded = load_run(run_dir, config=config, overrides=overrides, device=device)
    tokenizer = run_tokenizer(loaded.cfg, loaded.run_dir)
    prompt_ids = tokenizer.encode(prompt)
    stream = TextStream(tokenizer)
    pieces: list[str] = []
    if echo_prompt and write is not None:
        write(prompt)

    def on_token(t: int) -> None:
        piece = stream.push(t)
        if piece:
            pieces.append(piece)
            if write is not None:
                write(piece)

    t0 = time.perf_counter()
    new = generate_ids(
        loaded.model,
        prompt_ids,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        allowed_vocab=tokenizer.vocab_size,
        on_token=on_token,
    )
    tail = stream.finish()
    if tail:
        pieces.append(tail)
        if write is not None:
            write(tail)
    return Generation(prompt_ids, new, "".join(pieces), time.perf_counter() - t0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # generate reads RUN/config.yaml; --config (optional) replaces it, overrides apply on top.
    parser.add_argument("--run", help="run directory (config.yaml + checkpoints/)")
    parser.add_argument("--prompt", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="default %(default)s")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default %(default)s)")
    parser.add_argument(
        "--top-k", type=int, default=0, help="keep the k most likely tokens; 0: off (default)"
    )
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1: off (default)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default %(default)s)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")


def run(args: argparse.Namespace) -> int:
    """The ``generate`` verb: prints the prompt, then the continuation as it is sampled."""
    if not args.run:
        raise ConfigError("generate: --run DIR is required")
    if args.prompt is None:
        raise ConfigError("generate: --prompt TEXT is required")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    # Check the flags before loading anything (a bad flag is a one-line error, not a slow one).
    check_sampling_args(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
    out = generate(
        args.run,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        device=device,
        config=args.config,
        overrides=args.overrides,
        write=write,
        echo_prompt=True,
    )
    write("\n")
    n = len(out.new_ids)
    print(f"[{n} tokens in {out.seconds:.2f} s, {n / max(out.seconds, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return 0
