"""Packed documents end to end: document ids and positions from the EOS in a row, attention that stops
at document boundaries and positions that restart, so that a packed row trains exactly like its
documents one per row; and the trainer with document masking, resumed bitwise."""

from __future__ import annotations

import pytest
import torch

from mupfast.data.packing import document_ids, position_ids
from mupfast.model import build_model
from mupfast.model.indicators import attention_lse
from tests.helpers import assert_resume_is_bitwise, tiny_config

EOS = 0


def _triton_runs() -> bool:
    from mupfast.kernels.runtime import triton_usable

    return triton_usable(torch.empty(0))


BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not _triton_runs(), reason="no Triton"))]


def test_document_ids_and_positions_come_from_the_eos_that_ends_each_document():
    x = torch.tensor([[5, 6, EOS, 7, EOS, EOS, 8, 9], [1, 2, 3, 4, 5, 6, 7, EOS]])
    assert document_ids(x, EOS).tolist() == [[0, 0, 0, 1, 1, 2, 3, 3], [0] * 8]
    assert position_ids(document_ids(x, EOS)).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))]
    assert (
        document_ids(x, EOS).dtype == torch.int32 and position_ids(document_ids(x, EOS)).dtype == torch.int64
    )


def _packed(a: torch.Tensor, b: torch.Tensor):
    """Two documents (each ending with EOS) packed in one row, with their document ids and positions."""
    row = torch.cat([a, b])[None]
    docs = document_ids(row, EOS)
    return row, docs, position_ids(docs)


def _docs(vocab: int, lengths=(13, 18), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        d = torch.randint(1, vocab, (n,), generator=g)
        d[-1] = EOS
        out.append(d)
    return out


@pytest.mark.parametrize("position", ["rope", "learned"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_document_packed_after_another_has_the_logits_it_has_alone(position, backend):
    cfg = tiny_config(f"model.position={position}", f"model.attention_backend={backend}").model
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    a, b = _docs(cfg.vocab_size)
    row, docs, pos = _packed(a, b)
    with torch.no_grad():
        packed = model(row, doc_ids=docs, position_ids=pos)
        alone_a, alone_b = model(a[None]), model(b[None])
        unmasked = model(row)  # no mask, no reset: b sees a, and sits at other positions
    torch.testing.assert_close(packed[:, : len(a)], alone_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[:, len(a) :], alone_b, rtol=1e-5, atol=1e-5)
    assert (unmasked[:, len(a) :] - alone_b).abs().max() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_documents_packed_in_a_row_train_like_each_alone(backend):
    """Sum of token losses and every gradient: the packed row equals its documents in rows of their own
    (the target across the boundary, which the separate rows do not have, left out)."""
    cfg = tiny_config(f"model.attention_backend={backend}").model
    a, b = _docs(cfg.vocab_size, lengths=(11, 20), seed=1)
    torch.manual_seed(0)
    model = build_model(cfg)

    def summed_loss(tokens, targets, **kw):
        n = int((targets != -100).sum())
        return model(tokens, targets, **kw) * n

    row, docs, pos = _packed(a, b)
    targets = torch.cat([a[1:], torch.tensor([-100]), b[1:], torch.tensor([-100])])[None]
    model.zero_grad()
    packed = summed_loss(row, targets, doc_ids=docs, position_ids=pos)
    packed.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    alone = sum(summed_loss(d[None, :-1], d[None, 1:]) for d in (a, b))
    alone.backward()
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_attention_z_counts_only_keys_of_the_querys_document():
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 12, 8, dtype=torch.float64), torch.randn(2, 2, 12, 8, dtype=torch.float64)
    docs = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    got = attention_lse(q, k, 0.3, doc_ids=docs)
    kk = k.repeat_interleave(2, dim=1)
    for b in range(2):
        for t in range(12):
            keys = [s for s in range(t + 1) if docs[b, s] == docs[b, t]]
            want = torch.logsumexp(0.3 * torch.einsum("hd,hnd->hn", q[b, :, t], kk[b, :, keys]), dim=-1)
            torch.testing.assert_close(got[b, :, t], want)


def test_the_trainer_with_document_masking_resumes_bitwise(tmp_path, monkeypatch):
    overrides = [
        "data.document_masking=true",
        "data.reset_position_ids=true",
        "train.steps=6",
        "train.save_every=3",
        "train.eval_every=3",
        "train.log_every=1",
    ]
    assert_resume_is_bitwise(overrides, tmp_path, monkeypatch, steps=6, crash_step=3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_cuda_torch_path_uses_flex_attention_with_the_same_result():
    from mupfast.ops.attention import document_attention, document_mask

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 256, 64, device="cuda", requires_grad=True) for _ in range(3))
    docs = torch.repeat_interleave(
        torch.arange(5, device="cuda"), torch.tensor([40, 100, 1, 60, 55], device="cuda")
    )
    docs = docs[None].repeat(2, 1)
    got = document_attention(q, k, v, docs, 0.125, False)
    mask = document_mask(docs)[:, None]
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.125)
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
