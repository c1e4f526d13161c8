"""``mupfast transfer``: carry the proxy's hyperparameters to the target.

* :mod:`~mupfast.tuning.transfer.transfer`: the verb: target configs from a sweep's best stable trials
  or a PBT lineage.
* :mod:`~mupfast.tuning.transfer.lineage` (``transfer --pbt``): a PBT lineage's lr schedule and final
  values, replayed at the target.
* :mod:`~mupfast.tuning.transfer.values`: the one place the target's values are computed from the
  proxy's (width by μP, depth by CompleteP, HyperP's batch and horizon rule).
"""
