"""Cerebras Model Zoo's config keys and the mupfast key of the same meaning, for the loader's hints.

A user porting a Model Zoo config writes its names into a mupfast config. Spelling alone suggests
keys of another meaning (``output_layer_initializer`` is o's and ffn_out's init, not the readout's
``output_init_std``), so for these names the hint comes from this table, never from difflib: the
dotted mupfast key that means the same, or None where no single key does (dropout, loss scaling, …;
``mupfast import-config cerebras`` translates a whole Model Zoo file and says what it does with each).
"""

from __future__ import annotations

#: Model Zoo key (any section, either file format) → mupfast's dotted key of the same meaning, or None.
CEREBRAS_KEYS: dict[str, str | None] = {
    # the model section
    "num_hidden_layers": "model.num_layers",
    "max_position_embeddings": "model.max_seq_len",
    "share_embedding_weights": "model.tie_embeddings",
    "layer_norm_epsilon": "model.norm_eps",
    "norm_type": "model.norm",
    "position_embedding_type": "model.position",
    "use_position_embedding": "model.position",
    "nonlinearity": "model.mlp",
    "use_ffn_bias": "model.bias",
    "use_projection_bias_in_attention": "model.bias",
    "use_ffn_bias_in_attention": "model.bias",
    "initializer": "model.init_std",
    "initializer_range": "model.init_std",
    "embedding_initializer": "model.embedding_init_std",
    "ffn_initializer": "model.ffn_in_init_std",
    "output_layer_initializer": "model.o_init_std",
    "ffn_output_layer_initializer": "model.ffn_out_init_std",
    "dropout_rate": None,
    "attention_dropout_rate": None,
    "embedding_dropout_rate": None,
    "attention_type": None,
    "attention_kernel": None,
    "attention_softmax_fp32": None,
    "use_bias_in_output": None,
    "embedding_layer_norm": None,
    "loss_scaling": None,
    "loss_weight": None,
    "output_logits_scale": "model.output_logits_alpha",
    "lr_adjustment_groups": None,
    "mixed_precision": "train.precision",
    "use_bfloat16": "train.precision",
    "fp16_type": "train.precision",
    "name": None,
    # the optimizer
    "optimizer_type": None,
    "learning_rate": "optim.lr",
    "weight_decay_rate": "optim.weight_decay",
    "betas": "optim.beta1",
    "max_gradient_norm": "clip.global_max_norm",
    "correct_bias": None,
    "adjust_learning_rate": None,
    "schedulers": "schedule.kind",
    # sections and run settings
    "trainer": None,
    "train_input": None,
    "eval_input": None,
    "runconfig": None,
    "optimizer": "optim",
    "max_steps": "train.steps",
    "batch_size": "train.micro_batch_size",
    "checkpoint_steps": "train.save_every",
    "log_steps": "train.log_every",
}


def hint(key: str) -> str | None:
    """The loader's hint for an unknown ``key`` that Model Zoo uses, or None for any other key."""
    if key not in CEREBRAS_KEYS:
        return None
    ours = CEREBRAS_KEYS[key]
    where = f"mupfast's is {ours}" if ours else "mupfast has no key of that meaning"
    return f"a Cerebras Model Zoo key: {where}; `mupfast import-config cerebras FILE` translates a Model Zoo config"
