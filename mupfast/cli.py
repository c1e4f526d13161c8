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
    return p


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
    cfg = load_config(args.config, _split_overrides(args, extra))

    if args.verb == "explain":
        from mupfast.parametrization import format_table, rules_table, table_json

        rules = rules_table(cfg.model)
        print(
            json.dumps(table_json(cfg.model, rules), indent=2)
            if args.json
            else format_table(cfg.model, rules)
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
    raise AssertionError(args.verb)


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
