"""``mupfast sweep``: tune the proxy with Optuna, each trial a training run.

* :mod:`~mupfast.tuning.sweep.sweep`: the verb, the study and its workers.
* :mod:`~mupfast.tuning.sweep.report` (``sweep --report``): trials ranked among the stable ones, and a plot.
"""
