"""experiments/hparam_transfer.py: a non-lr hyperparameter gridded at two widths, through the trainer.

Three steps per run at widths 32 and 64: what is checked is the bookkeeping — every run trained once,
each width's optimum the lowest of its own curve, the drift the distance between them, a rerun
reusing the finished runs — not what the values are at this length.
"""

from __future__ import annotations

import json
import math

from experiments.hparam_transfer import main

FLAGS = ["--widths", "32,64", "--values", "1,4", "--seeds", "1", "--jobs", "1", "--set",
         "model.embeddings_scale=1", "optim.lr=2^-8", "train.steps=3", "schedule.warmup_steps=1",
         "train.eval_batches=1"]  # fmt: skip


def test_grid_at_two_widths_finds_each_optimum_and_the_drift(tmp_path):
    ref = tmp_path / "compare.json"
    ref.write_text(json.dumps({"target": {"width": 256}, "best": {"sp": 1.7, "mutransfer": 1.75}}))
    argv = [
        *FLAGS,
        "--runs",
        str(tmp_path / "runs"),
        "--out",
        str(tmp_path),
        "--name",
        "t",
        "--reference",
        str(ref),
    ]
    assert main(argv) == 0
    res = json.loads((tmp_path / "t.json").read_text())
    assert res["key"] == "model.output_logits_alpha" and res["widths"] == [32, 64]
    idx = []
    for w in ("32", "64"):
        c = res["curves"][w]
        assert all(math.isfinite(v) for v in c["val_loss"])
        best = min(range(2), key=lambda i: c["val_loss"][i])
        assert c["optimum"]["index"] == best and c["optimum"]["lr"] == res["values"][best]
        idx.append(best)
    assert res["drift"]["grid_steps"] == abs(idx[0] - idx[1])
    assert res["reference"]["sp_tuned"] == 1.7 and (tmp_path / "t.png").stat().st_size > 10_000
    # Each run kept its value: the two values' runs differ in the saved config and in the loss.
    saved = sorted((tmp_path / "runs" / "width64").glob("*/seed0/summary.json"))
    assert len(saved) == 2 and res["curves"]["64"]["val_loss"][0] != res["curves"]["64"]["val_loss"][1]
    stamp = [p.stat().st_mtime_ns for p in saved]
    assert main(argv) == 0  # rerun: the finished runs are reused, not trained again
    assert [p.stat().st_mtime_ns for p in saved] == stamp
