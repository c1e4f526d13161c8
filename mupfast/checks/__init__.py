"""The experiments that show μP working, each a verb that writes a JSON result and its picture.

* :mod:`~mupfast.checks.coord_check` (``coord-check``): every layer's output size against width.
* :mod:`~mupfast.checks.transfer_check` (``transfer-test``): the best lr across widths or depths.
* :mod:`~mupfast.checks.horizon_check` (``horizon-test``): the best lr across training horizons, and its
  fitted exponent.
* :mod:`~experiments.equal_compute`: parametrizations against each other at their best lrs.

Around them: :mod:`~mupfast.checks.scaling` (a config at another width or depth),
:mod:`~mupfast.tuning.launch` (a grid of training runs in worker processes, one directory each),
:mod:`~mupfast.checks.results` (the JSON + picture every check writes) and the plots.
"""
