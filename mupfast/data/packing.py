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

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from mupfast.errors import ConfigError

if TYPE_CHECKING:
    from mupfast.config.schema import DataConfig


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


def packed_inputs(data: DataConfig, eos_id: int | None) -> Callable[[torch.Tensor], dict]:
    """What a batch's input ids tell the model besides themselves: the document of every token
    (data.document_masking) and its position in it (data.reset_position_ids), read off the EOS that
    ends each document."""
    if not (data.document_masking or data.reset_position_ids):
        return lambda x: {}
    if eos_id is None:
        raise ConfigError(
            "data.document_masking: the prepared data has no end-of-document token (prepared by an older "
            "mupfast); prepare it again"
        )

    def model_kwargs(x: torch.Tensor) -> dict:
        docs = document_ids(x, eos_id)
        out = {"doc_ids": docs} if data.document_masking else {}
        if data.reset_position_ids:
            out["position_ids"] = position_ids(docs)
        return out

    return model_kwargs
