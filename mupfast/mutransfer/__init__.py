"""The μTransfer workflow: tune a proxy, select the configurations that train stably, carry them over.

* :mod:`~mupfast.mutransfer.sweep` (``sweep``): an Optuna study whose trials are training runs, with
  :mod:`~mupfast.mutransfer.space` (the ranges), :mod:`~mupfast.mutransfer.storage` (the database
  several workers share) and :mod:`~mupfast.mutransfer.trial` (one trial as a child process).
* :mod:`~mupfast.mutransfer.stability`: a run's loss spikes, grad-norm ratio, |logit|, and the verdict.
* :mod:`~mupfast.mutransfer.report` (``sweep --report``): trials ranked among the stable ones, and a plot.
* :mod:`~mupfast.mutransfer.transfer` (``transfer``): target configs from the best stable trials.
* :mod:`~mupfast.mutransfer.compare` (``transfer-compare``): whether it pays — μTransfer against SP
  tuned at the target, in target loss and tuning FLOPs (:mod:`~mupfast.mutransfer.compare_plot`).
"""
