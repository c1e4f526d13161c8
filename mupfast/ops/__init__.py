"""Per-op dispatch: for each hot op, our Triton kernel or a peer, chosen where it is right and faster.

* :mod:`~mupfast.ops.dispatch`: the mechanism: per shape key each candidate checked against a reference,
  the right ones timed, the fastest kept (in memory and on disk), every decision logged and recorded.
* :mod:`~mupfast.ops.attention_select` (attention), :mod:`~mupfast.ops.readout` (the readout's loss),
  :mod:`~mupfast.ops.clip_adamw` (group norms and the clipped AdamW step), :mod:`~mupfast.ops.newton_schulz`
  (Muon's orthogonalisation): each op's candidates, check and timing.
"""
