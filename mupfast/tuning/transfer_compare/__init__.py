"""``mupfast transfer-compare``: does μTransfer pay? The tuned proxy's pick against SP tuned at the target.

* :mod:`~mupfast.tuning.transfer_compare.transfer_compare`: the verb: the study, step by step, and the target runs.
* :mod:`~mupfast.tuning.transfer_compare.spec`: what a study runs (its configs and flags).
* :mod:`~mupfast.tuning.transfer_compare.proxy`: the proxy study, the trials it transfers, their FLOPs.
* :mod:`~mupfast.tuning.transfer_compare.runs`: the target runs (seeds, records, FLOPs).
* :mod:`~mupfast.tuning.transfer_compare.result`: the conclusions drawn from the runs.
* :mod:`~mupfast.tuning.transfer_compare.extend` (``--extend``): SP's grid widened after the fact.
* :mod:`~mupfast.tuning.transfer_compare.plot`: the table and the picture.
"""
