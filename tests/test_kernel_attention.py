"""mup_attention against a float64 reference: output, log-sum-exp and dq/dk/dv, by ‖out − ref‖/‖ref‖.

CPU runs go through the Triton interpreter (fp32, fp16, small T); bf16, D = 128/256 and long T need a GPU,
where torch's SDPA at the same precision is the oracle: ours may err at most 2× what SDPA errs (+ slack).
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

from mupfast.kernels import attention as attention_module
from mupfast.kernels.attention import attention_reference, mup_attention, skipped_tiles
from mupfast.kernels.runtime import triton_usable

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    not triton_usable(torch.empty(0, device=DEVICE)), reason="Triton needs CUDA or TRITON_INTERPRET=1"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# fp32: the kernel accumulates in fp32 like the reference would, so it agrees to ~1e-7..1e-6 (measured).
# fp16: P and dS are rounded to fp16 (unit roundoff 2⁻¹¹ ≈ 4.9e-4) before their dots and the results are
# stored in fp16; measured errors are 2e-4..7e-4, so 5e-3 (≈10 ulps) leaves headroom while a wrong mask,
# scale or stage boundary gives errors of 1e-2 and more.
TOL = {torch.float32: 1e-5, torch.float16: 5e-3}


def _inputs(B, Hq, Hkv, T, D, dtype, *, q_mag=1.0, device=DEVICE, key=""):
    """Fresh normal inputs (never zeros), seeded per case so failures reproduce."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{B},{Hq},{Hkv},{T},{D},{dtype},{q_mag},{key}".encode()))
    q = torch.randn(B, Hq, T, D, generator=g) * q_mag
    k, v = (torch.randn(B, Hkv, T, D, generator=g) for _ in range(2))
    do = torch.randn(B, Hq, T, D, generator=g)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, do)]


def _fwd_bwd(fn, q, k, v, do, **kw):
    """o, lse, dq, dk, dv of ``fn`` on leaf copies of q, k, v."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o, lse = fn(q, k, v, return_lse=True, **kw)
    o.backward(do)
    return o.detach(), lse, q.grad, k.grad, v.grad


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖/‖ref‖ (absolute when ref is exactly zero, e.g. dq at T = 1)."""
    diff, norm = (out.double() - ref.double()).norm(), ref.double().norm()
    return (diff / norm).item() if norm > 0 else diff.item()


def _check_against_float64(B, Hq, Hkv, T, D, dtype, causal, scale_mult=1.0, q_mag=1.0):
    q, k, v, do = _inputs(B, Hq, Hkv, T, D, dtype, q_mag=q_mag, key=str(causal))
    kw = {"scale": scale_mult / D, "causal": causal}
    ours = _fwd_bwd(mup_attention, q, k, v, do, **kw)
    ref = _fwd_bwd(attention_reference, *(t.double() for t in (q, k, v, do)), **kw)
    assert ours[0].dtype == dtype and ours[0].shape == q.shape
    assert ours[1].dtype == torch.float32 and ours[1].shape == (B, Hq, T) and not ours[1].requires_grad
    errors = {name: _rel(a, b) for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), ours, ref)}
    assert all(e <= TOL[dtype] for e in errors.values()), errors


SHAPES = [  # (B, Hq, Hkv, T, D): T = 1, ragged tails around the 64/32 blocks, one exact multiple
    (1, 2, 2, 1, 32),
    (2, 2, 2, 17, 32),
    (1, 4, 2, 67, 64),  # GQA
    (1, 4, 1, 130, 80),  # MQA, D padded to 128
    (1, 2, 2, 128, 64),  # whole blocks only
]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-Hq{}-Hkv{}-T{}-D{}".format(*s))
def test_fp32_matches_float64_reference(shape, causal):
    _check_against_float64(*shape, torch.float32, causal)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", [(2, 2, 2, 67, 32), (1, 4, 2, 130, 64)], ids=["T67-D32", "gqa-T130-D64"])
def test_fp16_matches_float64_reference(shape, causal):
    _check_against_float64(*shape, torch.float16, causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_large_mup_scale_and_large_queries(dtype, causal):
    """α = 16 with |q| ≈ 4 makes the softmax peaky: the online max and the LSE must carry it."""
    _check_against_float64(1, 4, 2, 130, 64, dtype, causal, scale_mult=16.0, q_mag=4.0)


def test_lse_is_logsumexp_of_scaled_masked_scores():
    q, k, v, _ = _inputs(1, 2, 2, 67, 32, torch.float32)
    o, lse = mup_attention(q, k, v, scale=0.5 / 32, causal=True, return_lse=True)
    s = (q.double() @ k.double().transpose(-1, -2)) * (0.5 / 32)
    s = s.masked_fill(~torch.ones(67, 67, dtype=torch.bool).tril(), float("-inf"))
    assert _rel(lse, torch.logsumexp(s, -1)) < 1e-6
    plain = mup_attention(q, k, v, scale=0.5 / 32, causal=True)
    assert isinstance(plain, torch.Tensor) and torch.equal(plain, o)


def test_backward_is_deterministic():
    """No atomics: dK/dV loops over the query heads of its kv head, dQ has its own pass."""
    q, k, v, do = _inputs(1, 4, 1, 130, 64, torch.float32)
    first = _fwd_bwd(mup_attention, q, k, v, do, scale=1 / 64, causal=True)
    second = _fwd_bwd(mup_attention, q, k, v, do, scale=1 / 64, causal=True)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_dkdv_tuning_is_cached_per_gqa_group():
    """A dK/dV program does GROUP heads' work, so MHA and GQA 4 of one shape must not share a tile."""
    from mupfast.kernels.attention import _attn_bwd_dkdv, _attn_fwd

    assert "GROUP" in _attn_bwd_dkdv.keys
    assert set(_attn_fwd.keys) <= set(_attn_bwd_dkdv.keys)


def test_bthd_layout_views_give_the_same_result():
    """(B, T, H, D) tensors viewed as (B, H, T, D) — how a model splits heads — run without copies."""
    q, k, v, do = _inputs(1, 4, 2, 67, 32, torch.float32)
    views = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v, do)]
    assert not views[0].is_contiguous()
    ours = _fwd_bwd(mup_attention, *views, scale=1 / 32, causal=True)
    dense = _fwd_bwd(mup_attention, q, k, v, do, scale=1 / 32, causal=True)
    assert all(_rel(a, b) < 1e-6 for a, b in zip(ours, dense))


def test_reference_matches_sdpa_with_gqa():
    q, k, v, _ = _inputs(2, 4, 2, 33, 16, torch.float64, device="cpu")
    for causal in (True, False):
        ref = attention_reference(q, k, v, scale=0.3, causal=causal)
        sdpa = F.scaled_dot_product_attention(q, k, v, scale=0.3, is_causal=causal, enable_gqa=True)
        assert _rel(ref, sdpa) < 1e-12


def _bad(**changes):
    t = {"q": (1, 4, 8, 32), "k": (1, 2, 8, 32), "v": (1, 2, 8, 32)}
    dtypes = {n: changes.pop(f"{n}_dtype", torch.float32) for n in t}
    devices = {n: changes.pop(f"{n}_device", DEVICE) for n in t}
    t.update(changes)
    return {n: torch.randn(s, dtype=dtypes[n], device=devices[n]) for n, s in t.items()}


@pytest.mark.parametrize(
    ("args", "scale", "match"),
    [
        (_bad(q=(4, 8, 32)), 0.1, "4-D"),
        (_bad(v=(1, 2, 8, 16)), 0.1, "same shape"),
        (_bad(k=(1, 2, 9, 32), v=(1, 2, 9, 32)), 0.1, "agree on B, T and D"),
        (_bad(k=(1, 3, 8, 32), v=(1, 3, 8, 32)), 0.1, "multiple of kv heads"),
        (_bad(q=(1, 4, 8, 512), k=(1, 2, 8, 512), v=(1, 2, 8, 512)), 0.1, "at most 256"),
        (_bad(k_dtype=torch.float16), 0.1, "share a dtype"),
        (_bad(q_dtype=torch.float64, k_dtype=torch.float64, v_dtype=torch.float64), 0.1, "dtype must be"),
        (_bad(k_device="meta"), 0.1, "one device"),
        (_bad(q_device="meta", k_device="meta", v_device="meta"), 0.1, "attention_reference"),
        (_bad(), float("nan"), "finite"),
    ],
    ids=[
        "3d",
        "kv-shape",
        "seq-len",
        "heads",
        "head-dim",
        "dtype-mix",
        "float64",
        "device-mix",
        "meta",
        "nan",
    ],
)
def test_invalid_inputs_raise_clear_errors(args, scale, match):
    with pytest.raises(ValueError, match=match):
        mup_attention(args["q"], args["k"], args["v"], scale=scale)


# ---------------------------------------------------------------------------------- document masking ----
def _runs(row: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of equal consecutive ids, found independently of the module."""
    spans, start = [], 0
    for t in range(1, len(row) + 1):
        if t == len(row) or row[t] != row[t - 1]:
            spans.append((start, t))
            start = t
    return spans


def _per_document(q, k, v, *, scale, doc_ids, return_lse=True):
    """The oracle: the plain causal reference run on each document's slice alone, concatenated."""
    o_rows, lse_rows = [], []
    for b in range(q.shape[0]):
        parts = [
            attention_reference(*(t[b : b + 1, :, s:e] for t in (q, k, v)), scale=scale, return_lse=True)
            for s, e in _runs(doc_ids[b].tolist())
        ]
        o_rows.append(torch.cat([o for o, _ in parts], 2))
        lse_rows.append(torch.cat([lse for _, lse in parts], 2))
    o, lse = torch.cat(o_rows), torch.cat(lse_rows)
    return (o, lse) if return_lse else o


def _doc_ids(rows: list[list[int]]) -> torch.Tensor:
    """(B, T) ids from per-row document lengths; ids restart at 0 in every row."""
    return torch.tensor([[i for i, n in enumerate(lengths) for _ in range(n)] for lengths in rows])


def _random_lengths(T: int, seed: int) -> list[int]:
    """Random document lengths summing to T, about a third of them length 1."""
    g, out = torch.Generator().manual_seed(seed), []
    while sum(out) < T:
        n = 1 if torch.rand(1, generator=g).item() < 0.35 else int(torch.randint(2, 48, (1,), generator=g))
        out.append(min(n, T - sum(out)))
    return out


DOC_CASES = {  # name: (B, Hq, Hkv, T, D, per-row document lengths); blocks are 64/32 under the interpreter
    # length-1 documents, a document spanning the whole row, and two long ones, with GQA
    "gqa-T67-D32": (3, 4, 2, 67, 32, [[1, 5, 1, 30, 20, 1, 9], [67], [40, 27]]),
    # a document start inside the first key block leaves an unmasked middle in the forward / dQ (row 0) and
    # a long first document an unmasked query range in dK/dV (row 1)
    "T130-D64": (2, 2, 2, 130, 64, [[10, 120], [100, 30]]),
    # boundaries on block edges: whole tiles skipped, none straddling
    "aligned-T130-D32": (1, 2, 1, 130, 32, [[32, 32, 64, 1, 1]]),
    "mqa-random-T100-D16": (2, 4, 1, 100, 16, [_random_lengths(100, 1), _random_lengths(100, 2)]),
}


def _check_docs(B, Hq, Hkv, T, D, rows, dtype):
    q, k, v, do = _inputs(B, Hq, Hkv, T, D, dtype, key=f"docs{rows}")
    doc_ids = _doc_ids(rows).to(DEVICE)
    assert doc_ids.shape == (B, T)
    ours = _fwd_bwd(mup_attention, q, k, v, do, scale=2.0 / D, doc_ids=doc_ids)
    ref = _fwd_bwd(_per_document, *(t.double() for t in (q, k, v, do)), scale=2.0 / D, doc_ids=doc_ids)
    assert ours[0].dtype == dtype and ours[1].shape == (B, Hq, T) and not ours[1].requires_grad
    errors = {name: _rel(a, b) for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), ours, ref)}
    assert all(e <= TOL[dtype] for e in errors.values()), errors


@pytest.mark.parametrize("case", list(DOC_CASES))
def test_doc_masking_fp32_matches_per_document_reference(case):
    _check_docs(*DOC_CASES[case], torch.float32)


@pytest.mark.parametrize("case", ["gqa-T67-D32", "T130-D64"])
def test_doc_masking_fp16_matches_per_document_reference(case):
    _check_docs(*DOC_CASES[case], torch.float16)


def _chosen_configs() -> list[str]:
    kernels = (attention_module._attn_fwd, attention_module._attn_bwd_dkdv, attention_module._attn_bwd_dq)
    return [str(kernel.best_config) for kernel in kernels]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_one_document_per_row_is_bitwise_the_causal_kernel(dtype):
    q, k, v, do = _inputs(2, 4, 2, 130, 32, dtype, key="one-doc")
    plain = _fwd_bwd(mup_attention, q, k, v, do, scale=1 / 32)
    plain_configs = _chosen_configs()
    doc_ids = torch.tensor([[7] * 130, [-3] * 130], device=DEVICE)
    docs = _fwd_bwd(mup_attention, q, k, v, do, scale=1 / 32, doc_ids=doc_ids)
    if _chosen_configs() == plain_configs:  # always under the interpreter (one config)
        assert all(torch.equal(a, b) for a, b in zip(docs, plain))
    else:  # GPU autotuning may pick other blocks for the DOC key: same math, other summation order
        assert all(_rel(a, b) <= TOL[dtype] for a, b in zip(docs, plain))


def test_doc_ids_are_runs_not_labels():
    """[0…0, 1, 0…0] is three documents: only where the ids change matters."""
    q, k, v, do = _inputs(1, 2, 1, 67, 16, torch.float32, key="runs")
    repeated = torch.tensor([[0] * 20 + [1] + [0] * 46], device=DEVICE)
    relabelled = torch.tensor([[5] * 20 + [9] + [2] * 46], device=DEVICE)
    ours = _fwd_bwd(mup_attention, q, k, v, do, scale=1 / 16, doc_ids=repeated)
    assert all(
        torch.equal(a, b)
        for a, b in zip(ours, _fwd_bwd(mup_attention, q, k, v, do, scale=1 / 16, doc_ids=relabelled))
    )
    ref = _fwd_bwd(_per_document, *(t.double() for t in (q, k, v, do)), scale=1 / 16, doc_ids=relabelled)
    assert len(_runs(relabelled[0].tolist())) == 3
    assert all(_rel(a, b) <= TOL[torch.float32] for a, b in zip(ours, ref))


def test_reference_with_doc_ids_is_the_per_document_reference():
    rows = [[1, 5, 1, 10, 16], [33], [2, 2, 29]]
    q, k, v, do = _inputs(3, 4, 2, 33, 16, torch.float64, device="cpu", key="ref-docs")
    doc_ids = _doc_ids(rows)
    dense = _fwd_bwd(attention_reference, q, k, v, do, scale=0.3, doc_ids=doc_ids)
    split = _fwd_bwd(_per_document, q, k, v, do, scale=0.3, doc_ids=doc_ids)
    errors = [_rel(a, b) for a, b in zip(dense, split)]
    assert errors[1] < 1e-6 and max(errors[:1] + errors[2:]) < 1e-12, errors  # lse is returned as float32
    one_doc = torch.zeros(3, 33, dtype=torch.long)
    whole = _fwd_bwd(attention_reference, q, k, v, do, scale=0.3, doc_ids=one_doc)
    plain = _fwd_bwd(attention_reference, q, k, v, do, scale=0.3)
    assert all(torch.equal(a, b) for a, b in zip(whole, plain))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, on the NaN tiles the interpreter runs
def test_tiles_outside_the_documents_are_never_loaded():
    """NaN in one document poisons any tile that loads it (0·NaN = NaN even where masked), so finite, correct
    results for the other document show its tiles were skipped. Documents of 128 fit every config's blocks."""
    T, half = 256, slice(128, 256)
    q, k, v, do = _inputs(1, 2, 1, T, 16, torch.float32, key="nan")
    doc_ids = _doc_ids([[128, 128]]).to(DEVICE)
    ref = _fwd_bwd(_per_document, *(t.double() for t in (q, k, v, do)), scale=1 / 16, doc_ids=doc_ids)
    # forward and dQ of the second document must skip the first document's keys
    k1, v1 = k.clone(), v.clone()
    k1[:, :, :128], v1[:, :, :128] = float("nan"), float("nan")
    o, lse, dq, _, _ = _fwd_bwd(mup_attention, q, k1, v1, do, scale=1 / 16, doc_ids=doc_ids)
    for out, want in ((o, ref[0]), (lse, ref[1]), (dq, ref[2])):
        assert _rel(out[:, :, half], want[:, :, half]) <= 1e-5
    # dK/dV of the first document must skip the second document's queries
    q2, do2 = q.clone(), do.clone()
    q2[:, :, half], do2[:, :, half] = float("nan"), float("nan")
    _, _, _, dk, dv = _fwd_bwd(mup_attention, q2, k, v, do2, scale=1 / 16, doc_ids=doc_ids)
    for out, want in ((dk, ref[3]), (dv, ref[4])):
        assert _rel(out[:, :, :128], want[:, :, :128]) <= 1e-5


def test_backward_with_doc_ids_is_deterministic():
    q, k, v, do = _inputs(1, 4, 1, 130, 64, torch.float32, key="det-docs")
    doc_ids = _doc_ids([[1, 40, 1, 88]]).to(DEVICE)
    first = _fwd_bwd(mup_attention, q, k, v, do, scale=1 / 64, doc_ids=doc_ids)
    second = _fwd_bwd(mup_attention, q, k, v, do, scale=1 / 64, doc_ids=doc_ids)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_skipped_tiles_counts_the_causal_tiles_left_of_each_query_blocks_document():
    docs_of_32 = _doc_ids([[32] * 4])
    assert skipped_tiles(docs_of_32, 32, 32) == (6, 10)  # every off-diagonal causal tile: 1 + 2 + 3 of 10
    assert skipped_tiles(docs_of_32, 64, 32) == (2, 6)  # [0, 32) for the block [64, 128) only
    assert skipped_tiles(_doc_ids([[128]]), 32, 32) == (0, 10)
    assert skipped_tiles(torch.arange(128)[None], 32, 32) == (6, 10)  # length-1 documents
    assert skipped_tiles(_doc_ids([[64, 3], [67]]), 64, 32) == (2, 10)  # ragged T = 67: 2 + 3 tiles a row
    with pytest.raises(ValueError, match="multiple of block_n"):
        skipped_tiles(docs_of_32, 48, 32)


@pytest.mark.parametrize(
    ("doc_ids", "causal", "match"),
    [
        (torch.zeros(1, 8, dtype=torch.long), False, "causal=True"),
        (torch.zeros(1, 9, dtype=torch.long), True, r"\(B, T\)"),
        (torch.zeros(8, dtype=torch.long), True, r"\(B, T\)"),
        (torch.zeros(1, 8), True, "integer"),
        (torch.zeros(1, 8, dtype=torch.bool), True, "integer"),
        (torch.zeros(1, 8, dtype=torch.long, device="meta"), True, "q's device"),
    ],
    ids=["not-causal", "seq-len", "1d", "float", "bool", "device"],
)
def test_invalid_doc_ids_raise(doc_ids, causal, match):
    args = _bad()
    doc_ids = doc_ids if doc_ids.device.type == "meta" else doc_ids.to(DEVICE)
    with pytest.raises(ValueError, match=match):
        mup_attention(args["q"], args["k"], args["v"], scale=0.1, causal=causal, doc_ids=doc_ids)
    with pytest.raises(ValueError, match=match):
        attention_reference(args["q"], args["k"], args["v"], scale=0.1, causal=causal, doc_ids=doc_ids)


# ------------------------------------------------------------------------------------------ GPU only ----
GPU_SHAPES = [  # (B, Hq, Hkv, T, D)
    (2, 8, 2, 1024, 128),
    (1, 4, 4, 2047, 256),
    (1, 8, 1, 4095, 64),
    (1, 4, 4, 8192, 128),
    (2, 4, 2, 1000, 96),
]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "B{}-Hq{}-Hkv{}-T{}-D{}".format(*s))
def test_gpu_within_twice_the_error_of_sdpa(shape, dtype, causal):
    """FlashAttention's test rule with SDPA(scale=α/d) at the same precision as the oracle."""
    B, Hq, Hkv, T, D = shape
    q, k, v, do = _inputs(B, Hq, Hkv, T, D, dtype, q_mag=2.0, key=str(causal))
    kw = {"scale": 4.0 / D, "causal": causal}

    def sdpa(q, k, v, *, scale, causal, return_lse):
        o = F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=causal, enable_gqa=True)
        return o, None

    ref = _fwd_bwd(attention_reference, *(t.double() for t in (q, k, v, do)), **kw)
    ours = _fwd_bwd(mup_attention, q, k, v, do, **kw)
    peer = _fwd_bwd(sdpa, q, k, v, do, **kw)
    assert _rel(ours[1], ref[1]) < 1e-5
    for name, i in (("o", 0), ("dq", 2), ("dk", 3), ("dv", 4)):
        e_ours, e_peer = _rel(ours[i], ref[i]), _rel(peer[i], ref[i])
        assert e_ours <= 2 * e_peer + 1e-3, (name, e_ours, e_peer)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("D", [128, 256])
def test_gpu_fp32_is_not_tf32(D):
    """fp32 inputs use IEEE dots, so they keep fp32 accuracy on tensor-core GPUs (TF32 would err by ~1e-3)."""
    _check_against_float64(1, 4, 2, 777, D, torch.float32, True)
