"""Fine-tuning a trained run: full, LoRA, AdaLoRA and AdaMoLE, with μP adapter rules (docs/finetune.md).

* :mod:`~mupfast.finetune.lora`: the adapted linear layer every adapter shares, and LoRA.
* :mod:`~mupfast.finetune.adalora`: AdaLoRA's SVD-form adapter, importance and rank allocation.
* :mod:`~mupfast.finetune.adamole`: AdaMoLE, LoRA experts behind a gate and a learned threshold.
* :mod:`~mupfast.finetune.rules`: the adapters' μP rules (rows of the rules table).
* :mod:`~mupfast.finetune.adapters`: which matrices get adapters, attaching them (frozen base).
* :mod:`~mupfast.finetune.attach`: the base run's weights and the trainer's hooks.
* :mod:`~mupfast.finetune.merge`: adapters merged into the weights, or written as a PEFT folder.
* :mod:`~mupfast.finetune.data`: prompt/completion JSON Lines, loss on the completions only.
* :mod:`~mupfast.finetune.finetune`: ``mupfast finetune --run BASE_RUN --config FT.yaml``.
* :mod:`~mupfast.finetune.config_check`: the checks of the ``finetune`` config section.

Nothing is imported here: ``mupfast.config.validate`` reaches the config checks without loading
the adapters (the trainer imports :mod:`~mupfast.finetune.attach` itself).
"""
