"""The experiments that show μP working, each a verb that writes a JSON result and its picture.

* :mod:`~mupfast.checks.coord_check` (``coord-check``): every layer's output size against width.
* :mod:`~mupfast.checks.transfer_check` (``transfer-test``): the best lr across widths or depths.
* :mod:`~mupfast.checks.horizon_check` (``horizon-test``): the best lr across training horizons, and its
  fitted exponent.

Around them: :mod:`~mupfast.checks.scaling` (a config at another width or depth),
:mod:`~mupfast.checks.results` (the JSON + picture every check writes) and the plots
(``*_plot.py``). Their grids of training runs are launched by :mod:`mupfast.tuning.launch`.
"""
