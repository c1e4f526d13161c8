"""``mupfast <verb> --config FILE [section.key=value ...]``.

Every verb takes a config and dotted overrides. Problems with the user's input (config, data,
checkpoints) print one line ``error: …`` and exit with code 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from mupfast.config import ConfigError, load_config

USAGE_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mupfast", description="μP-native, kernel-backed LLM trainer")
    sub = p.add_subparsers(dest="verb", required=True)

    def verb(name: str, help: str) -> argparse.ArgumentParser:
        v = sub.add_parser(name, help=help)
        v.add_argument("--config", help="YAML config file (defaults apply to anything it leaves out)")
        v.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
        v.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-3")
        return v

    verb("train", "train (or resume) a model; works under the deepspeed launcher")
    e = verb("explain", "print the parametrization table: init, lr and wd multipliers, forward multipliers")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    verb("prepare-data", "tokenize the corpus into token shards (cached; training does this itself)")
    c = verb(
        "coord-check",
        "coordinate check: every layer's output size vs width, per parametrization (JSON + PNG)",
    )
    c.add_argument(
        "--widths", default="64,128,256,512,1024", help="comma-separated widths (default %(default)s)"
    )
    c.add_argument("--steps", default="5", help="optimizer steps per width (default %(default)s)")
    c.add_argument("--seeds", default="3", help="seeds averaged per width (default %(default)s)")
    c.add_argument(
        "--parametrizations", default="sp,mup", help="sp, mup, completep, hyperp; default %(default)s"
    )
    c.add_argument("--hyperp-lr", default="2^-3", help="hyperp's η at every width (default %(default)s)")
    c.add_argument("--out", default="runs/coord-check", help="output directory (default %(default)s)")
    t = verb(
        "transfer-test", "μTransfer test: lr sweep per width (or depth) through the trainer (JSON + PNG)"
    )
    t.add_argument("--widths", help="comma-separated widths (default 64,128,256,512 unless --depths)")
    t.add_argument("--depths", help="comma-separated num_layers: the depth variant at the config's width")
    t.add_argument(
        "--lrs", default="2^-11,2^-10,2^-9,2^-8,2^-7,2^-6,2^-5", help="lr grid (default %(default)s)"
    )
    t.add_argument(
        "--hyperp-lrs", help="hyperp's grid of base lrs η0 (default: --lrs); η = η0 at the smallest size"
    )
    t.add_argument("--steps", default=None, help="steps per run (default: the config's train.steps)")
    t.add_argument("--seeds", default="1", help="seeds per point, averaged (default %(default)s)")
    t.add_argument(
        "--parametrizations",
        help="sp, mup, completep, hyperp; default sp,mup (widths) or mup,completep (depths)",
    )
    t.add_argument("--jobs", default=None, help="parallel runs (default: one per GPU, else up to 2)")
    t.add_argument("--out", default="runs/transfer-test", help="output directory (default %(default)s)")
    h = verb(
        "horizon-test", "token-horizon check: optimal lr vs training tokens, fitted exponent (JSON + PNG)"
    )
    h.add_argument("--steps", default="100,200,400,800", help="horizons in steps (default %(default)s)")
    h.add_argument(
        "--lrs",
        default="2^-6,2^-5.5,2^-5,2^-4.5,2^-4,2^-3.5,2^-3",
        help="lr grid; under hyperp η0 = η (default %(default)s)",
    )
    h.add_argument("--seeds", default="3", help="seeds per point (default %(default)s)")
    h.add_argument("--parametrization", default="hyperp", help="default %(default)s")
    h.add_argument(
        "--bootstrap", default="2000", help="bootstrap replicates over seeds (default %(default)s)"
    )
    h.add_argument("--jobs", default="1", help="parallel runs (default %(default)s)")
    h.add_argument("--out", default="runs/horizon-test", help="output directory (default %(default)s)")
    w = verb("sweep", "proxy hyperparameter sweep (Optuna; each trial a training run); --report to rank it")
    _study_args(w)
    w.add_argument("--trials", type=int, default=20, help="the study's trial budget (default %(default)s)")
    w.add_argument("--sampler", default="random", help="random or tpe (default %(default)s)")
    w.add_argument("--space", help="YAML space file (default: the built-in ranges, configs/sweep-space.yaml)")
    w.add_argument("--pruner", default="median", help="median, hyperband or none (default %(default)s)")
    w.add_argument("--seed", type=int, default=None, help="sampler seed (default: the study's)")
    w.add_argument("--sweep-dir", help="trial run directories (default runs/sweeps/<study>)")
    w.add_argument("--launcher", default="auto", help="python, deepspeed, or auto (deepspeed with CUDA)")
    w.add_argument("--gpus", help="deepspeed: GPUs of this worker, e.g. 0,1 (default: all)")
    w.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each trial")
    w.add_argument("--trial-timeout", type=float, default=None, help="seconds before a trial is failed")
    w.add_argument("--keep-checkpoints", action="store_true", help="keep each trial's checkpoints")
    w.add_argument("--report", action="store_true", help="report the study: stability, top k, plot")
    w.add_argument("--plot", help="report plot path (default runs/sweeps/<study>-report.png)")
    x = verb("transfer", "write target configs from a sweep's best stable trials (μTransfer)")
    _study_args(x)
    x.add_argument("--target", help="the target model's YAML config (or --config)")
    x.add_argument("--out", help="directory of the written configs (default runs/transfer/<study>)")
    x.add_argument(
        "--proxy-world-size", default="1", help="hyperp: ranks of each proxy trial (default %(default)s)"
    )
    x.add_argument(
        "--target-world-size", default="1", help="hyperp: ranks the target trains on (default %(default)s)"
    )
    # export / generate read RUN/config.yaml; --config (optional) replaces it, overrides apply on top.
    o = verb("export", "fold every μP multiplier into the weights; write a Hugging Face model (Llama/GPT-2)")
    o.add_argument("--run", help="run directory (config.yaml + checkpoints/)")
    o.add_argument("--out", help="output directory: model.safetensors, config.json, tokenizer")
    o.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default %(default)s)")
    o.add_argument("--force", action="store_true", help="write into a non-empty --out")
    g = verb("generate", "sample text from a run's latest checkpoint (KV cache, streamed)")
    g.add_argument("--run", help="run directory (config.yaml + checkpoints/)")
    g.add_argument("--prompt", help="text to continue")
    g.add_argument("--max-new-tokens", type=int, default=128, help="default %(default)s")
    g.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default %(default)s)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0: off (default)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1: off (default)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default %(default)s)")
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    return p


def _study_args(v: argparse.ArgumentParser) -> None:
    v.add_argument("--study", help="study name (default: the --config file's stem)")
    v.add_argument(
        "--storage", help="sqlite:///path.db or postgresql://… (default sqlite:///runs/sweeps/<study>.db)"
    )
    v.add_argument("--top-k", type=int, default=None, help="trials to select (report: 10, transfer: 1)")
    v.add_argument("--spike-factor", type=float, default=1.2, help="loss spike: above this × running median")
    v.add_argument("--max-grad-ratio", type=float, default=10.0, help="unstable above this grad-norm ratio")
    v.add_argument("--max-logit", type=float, default=None, help="unstable above this max |logit|")


def _split_overrides(args: argparse.Namespace, extra: list[str]) -> list[str]:
    overrides = list(args.overrides)
    for item in extra:  # allow --section.key=value as well as section.key=value
        if item.startswith("--") and "=" in item and "." in item.split("=", 1)[0]:
            overrides.append(item[2:])
        else:
            raise ConfigError(f"unrecognised argument {item!r}")
    return overrides


def run(argv: list[str]) -> int:
    args, extra = _parser().parse_known_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    if args.verb in ("export", "generate"):  # configured by the run directory, not --config
        if args.verb == "export":
            from mupfast.export import main as verb_main
        else:
            from mupfast.generate import main as verb_main
        return verb_main(args, _split_overrides(args, extra))
    cfg = load_config(args.config, _split_overrides(args, extra))

    if args.verb == "explain":
        from mupfast.parametrization import format_table, rules_table, table_json

        rules = rules_table(cfg.model)
        print(
            json.dumps(table_json(cfg.model, rules, cfg), indent=2)
            if args.json
            else format_table(cfg.model, rules, cfg)
        )
        return 0
    if args.verb == "prepare-data":
        from mupfast.data import prepare_data

        prepared = prepare_data(cfg.data)
        print(f"prepared {prepared.dir} (vocab {prepared.vocab_size})")
        return 0
    if args.verb == "train":
        from mupfast.train import train

        result = train(cfg)
        if int(os.environ.get("RANK", "0")) == 0:
            val = result.val_losses.get(result.steps)
            loss = result.train_losses.get(result.steps)
            print(
                f"run directory: {result.run_dir}  (steps {result.steps}, final train loss "
                f"{loss if loss is None else f'{loss:.4f}'}, val loss {val if val is None else f'{val:.4f}'}, "
                f"{result.tokens_per_s:,.0f} tokens/s)"
            )
        return 0
    if args.verb == "coord-check":
        from mupfast import coord_check as C

        widths = C.parse_int_list(args.widths, "--widths")
        params = C.parse_parametrizations(args.parametrizations)
        steps, seeds = (
            C.parse_positive_int(args.steps, "--steps"),
            C.parse_positive_int(args.seeds, "--seeds"),
        )
        from mupfast.transfer import parse_lr

        hyperp_lr = parse_lr(args.hyperp_lr, "--hyperp-lr")
        result = C.coord_check(
            cfg, widths, steps=steps, seeds=seeds, parametrizations=params, hyperp_lr=hyperp_lr
        )
        js, png = C.write_outputs(result, args.out)
        print("\n".join(C.verdict_lines(result)))
        print(f"wrote {js} and {png} ({result['elapsed_s']:.0f} s)")
        return 0
    if args.verb == "transfer-test":
        from mupfast import coord_check as C
        from mupfast import transfer as X
        from mupfast.grid_runs import default_jobs

        if args.widths and args.depths:
            raise ConfigError("transfer-test: give --widths or --depths, not both")
        widths = depths = None
        if args.depths:
            depths = C.parse_int_list(args.depths, "--depths")
        else:
            widths = C.parse_int_list(args.widths or "64,128,256,512", "--widths")
        params = X.parse_parametrizations(args.parametrizations) if args.parametrizations else None
        jobs = C.parse_positive_int(args.jobs, "--jobs") if args.jobs else default_jobs()
        result = X.transfer_test(
            cfg,
            lrs=X.parse_lrs(args.lrs),
            hyperp_lrs=X.parse_lrs(args.hyperp_lrs, "--hyperp-lrs") if args.hyperp_lrs else None,
            widths=widths,
            depths=depths,
            steps=C.parse_positive_int(args.steps, "--steps") if args.steps else None,
            seeds=C.parse_positive_int(args.seeds, "--seeds"),
            parametrizations=params,
            out=args.out,
            jobs=jobs,
        )
        js, png = X.write_outputs(result, args.out)
        print("\n".join(X.table_lines(result)))
        print(f"wrote {js} and {png} ({result['elapsed_s']:.0f} s)")
        return 0
    if args.verb == "horizon-test":
        from mupfast import coord_check as C
        from mupfast import horizon as H
        from mupfast import transfer as X

        result = H.horizon_test(
            cfg,
            horizons=C.parse_int_list(args.steps, "--steps"),
            lrs=X.parse_lrs(args.lrs),
            seeds=C.parse_positive_int(args.seeds, "--seeds"),
            parametrization=args.parametrization,
            out=args.out,
            jobs=C.parse_positive_int(args.jobs, "--jobs"),
            n_boot=C.parse_positive_int(args.bootstrap, "--bootstrap"),
        )
        js, png = H.write_outputs(result, args.out)
        print("\n".join(H.summary_lines(result)))
        print(f"wrote {js} and {png} ({result['elapsed_s']:.0f} s)")
        return 0
    if args.verb in ("sweep", "transfer"):
        return _sweep_or_transfer(args, cfg, _split_overrides(args, extra))
    raise AssertionError(args.verb)


def _sweep_or_transfer(args: argparse.Namespace, cfg, overrides: list[str]) -> int:
    from pathlib import Path

    from mupfast import stability as S
    from mupfast import sweep as W

    study = args.study or (Path(args.config).stem if args.config and args.verb == "sweep" else None)
    if not study:
        raise ConfigError(f"{args.verb}: --study NAME is required")
    storage = args.storage or W.default_storage(study)
    th = S.Thresholds(
        spike_factor=args.spike_factor, max_grad_ratio=args.max_grad_ratio, max_abs_logit=args.max_logit
    )
    if args.verb == "transfer":
        from mupfast import coord_check as C
        from mupfast import transfer_config as T

        target = args.target or args.config
        if not target:
            raise ConfigError("transfer: --target FILE (the target model's config) is required")
        st = W.load_study(storage, study)
        out = args.out or f"runs/transfer/{study}"
        written = T.write_target_configs(
            st,
            top_k=1 if args.top_k is None else args.top_k,
            target=target,
            out=out,
            overrides=overrides,
            th=th,
            proxy_world_size=C.parse_positive_int(args.proxy_world_size, "--proxy-world-size"),
            target_world_size=C.parse_positive_int(args.target_world_size, "--target-world-size"),
        )
        print(T.summary(st, written))
        return 0
    if args.report:
        st = W.load_study(storage, study)
        print(
            S.report(
                st,
                top_k=10 if args.top_k is None else args.top_k,
                th=th,
                plot_path=args.plot or f"runs/sweeps/{study}-report.png",
            )
        )
        return 0
    if not args.config:
        raise ConfigError("sweep: --config FILE (the proxy model's config) is required")
    st = W.sweep(
        cfg,
        study_name=study,
        storage=storage,
        n_trials=args.trials,
        space=W.load_space(args.space, cfg),
        sampler=args.sampler,
        seed=args.seed,
        pruner=args.pruner,
        sweep_dir=args.sweep_dir,
        launcher=args.launcher,
        gpus=args.gpus,
        threads=args.threads,
        trial_timeout_s=args.trial_timeout,
        keep_checkpoints=args.keep_checkpoints,
        progress=sys.stderr.isatty(),
    )
    print(S.format_best(st, args.top_k or 5))
    print(f"next: mupfast sweep --report --study {study} --storage {W.redact(storage)}")
    return 0


def _user_errors() -> tuple[type[BaseException], ...]:
    from mupfast.data import DataError
    from mupfast.engine import CheckpointError
    from mupfast.parametrization import ParametrizationError

    return (ConfigError, DataError, CheckpointError, ParametrizationError, FileNotFoundError, PermissionError)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return run(argv)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from mupfast.train import TrainingError

        if isinstance(e, _user_errors()):
            print(f"error: {e}", file=sys.stderr)
            return USAGE_ERROR
        if isinstance(e, TrainingError):
            print(f"error: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
