"""``mupfast pbt``: population-based training on the proxy (exploit and explore between intervals).

``mupfast transfer --pbt`` carries its best lineage to a target: :mod:`~mupfast.tuning.transfer.lineage`.

* :mod:`~mupfast.tuning.pbt.pbt`: the verb.
* :mod:`~mupfast.tuning.pbt.plan`: the population, its intervals and the explore moves.
* :mod:`~mupfast.tuning.pbt.worker`: a worker that trains members one interval at a time.
* :mod:`~mupfast.tuning.pbt.member`: one member's interval: its run directory, checkpoint and copy.
* :mod:`~mupfast.tuning.pbt.schema` and :mod:`~mupfast.tuning.pbt.store`: the study's records.
* :mod:`~mupfast.tuning.pbt.report` (``pbt --report``): lineages and their pictures.
"""
