"""Fine-tuning a trained run: full, LoRA, AdaLoRA and AdaMoLE, with μP adapter rules (docs/finetune.md).

A feature of the core, registered (pyproject.toml's ``mupfast.features`` entry point), never imported
by it: :mod:`~mupfast.finetune.plugin` is what the core calls (:mod:`mupfast.plugins`).

* :mod:`~mupfast.finetune.plugin`: the feature: config section, model preparation, export hooks.
* :mod:`~mupfast.finetune.config`: the ``finetune`` config section and its checks.
* :mod:`~mupfast.finetune.lora`: the adapted linear layer every adapter shares, and LoRA.
* :mod:`~mupfast.finetune.adalora`: AdaLoRA's SVD-form adapter, importance and rank allocation.
* :mod:`~mupfast.finetune.adamole`: AdaMoLE, LoRA experts behind a gate and a learned threshold.
* :mod:`~mupfast.finetune.rules`: the adapters' μP rules (rows of the rules table, stated by each adapter).
* :mod:`~mupfast.finetune.adapters`: which matrices get adapters, attaching them (frozen base).
* :mod:`~mupfast.finetune.attach`: the base run's weights and the trainer's hooks.
* :mod:`~mupfast.finetune.merge`: adapters merged into the weights, or written as a PEFT folder.
* :mod:`~mupfast.finetune.data`: prompt/completion JSON Lines, loss on the completions only.
* :mod:`~mupfast.finetune.finetune`: ``mupfast finetune --run BASE_RUN --config FT.yaml``.

Nothing is imported here: the config loader reaches the section through the plugin without loading
the adapters.
"""
