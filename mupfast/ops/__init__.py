"""Per-op dispatch: for each hot op, our Triton kernel or a peer, chosen where it is right and faster.

* :mod:`~mupfast.ops.attention_select`: attention's backend per shape (our kernel, SDPA cuDNN/flash,
  flash-attn), measured once and cached on disk.
"""
