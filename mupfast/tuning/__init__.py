"""The μTransfer workflow: tune a proxy, keep what trains stably, carry it to the target, show it pays.

* :mod:`~mupfast.tuning.launch`: the one way to launch training runs: one as a child process, or a grid.
* :mod:`~mupfast.tuning.sweep` (``sweep``): an Optuna study whose trials are training runs.
* :mod:`~mupfast.tuning.pbt` (``pbt``): population-based training on the proxy.
* :mod:`~mupfast.tuning.transfer` (``transfer``): target configs from the best stable trials or lineage.
* :mod:`~mupfast.tuning.transfer_compare` (``transfer-compare``): μTransfer against SP tuned at the
  target, in target loss and tuning FLOPs.

Shared by them: :mod:`~mupfast.tuning.space` (search spaces), :mod:`~mupfast.tuning.storage` (the
study database several workers share), :mod:`~mupfast.tuning.trial` (one trial's run) and
:mod:`~mupfast.tuning.stability` (a run's loss spikes, grad-norm ratio, |logit| and the verdict).
"""
