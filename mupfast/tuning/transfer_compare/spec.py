"""What one ``transfer-compare`` study runs: :class:`CompareSpec`, built from the verb's flags.

:func:`spec_from_args` checks every flag before anything trains and builds the three configs
(:func:`build_configs`: the proxy, the μP target and the same target in SP, each at its width and
steps); the study itself is :func:`~mupfast.tuning.transfer_compare.transfer_compare.transfer_compare`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mupfast.checks.scaling import scaled_config
from mupfast.config import Config, load_config, with_overrides
from mupfast.errors import ConfigError
from mupfast.flags import parse_float_list, parse_lrs, parse_positive_int
from mupfast.tuning.space import Range

REPO_CONFIGS = Path(__file__).resolve().parents[3] / "configs"
DEFAULT_PROXY, DEFAULT_TARGET = "configs/proxy-cpu.yaml", "configs/target-cpu.yaml"
DEFAULT_SP_LRS = ",".join(f"2^{e}" for e in range(-12, -3))  # 2^-12 … 2^-4 in octaves
DEFAULT_MUP_LR_GRID = "-1,-0.5,0,0.5,1"  # exponents k of the transferred lr × 2^k
#: Set by the command's own flags; as dotted overrides they would be silently replaced.
FLAG_KEYS = {
    "train.steps": "--proxy-steps / --target-steps",
    "model.hidden_size": "--proxy-width / --target-width",
    "model.num_heads": "--proxy-width / --target-width (heads follow the width)",
    "model.filter_size": "--proxy-width / --target-width (the filter ratio is kept)",
}


@dataclass(frozen=True)
class CompareSpec:
    """One transfer-compare study: its three configs and what it trains of each."""

    proxy: Config
    target: Config  # μP at the target's width
    sp_target: Config  # the same target in SP
    out: Path
    trials: int  # the proxy study's budget
    top: int  # stable proxy trials transferred
    seeds: int  # of every target run
    sp_lrs: Sequence[float]
    sp_init_stds: Sequence[float] | None  # None: the target's init std only
    mup_lr_grid: Sequence[float]  # exponents k of the best transferred lr × 2^k
    jobs: int
    space: dict[str, Range] | None = None  # the proxy sweep's (default: the built-in ranges)
    study: str = "transfer-compare"
    storage: str | None = None  # default sqlite:///<out>/proxy.db
    sampler: str = "tpe"
    pruner: str = "median"
    seed: int = 0
    proxy_reseeds: int = 0
    progress: bool = True


def _config_path(path: str | None, default: str) -> Path:
    """The given config, or the default one (from the checkout when run elsewhere)."""
    if path:
        return Path(path)
    return Path(default) if Path(default).is_file() else REPO_CONFIGS / Path(default).name


def _scaled(cfg: Config, width: int | None, parametrization: str, flag: str) -> Config:
    """``cfg`` at ``width`` (heads and filter as the transfer test scales them), its μP base kept."""
    if width is None:
        return with_overrides(cfg, {"model.parametrization": parametrization})
    try:
        return scaled_config(
            cfg,
            parametrization=parametrization,
            width=width,
            base_width=cfg.model.mup_base_hidden_size or width,
        )
    except ConfigError as e:
        raise ConfigError(str(e).replace("--widths", flag)) from None


def build_configs(
    proxy_path: str | Path,
    target_path: str | Path,
    overrides: Sequence[str],
    *,
    proxy_width: int | None,
    target_width: int | None,
    proxy_steps: int,
    target_steps: int | None,
) -> tuple[Config, Config, Config]:
    """(proxy, μP target, SP target): the overrides applied to both, each at its width and steps."""
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in FLAG_KEYS:
            raise ConfigError(f"{key}: set by {FLAG_KEYS[key]} in transfer-compare, not as an override")
    proxy = load_config(proxy_path, overrides)
    target = load_config(target_path, overrides)
    for cfg, what in ((proxy, "--config (the proxy)"), (target, "--target")):
        if cfg.model.parametrization not in ("mup", "completep"):
            raise ConfigError(
                f"{what}: model.parametrization is {cfg.model.parametrization}; transfer-compare "
                "compares a mup or completep proxy and target against SP"
            )
    proxy = with_overrides(
        _scaled(proxy, proxy_width, proxy.model.parametrization, "--proxy-width"),
        {"train.steps": proxy_steps},
    )
    t_width = target_width or target.model.hidden_size
    if t_width < proxy.model.hidden_size:
        raise ConfigError(
            f"--target-width: {t_width} is narrower than the proxy ({proxy.model.hidden_size}); "
            "μTransfer goes from a small proxy to a wider target"
        )
    steps = {"train.steps": target_steps or proxy_steps}
    mup = with_overrides(_scaled(target, target_width, target.model.parametrization, "--target-width"), steps)
    sp = with_overrides(_scaled(target, target_width, "sp", "--target-width"), steps)
    return proxy, mup, sp


def parse_mup_lr_grid(text: str) -> list[float]:
    """Exponents k of the μP target grid (lr × 2^k), with 0 (the transferred lr itself) always in."""
    ks = sorted(set(parse_float_list(text, "--mup-lr-grid", positive=False)) | {0.0})
    if len(ks) < 2:
        raise ConfigError(
            f"--mup-lr-grid: needs an exponent besides 0, e.g. --mup-lr-grid={DEFAULT_MUP_LR_GRID}"
        )
    return ks


def _optional_int(text: str | None, flag: str) -> int | None:
    return None if text is None else parse_positive_int(text, flag)


def spec_from_args(args: argparse.Namespace, jobs: int, sp_init_stds: list[float] | None) -> CompareSpec:
    """The study the flags describe (every flag checked, in the order the verb always checked them)."""
    from mupfast.tuning.space import load_space
    from mupfast.tuning.sweep.sweep import make_pruner, make_sampler

    trials, top = parse_positive_int(args.trials, "--trials"), parse_positive_int(args.top, "--top")
    if top > trials:
        raise ConfigError(f"--top: {top} is more than --trials {trials}")
    reseeds = parse_positive_int(args.proxy_reseeds, "--proxy-reseeds", zero_ok=True)
    try:
        seed = int(args.seed)
    except ValueError:
        raise ConfigError(f"--seed: {args.seed!r} is not an integer") from None
    make_sampler(args.sampler, seed)  # a bad name is an error now, not after the configs load
    make_pruner(args.pruner)
    proxy, target, sp = build_configs(
        _config_path(args.config, DEFAULT_PROXY),
        _config_path(args.target, DEFAULT_TARGET),
        args.overrides,
        proxy_width=_optional_int(args.proxy_width, "--proxy-width"),
        target_width=_optional_int(args.target_width, "--target-width"),
        proxy_steps=parse_positive_int(args.proxy_steps, "--proxy-steps"),
        target_steps=_optional_int(args.target_steps, "--target-steps"),
    )
    return CompareSpec(
        proxy,
        target,
        sp,
        out=Path(args.out),
        trials=trials,
        top=top,
        seeds=parse_positive_int(args.seeds, "--seeds"),
        sp_lrs=parse_lrs(args.sp_lrs or DEFAULT_SP_LRS, "--sp-lrs"),
        sp_init_stds=sp_init_stds,
        mup_lr_grid=parse_mup_lr_grid(args.mup_lr_grid),
        jobs=jobs,
        space=load_space(args.space, proxy),
        study=args.study,
        storage=args.storage,
        sampler=args.sampler,
        pruner=args.pruner,
        seed=seed,
        proxy_reseeds=reseeds,
    )
