"""Running on many ranks: DeepSpeed setup, activation checkpointing, compilation, ZeRO shards.

* :mod:`~mupfast.distributed.engine`: the process group, the ds_config we build, DeepSpeed checkpoints.
* :mod:`~mupfast.distributed.activation_checkpoint`: recomputing blocks in the backward.
* :mod:`~mupfast.distributed.compile`: regional ``torch.compile`` of each block.
* :mod:`~mupfast.distributed.zero_shards`: the client optimizer's view of ZeRO's flat partitions.
"""
