"""Runs ``mupfast.train`` (under the deepspeed launcher) counting the collectives mupfast itself
issues, by calling module; each rank writes ``collectives_rank<r>.json`` into the run directory."""

import json
import sys
from collections import Counter
from pathlib import Path

import torch.distributed as dist

from mupfast.cli import main

COUNTED = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "broadcast",
    "reduce_scatter_tensor",
    "reduce_scatter_single",
)
counts: Counter = Counter()


def _counting(name, fn):
    def wrapper(*args, **kwargs):
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("mupfast."):
            counts[f"{caller}.{name}"] += 1
        return fn(*args, **kwargs)

    return wrapper


if __name__ == "__main__":
    for name in COUNTED:
        setattr(dist, name, _counting(name, getattr(dist, name)))
    code = main(["train", *sys.argv[1:]])
    cfg_path = sys.argv[sys.argv.index("--config") + 1]
    import yaml

    run_dir = Path(yaml.safe_load(open(cfg_path))["train"]["run_dir"])
    (run_dir / f"collectives_rank{dist.get_rank()}.json").write_text(json.dumps(counts))
    sys.exit(code)
