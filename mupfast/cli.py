"""``mupfast <verb> --config FILE [section.key=value ...]``.

Every verb takes a config and dotted overrides. Problems with the user's input (config, data,
checkpoints) print one line ``error: …`` and exit with code 2; no traceback.

A verb is a module with ``add_arguments(parser)`` (its own flags) and ``run(args) -> int``; the
table below names them. Only the verb being run is imported, so ``mupfast explain`` does not load
the sweep's or the exporter's dependencies.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from mupfast.errors import ConfigError, UserError

#: verb → (the module that implements it, one line of help). Adding a verb: a module and a line here.
VERBS: dict[str, tuple[str, str]] = {
    "train": ("mupfast.train", "train (or resume) a model; works under the deepspeed launcher"),
    "explain": (
        "mupfast.explain",
        "print the parametrization table: init, lr and wd multipliers, forward multipliers",
    ),
    "import-config": (
        "mupfast.config.import_config",
        "translate a Cerebras Model Zoo config into a mupfast config that trains the same μP model",
    ),
    "prepare-data": (
        "mupfast.data.prepare",
        "tokenize the corpus into token shards (cached; training does this itself)",
    ),
    "coord-check": (
        "mupfast.checks.coord_check",
        "coordinate check: every layer's output size vs width, per parametrization (JSON + PNG)",
    ),
    "transfer-test": (
        "mupfast.checks.transfer_check",
        "μTransfer test: lr sweep per width (or depth) through the trainer (JSON + PNG)",
    ),
    "horizon-test": (
        "mupfast.checks.horizon_check",
        "token-horizon check: optimal lr (or weight decay) vs training tokens, fitted exponent (JSON + PNG)",
    ),
    "batch-test": (
        "mupfast.checks.batch_check",
        "batch-size check: optimal lr vs tokens per step at a fixed token budget, fitted exponent (JSON + PNG)",
    ),
    "sweep": (
        "mupfast.tuning.sweep.sweep",
        "proxy hyperparameter sweep (Optuna; each trial a training run); --report to rank it",
    ),
    "transfer": (
        "mupfast.tuning.transfer.transfer",
        "write target configs from a sweep's best stable trials (μTransfer)",
    ),
    "transfer-compare": (
        "mupfast.tuning.transfer_compare.transfer_compare",
        "μTransfer vs SP tuned at the target: loss, FLOPs",
    ),
    "pbt": (
        "mupfast.tuning.pbt.pbt",
        "population-based training on the proxy (exploit/explore); --report to draw it",
    ),
    "finetune": (
        "mupfast.finetune.finetune",
        "fine-tune a trained run with LoRA, AdaLoRA or AdaMoLE adapters (the base stays frozen)",
    ),
    "export": (
        "mupfast.export.export",
        "fold every μP multiplier into the weights; write a Hugging Face model (Llama/GPT-2)",
    ),
    "generate": (
        "mupfast.export.generate",
        "sample text from a run's latest checkpoint (KV cache, streamed)",
    ),
}

#: Exit status after Ctrl-C (128 + SIGINT, as a shell reports it).
INTERRUPTED = 130


def _parser(verb: str | None) -> argparse.ArgumentParser:
    """The parser, with the flags of ``verb`` (the one being run) added from its module."""
    p = argparse.ArgumentParser(prog="mupfast", description="μP-native, kernel-backed LLM trainer")
    sub = p.add_subparsers(dest="verb", required=True)
    for name, (module, help) in VERBS.items():
        v = sub.add_parser(name, help=help, description=help)
        v.add_argument("--config", help="YAML config file (defaults apply to anything it leaves out)")
        v.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
        v.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-3")
        if name == verb:
            importlib.import_module(module).add_arguments(v)
    return p


def _split_overrides(overrides: list[str], extra: list[str]) -> list[str]:
    """The positional overrides plus any ``--section.key=value`` the parser did not know."""
    out = list(overrides)
    for item in extra:
        if item.startswith("--") and "=" in item and "." in item.split("=", 1)[0]:
            out.append(item[2:])
        else:
            raise ConfigError(f"unrecognised argument {item!r}")
    return out


def run(argv: list[str]) -> int:
    verb = next((a for a in argv if a in VERBS), None)
    args, extra = _parser(verb).parse_known_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    args.overrides = _split_overrides(args.overrides, extra)
    return importlib.import_module(VERBS[args.verb][0]).run(args)


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (as logging's last-resort handler does)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def configure_logging() -> None:
    """Show mupfast's own log lines (e.g. which attention backend ``auto`` chose) on stderr.

    Level INFO unless ``MUPFAST_LOG_LEVEL`` says otherwise; under several ranks each line names its
    rank. Only the ``mupfast`` logger is touched: DeepSpeed's and torch's keep their own settings.
    """
    logger = logging.getLogger("mupfast")
    level = os.environ.get("MUPFAST_LOG_LEVEL", "INFO").upper()
    if not isinstance(logging.getLevelName(level), int):
        raise ConfigError(
            f"MUPFAST_LOG_LEVEL: {level!r} is not a logging level (DEBUG, INFO, WARNING, ERROR)"
        )
    logger.setLevel(level)
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        handler = _Stderr()
        rank = f"[rank {os.environ.get('RANK', '?')}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        handler.setFormatter(logging.Formatter(f"{rank}%(name)s: %(message)s"))
        logger.addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        configure_logging()
        return run(argv)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return INTERRUPTED
    except (UserError, FileNotFoundError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", UserError.exit_code)


def program(argv: list[str] | None = None) -> None:
    """``mupfast`` as a program (the console script, ``python -m mupfast.train`` under a launcher):
    run the verb, leave the process group, exit with the verb's status.

    Leaving the process group before the interpreter exits matters on CPU: gloo's threads would
    otherwise outlive it, and a rank that has finished its work can abort at exit ("terminate called
    without an active exception"), which the launcher reports as a failed run.
    """
    code = main(argv)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if code == 0:
            # Every rank done before any leaves (rank 0 hosts the rendezvous store): under load a rank
            # aborted at exit as above once while rank 0 had already finished. A failed verb skips the
            # barrier: the launcher stops the other ranks.
            dist.barrier()
        dist.destroy_process_group()
    sys.exit(code)


if __name__ == "__main__":
    program()
