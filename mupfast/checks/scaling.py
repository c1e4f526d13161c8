"""A config at another width or depth, with the μP bases fixed at the proxy's size.

The coordinate check and the μTransfer test scale the config they are given the same way: the head
dim and the ratio filter_size / hidden_size stay fixed, the number of (query and key/value) heads
grows with the width — the kv heads too, unless the config fixes them (``mup_base_num_kv_heads`` =
``num_kv_heads``, as Llama-style families keep 8 at every size) — and ``mup_base_hidden_size`` /
``mup_base_filter_size`` / ``mup_base_num_kv_heads`` (resp. ``mup_base_num_layers``) name the
smallest size of the grid.
"""

from __future__ import annotations

from typing import Any

from mupfast.config import Config, with_overrides
from mupfast.errors import ConfigError


def scaled_config(
    cfg: Config,
    *,
    parametrization: str,
    width: int | None = None,
    base_width: int | None = None,
    depth: int | None = None,
    base_depth: int | None = None,
) -> Config:
    """``cfg`` at another width and/or depth, with the μP bases fixed at the proxy's size.

    Width: the head dim and the ratio filter_size/hidden_size of ``cfg`` stay fixed; the number of
    (query and key/value) heads grows with the width. Depth: ``num_layers`` changes and
    ``mup_base_num_layers`` is ``base_depth``.
    """
    m = cfg.model
    values: dict[str, Any] = {"model.parametrization": parametrization}
    if width is not None:
        base_width = base_width or width
        head_dim, ratio = m.head_dim, m.filter_size / m.hidden_size
        group = m.num_heads // m.kv_heads
        fixed_kv = m.num_kv_heads is not None and m.mup_base_num_kv_heads == m.num_kv_heads
        for w in (width, base_width):
            if fixed_kv and (w % head_dim or (w // head_dim) % m.kv_heads):
                raise ConfigError(
                    f"--widths: {w} is not a multiple of the head dim {head_dim} × {m.kv_heads} kv heads "
                    "(fixed at every width: model.mup_base_num_kv_heads = model.num_kv_heads)"
                )
            if not fixed_kv and (w % head_dim or (w // head_dim) % group):
                raise ConfigError(
                    f"--widths: {w} is not a multiple of the head dim {head_dim}"
                    + (f" × {group} query heads per kv head" if group > 1 else "")
                    + " (model.hidden_size / model.num_heads of the config)"
                )
            if (ratio * w) % 1:
                raise ConfigError(f"--widths: {w} × filter ratio {ratio:g} is not an integer filter_size")
        if m.num_kv_heads is None:
            kv = {"model.num_kv_heads": None, "model.mup_base_num_kv_heads": None}
        elif fixed_kv:  # Llama-style: the same kv heads at every width, k and v output-like
            kv = {"model.num_kv_heads": m.num_kv_heads, "model.mup_base_num_kv_heads": m.num_kv_heads}
        else:  # the kv heads grow with the query heads
            kv = {
                "model.num_kv_heads": width // head_dim // group,
                "model.mup_base_num_kv_heads": base_width // head_dim // group,
            }
        values.update(
            {
                "model.hidden_size": width,
                "model.num_heads": width // head_dim,
                **kv,
                "model.filter_size": int(ratio * width),
                "model.mup_base_hidden_size": base_width,
                "model.mup_base_filter_size": int(ratio * base_width),
            }
        )
    if depth is not None:
        values.update({"model.num_layers": depth, "model.mup_base_num_layers": base_depth or depth})
    return with_overrides(cfg, values)
