"""`mupfast generate`: a KV cache that equals full recomputation, and each sampling control's effect."""

from __future__ import annotations

import math

import pytest
import torch

from mupfast.cli import main
from mupfast.data.tokenizer import BPETokenizer, ByteTokenizer
from mupfast.export.generate import TextStream, filtered_probs, generate_ids
from mupfast.model import KVCache, build_model
from tests.helpers import tiny_config
from tests.test_export import GPT2, LLAMA, MUP, make_run, width

ARCHS = {
    "rope-gqa": [*LLAMA, *width(64), "model.num_kv_heads=2", "model.mup_base_num_kv_heads=1"],
    "learned-completep": [
        *GPT2,
        *width(64),
        "model.parametrization=completep",
        "model.mup_base_num_layers=1",
    ],
}


@pytest.fixture(scope="module", params=list(ARCHS))
def model(request):
    cfg = tiny_config(*MUP, *ARCHS[request.param])
    torch.manual_seed(0)
    return build_model(cfg.model).eval()


@pytest.fixture(scope="module")
def rope_model():
    cfg = tiny_config(*MUP, *ARCHS["rope-gqa"])
    torch.manual_seed(0)
    return build_model(cfg.model).eval()


def tokens(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (2, n), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# KV cache


@torch.no_grad()
def test_kv_cache_logits_equal_full_recompute(model):
    seq = tokens(model.cfg.max_seq_len)
    full = model(seq)
    cache = KVCache(model, batch=2)
    # Prefill in two chunks (the second attends to the first through the cache), then one at a time.
    got = [model(seq[:, :5], cache=cache), model(seq[:, 5:9], cache=cache)]
    got += [model(seq[:, t : t + 1], cache=cache) for t in range(9, seq.shape[1])]
    torch.testing.assert_close(torch.cat(got, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == model.cfg.max_seq_len
    with pytest.raises(ValueError, match="max_seq_len"):
        model(seq[:, :1], cache=cache)


@torch.no_grad()
def test_greedy_is_the_argmax_of_full_recompute_at_every_step(model):
    prompt = tokens(4)[0].tolist()
    got = generate_ids(model, prompt, max_new_tokens=12, temperature=0)
    seq = list(prompt)
    for _ in range(12):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert got == seq[len(prompt) :]


def test_cached_and_uncached_sampling_draw_the_same_tokens(model):
    kw = dict(max_new_tokens=16, temperature=1.0, seed=3)
    prompt = tokens(3)[0].tolist()
    assert generate_ids(model, prompt, **kw) == generate_ids(model, prompt, **kw, use_cache=False)


# ----------------------------------------------------------------------------------------------
# Sampling controls, end to end


def test_same_seed_gives_the_same_tokens_and_another_seed_others(rope_model):
    kw = dict(max_new_tokens=24, temperature=1.5)
    a, b, c = (generate_ids(rope_model, [65, 66], seed=s, **kw) for s in (7, 7, 8))
    assert a == b
    assert a != c  # 24 draws over 256 ids all agreeing: ~impossible


def test_top_k_1_and_a_tiny_top_p_are_greedy(rope_model):
    greedy = generate_ids(rope_model, [1, 2, 3], max_new_tokens=10, temperature=0)
    for seed in (0, 1):
        kw = dict(max_new_tokens=10, temperature=1.3, seed=seed)
        assert generate_ids(rope_model, [1, 2, 3], top_k=1, **kw) == greedy
        assert generate_ids(rope_model, [1, 2, 3], top_p=1e-6, **kw) == greedy


def test_top_k_limits_every_draw_to_the_k_most_likely(rope_model):
    seen: list[tuple[int, list[int]]] = []
    prompt = [10, 20, 30]
    new = generate_ids(rope_model, prompt, max_new_tokens=10, temperature=2.0, top_k=3, seed=0)
    seq = list(prompt)
    with torch.no_grad():
        for t in new:
            seen.append((t, rope_model(torch.tensor([seq]))[0, -1].topk(3).indices.tolist()))
            seq.append(t)
    assert all(t in top for t, top in seen)


def test_generation_stops_at_max_seq_len_and_respects_the_tokenizer_vocab():
    cfg = tiny_config(*LLAMA, "model.vocab_size=300")
    model = build_model(cfg.model).eval()
    prompt = list(range(cfg.model.max_seq_len - 3))
    new = generate_ids(model, prompt, max_new_tokens=50, temperature=5.0, allowed_vocab=256)
    assert len(new) == 3 and all(t < 256 for t in new)
    assert generate_ids(model, prompt, max_new_tokens=0) == []


# ----------------------------------------------------------------------------------------------
# The filtered distribution, on known logits


def test_temperature_divides_the_logits_and_zero_is_the_argmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    for t in (0.5, 1.0, 2.0):
        torch.testing.assert_close(filtered_probs(logits, temperature=t), (logits / t).softmax(-1))
    entropy = [(-(p := filtered_probs(logits, temperature=t)) * p.log()).sum() for t in (0.5, 1.0, 2.0)]
    assert entropy[0] < entropy[1] < entropy[2]  # hotter is flatter
    assert filtered_probs(logits, temperature=0).tolist() == [1.0, 0.0, 0.0, 0.0]


def test_top_k_keeps_the_k_largest_renormalised():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0])
    p = filtered_probs(logits, top_k=2)
    assert p[0] == 0 and p[2] == 0
    torch.testing.assert_close(p[[1, 3]], torch.tensor([3.0, 2.0]).softmax(-1))
    torch.testing.assert_close(filtered_probs(logits, top_k=0), logits.softmax(-1))  # 0: off
    torch.testing.assert_close(filtered_probs(logits, top_k=10), logits.softmax(-1))


def test_top_p_keeps_the_smallest_head_reaching_p():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 0.5, 0.3, 0.15, 0.05
    logits = probs.log()
    kept = {
        p: (filtered_probs(logits, top_p=p) > 0).nonzero().flatten().tolist()
        for p in (0.3, 0.5, 0.6, 0.79, 0.81, 0.96)
    }
    assert kept == {0.3: [1], 0.5: [1], 0.6: [1, 3], 0.79: [1, 3], 0.81: [1, 2, 3], 0.96: [0, 1, 2, 3]}
    torch.testing.assert_close(filtered_probs(logits, top_p=0.6)[[1, 3]], torch.tensor([0.5, 0.3]) / 0.8)
    torch.testing.assert_close(filtered_probs(logits, top_p=1.0), probs)


def test_controls_apply_in_order_temperature_top_k_top_p_on_a_batch():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 10.0]])
    p = filtered_probs(logits, temperature=2.0, top_k=3, top_p=0.6)
    # row 0 at T=2 over the top 3: softmax([2, 1.5, 1]) = .506, .307, .186 → top-p .6 keeps two
    torch.testing.assert_close(p[0, :2], torch.tensor([2.0, 1.5]).softmax(-1))
    assert p[0, 2:].sum() == 0
    assert p[1].tolist() == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert torch.allclose(p.sum(-1), torch.ones(2))


# ----------------------------------------------------------------------------------------------
# Streaming


def test_byte_stream_emits_only_complete_utf8_characters():
    text = "a€🙂b"
    stream = TextStream(ByteTokenizer())
    pieces = [stream.push(b) for b in text.encode("utf-8")]
    assert pieces == ["a", "", "", "€", "", "", "", "🙂", "b"]
    assert stream.finish() == ""
    broken = TextStream(ByteTokenizer())
    out = [broken.push(b) for b in b"x\xe2\x82"]  # an unfinished €: held back, then replaced at the end
    assert "".join(out) == "x" and broken.finish() == "\ufffd"


def test_bpe_stream_joins_to_the_full_decode_without_half_characters():
    tok = BPETokenizer.train(["héllo wörld €uro 🙂 smile " * 20], vocab_size=280)
    ids = tok.encode("wörld 🙂 €uro héllo")
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids]
    assert "".join(pieces) + stream.finish() == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


# ----------------------------------------------------------------------------------------------
# The verb


def test_cli_streams_a_seeded_continuation_of_the_prompt(tmp_path, capsys):
    _, run_dir, _ = make_run(tmp_path, *MUP, *LLAMA, *width(64))

    def gen(*flags: str) -> str:
        argv = ["generate", "--run", str(run_dir), "--prompt", "déf", "--max-new-tokens", "12", *flags]
        assert main(argv) == 0
        captured = capsys.readouterr()
        assert "tokens/s" in captured.err
        return captured.out

    a, b, c = gen("--seed", "1"), gen("--seed", "1"), gen("--seed", "2")
    assert a.startswith("déf") and a == b and a != c
    greedy = gen("--temperature", "0")
    assert greedy == gen("--temperature", "0", "--seed", "9") == gen("--top-k", "1", "--seed", "4")


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--temperature", "-1"], "--temperature"),
        (["--top-k", "-2"], "--top-k"),
        (["--top-p", "0"], "--top-p"),
        (["--top-p", "1.5"], "--top-p"),
        (["--max-new-tokens", "-1"], "--max-new-tokens"),
        (["--prompt", ""], "--prompt: empty"),
        (["--prompt", "x" * 40], "longer than model.max_seq_len"),
    ],
)
def test_bad_generation_flags_are_one_line_errors(tmp_path, capsys, flags, message):
    _, run_dir, _ = make_run(tmp_path, *LLAMA)
    assert main(["generate", "--run", str(run_dir), "--prompt", "hi", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_missing_run_is_a_one_line_error(tmp_path, capsys):
    assert main(["generate", "--run", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    assert capsys.readouterr().err.strip() == f"error: --run: run directory not found: {tmp_path / 'nope'}"


def test_entropy_of_the_flat_sampler_is_near_uniform():
    """top_k=1 is greedy and temperature→∞ is uniform: the two ends of the temperature dial."""
    logits = torch.randn(256, generator=torch.Generator().manual_seed(0))
    p = filtered_probs(logits, temperature=1e6)
    assert abs(float(-(p * p.log()).sum()) - math.log(256)) < 1e-3
