"""Documents packed back to back in a batch: which document each token belongs to, and its position.

Prepared shards end every document with EOS, so a window of the token stream tells its document
boundaries by itself: a document ends at its EOS, the next one starts right after. ``document_ids``
numbers the documents of each row from 0 (the first may be the tail of one that began before the
window); attention then stops at document boundaries (``mup_attention(..., doc_ids=…)``).

Targets across a boundary are kept: the EOS position predicts the next document's first token,
as in Llama 3's and Megatron-LM's default, so no token of the stream goes untrained; the model
at that position sees only the document the EOS ends.
"""

from __future__ import annotations

import torch


def document_ids(inputs: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, T) int32: for each token, how many EOS tokens come before it in its row (its EOS included
    in its own document)."""
    eos = (inputs == eos_id).to(torch.int32)
    return (torch.cumsum(eos, dim=1) - eos).to(torch.int32)


def position_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) int64: each token's position within its document (restarting at 0 at every start)."""
    T = doc_ids.shape[1]
    idx = torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first
