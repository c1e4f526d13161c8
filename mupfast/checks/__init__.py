"""The experiments that show μP working, each a verb that writes a JSON result and its picture.

* :mod:`~mupfast.checks.coord_check` (``coord-check``): every layer's output size against width.
* :mod:`~mupfast.checks.transfer_check` (``transfer-test``): the best lr across widths or depths.
* :mod:`~mupfast.checks.horizon_check` (``horizon-test``): the best lr (or weight decay) across
  training horizons, and its fitted exponent.
* :mod:`~mupfast.checks.batch_check` (``batch-test``): the best lr across tokens per step at a fixed
  token budget, and its fitted exponent.

Around them: :mod:`~mupfast.checks.scaling` (a config at another width or depth),
:mod:`~mupfast.checks.scale_grid` (the grid over a scale axis horizon and batch share),
:mod:`~mupfast.checks.optimum_fit` (where an optimum is and how it moves),
:mod:`~mupfast.checks.results` (the JSON + picture every check writes) and the plots
(``*_plot.py``). Their grids of training runs are launched by :mod:`mupfast.tuning.launch`.
"""
