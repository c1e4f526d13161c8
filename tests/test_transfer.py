"""The μTransfer test: its optimum finding and drift on curves whose answer is known, and the sweep
end to end through the real trainer on a tiny grid (resumable, diverged runs counted as +inf)."""

import json
import math
import statistics
from pathlib import Path

import pytest

import mupfast.checks.transfer_check as transfer_test
import mupfast.train as trainer
import mupfast.tuning.launch as grid_runs
from mupfast.checks.transfer_plot import table_lines
from mupfast.cli import main as cli_main
from mupfast.errors import ConfigError, TrainingError
from mupfast.flags import parse_lrs, parse_parametrizations
from mupfast.parametrization import RULES_VERSION
from tests.helpers import tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GRID = [2.0**e for e in range(-12, -4)]  # 2^-12 … 2^-5


def _parabola(vertex_log2: float, curvature: float = 0.3, floor: float = 2.0) -> list[float]:
    return [floor + curvature * (math.log2(lr) - vertex_log2) ** 2 for lr in GRID]


@pytest.mark.parametrize("vertex", [-10.0, -9.3, -8.5, -7.75, -6.1])
def test_optimum_of_a_parabola_is_its_grid_neighbour_and_the_fit_is_exact(vertex):
    opt = transfer_test.find_optimum(GRID, _parabola(vertex))
    assert opt["log2_lr"] == round(vertex) if vertex != -8.5 else opt["log2_lr"] in (-9, -8)
    assert opt["lr"] == GRID[opt["index"]] and not opt["at_edge"]
    assert opt["fit_log2_lr"] == pytest.approx(vertex, abs=1e-9)  # three points determine a parabola


def test_optimum_at_the_grid_edge_is_flagged_and_diverged_points_never_win():
    falling = [3.0 - 0.1 * i for i in range(len(GRID))]  # best lr beyond the largest one
    opt = transfer_test.find_optimum(GRID, falling)
    assert opt["index"] == len(GRID) - 1 and opt["at_edge"] and opt["fit_log2_lr"] == -5
    curve = _parabola(-6.2)
    curve[-2:] = [math.inf, math.nan]  # the two largest lrs diverged
    opt = transfer_test.find_optimum(GRID, curve)
    assert opt["log2_lr"] == -7 and opt["fit_log2_lr"] == -7  # no fit through a diverged neighbour
    assert transfer_test.find_optimum(GRID, [math.inf] * len(GRID))["index"] is None


def test_drift_counts_grid_steps_between_the_extreme_optima():
    sp_like = [transfer_test.find_optimum(GRID, _parabola(v)) for v in (-6.0, -7.0, -8.2, -9.1)]
    mup_like = [transfer_test.find_optimum(GRID, _parabola(v)) for v in (-7.2, -6.9, -7.1, -7.3)]
    assert transfer_test.drift(sp_like)["grid_steps"] == 3
    assert transfer_test.drift(sp_like)["fit_log2"] == pytest.approx(3.1)
    assert transfer_test.drift(mup_like)["grid_steps"] == 0
    assert transfer_test.drift(mup_like)["fit_log2"] == pytest.approx(0.4)
    assert grid_runs.mean_loss([2.0, math.inf]) == math.inf and grid_runs.mean_loss([2.0, 3.0]) == 2.5


def test_lr_grid_parsing():
    assert parse_lrs("2^-5,2**-7, 1e-3") == sorted([2**-5, 2**-7, 1e-3])
    for bad in ("2^-5,abc", "2^-5,-1e-3", "2^-5", "1e-3,1e-3"):
        with pytest.raises(ConfigError, match="--lrs"):
            parse_lrs(bad)


def test_bad_flags_print_one_line(capsys):
    cases = [
        (["--widths", "64,abc"], "--widths: 'abc' is not a positive integer"),
        (["--widths", "64,128", "--depths", "2,4"], "not both"),
        (["--lrs", "fast,slow"], "--lrs: 'fast' is not a number"),
        (["--jobs", "0"], "--jobs: '0' is not a positive integer"),
    ]
    for args, message in cases:
        assert cli_main(["transfer-test", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (args, err)


def test_sweep_runs_end_to_end_resumes_and_counts_divergence_as_inf(tmp_path, monkeypatch):
    cfg = tiny_config("train.log_every=1", "schedule.kind=constant", tmp_path=tmp_path)
    trained = []
    real = trainer.train

    def train_or_diverge(point_cfg):
        trained.append(point_cfg.train.run_dir)
        if point_cfg.optim.lr > 0.01 and point_cfg.model.hidden_size == 64:
            raise TrainingError("stopping: 5 non-finite losses in a row")  # as the trainer does
        return real(point_cfg)

    monkeypatch.setattr(trainer, "train", train_or_diverge)
    kwargs = dict(lrs=[2**-8, 2**-5], widths=[32, 64], steps=3, out=tmp_path / "tt", jobs=1, progress=False)
    result = transfer_test.transfer_test(cfg, **kwargs)
    assert len(trained) == 8  # 2 parametrizations × 2 widths × 2 lrs
    for p in ("sp", "mup"):
        curves = result["results"][p]["curves"]
        assert set(curves) == {"32", "64"}
        assert all(math.isfinite(v) and 1.0 < v < 6.0 for v in curves["32"]["val_loss"])
        assert curves["64"]["val_loss"][1] == math.inf  # the diverged point
        assert curves["64"]["optimum"]["index"] == 0
        assert result["results"][p]["drift"]["grid_steps"] in (0, 1)
    run = tmp_path / "tt" / "runs" / "mup" / "width64" / "lr2^-8" / "seed0"
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
    assert not (run / "checkpoints").exists()  # the sweep keeps metrics, not weights

    js, png = transfer_test.write_outputs(result, tmp_path / "tt")
    saved = json.loads(js.read_text())
    assert saved["results"]["sp"]["curves"]["64"]["val_loss"][1] is None  # inf → null in the JSON
    assert saved["base_config"] == cfg.to_dict()  # overrides included: the JSON says what was run
    assert png.stat().st_size > 10_000
    assert len(table_lines(result)) >= 2

    # A second call finds every point done (the diverged one too) and trains nothing.
    trained.clear()
    again = transfer_test.transfer_test(cfg, **kwargs)
    assert trained == []
    assert again["results"]["mup"]["curves"] == result["results"]["mup"]["curves"]
    # A point whose saved config differs (here: more steps) is run again instead of reused.
    args = dict(
        axis="width", sizes=[32, 64], lrs=[2**-8], seeds=1, parametrizations=["mup"], out=tmp_path / "tt"
    )
    assert all(
        grid_runs.finished_loss(pt) is not None for pt in transfer_test.make_points(cfg, steps=3, **args)
    )
    assert all(grid_runs.finished_loss(pt) is None for pt in transfer_test.make_points(cfg, steps=4, **args))
    # So is one made under older rules (the same config trained differently then).
    point = transfer_test.make_points(cfg, steps=3, **args)[0]
    summary_path = Path(point.run_dir) / "summary.json"
    summary = json.loads(summary_path.read_text())
    assert summary["rules_version"] == RULES_VERSION
    summary_path.write_text(json.dumps({**summary, "rules_version": RULES_VERSION - 1}))
    assert grid_runs.finished_loss(point) is None


def test_depth_variant_in_worker_processes(tmp_path):
    cfg = tiny_config("schedule.kind=constant", tmp_path=tmp_path)
    assert transfer_test.default_parametrizations("depth") == ["mup", "completep"]
    result = transfer_test.transfer_test(
        cfg,
        lrs=[2**-8, 2**-6],
        depths=[1, 2],
        steps=2,
        parametrizations=["completep"],
        out=tmp_path / "depth",
        jobs=2,
        progress=False,
    )
    assert result["axis"] == "depth" and result["sizes"] == [1, 2]
    for d in ("1", "2"):
        assert all(math.isfinite(v) for v in result["results"]["completep"]["curves"][d]["val_loss"])
    run = tmp_path / "depth" / "runs" / "completep" / "depth2" / "lr2^-6" / "seed0"
    saved = (run / "config.yaml").read_text()
    assert "mup_base_num_layers: 1" in saved and "num_layers: 2" in saved
    assert (run.parent / "seed0.log").is_file()  # the worker's DeepSpeed output, off the terminal


def test_hyperp_points_grid_the_base_lr_at_the_smallest_models_own_batch_depth_and_horizon(tmp_path):
    from mupfast.parametrization import hyperp_transfer

    cfg = tiny_config(tmp_path=tmp_path)
    assert parse_parametrizations("mup, hyperp") == ["mup", "hyperp"]
    with pytest.raises(ConfigError, match="choose from sp, mup, completep, hyperp"):
        parse_parametrizations("mup,muon")
    grids = transfer_test.lr_grids(["mup", "hyperp"], [2**-9, 2**-8], [2**-5, 2**-4, 2**-3])
    assert grids == {"mup": [2**-9, 2**-8], "hyperp": [2**-5, 2**-4, 2**-3]}
    common = dict(seeds=1, parametrizations=["mup", "hyperp"], steps=7, out=tmp_path)
    by_depth = transfer_test.make_points(cfg, axis="depth", sizes=[1, 4], lrs=grids, **common)
    hyperp = [pt for pt in by_depth if pt.parametrization == "hyperp"]
    assert len(by_depth) == 2 * 2 + 2 * 3 and len(hyperp) == 6
    for pt in hyperp:
        c = cfg.train
        batch = c.seq_len * c.micro_batch_size * c.grad_accum_steps
        assert pt.cfg.optim.hyperp_base_lr == pt.lr and pt.cfg.optim.hyperp_base_batch_tokens == batch
        assert pt.cfg.optim.hyperp_base_tokens == 7 * batch and pt.cfg.model.hyperp_base_depth == 1
        # η = η0 at the smallest depth, η0·√(1/L) deeper; the token and batch factors are 1.
        assert hyperp_transfer(pt.cfg)["lr"] == pytest.approx(pt.lr * math.sqrt(1 / pt.size), rel=1e-12)
    by_width = transfer_test.make_points(cfg, axis="width", sizes=[32, 64], lrs=grids, **common)
    for pt in by_width:
        if pt.parametrization == "hyperp":  # no width term in the rule: η = η0 at every width
            assert hyperp_transfer(pt.cfg)["lr"] == pytest.approx(pt.lr, rel=1e-12)
            assert pt.cfg.model.hyperp_base_depth == cfg.model.num_layers


def test_equal_compute_comparison_takes_each_parametrizations_own_optimum_and_its_seed_spread(tmp_path):
    from experiments.equal_compute import best_per_size, markdown_table

    def curve(losses_per_seed, lrs):
        means = [sum(v) / len(v) for v in losses_per_seed]
        return {
            "val_loss": means,
            "val_loss_per_seed": losses_per_seed,
            "optimum": transfer_test.find_optimum(lrs, means),
        }

    mup_lrs, hyp_lrs = [2**-9, 2**-8, 2**-7], [2**-5, 2**-4, 2**-3]
    result = {
        "axis": "width",
        "sizes": [64],
        "lrs": mup_lrs,
        "steps": 10,
        "tokens_per_step": 512,
        "seeds": 2,
        "results": {
            "mup": {
                "lrs": mup_lrs,
                "curves": {"64": curve([[2.5, 2.6], [2.40, 2.42], [2.45, 2.5]], mup_lrs)},
            },
            "hyperp": {
                "lrs": hyp_lrs,
                "curves": {"64": curve([[2.3, 2.3], [2.2, 2.24], [2.6, 2.7]], hyp_lrs)},
            },
        },
    }
    run = tmp_path / "runs" / "hyperp" / "width64" / "lr2^-4"
    for s, speed in enumerate((1000.0, 3000.0)):
        (run / f"seed{s}").mkdir(parents=True)
        (run / f"seed{s}" / "summary.json").write_text(json.dumps({"tokens_per_s": speed}))
    cmp = best_per_size(result, tmp_path)
    mup, hyp = cmp["best"]["64"]["mup"], cmp["best"]["64"]["hyperp"]
    assert (mup["lr"], hyp["lr"]) == (2**-8, 2**-4)  # each at its own best lr
    assert hyp["val_loss"] == pytest.approx(2.22) and hyp["per_seed"] == [2.2, 2.24]
    assert hyp["gap"] == 0 and mup["gap"] == pytest.approx(0.19)
    assert mup["gap_in_seed_std"] == pytest.approx(0.19 / statistics.stdev([2.2, 2.24]))
    assert hyp["tokens_per_s"] == 2000.0 and mup["tokens_per_s"] is None  # mup's runs are not on disk
    assert cmp["tokens"] == 5120
    table = markdown_table(cmp)
    assert "| 64 | 2.410 ± 0.014 (2^-8) | 2.220 ± 0.028 (2^-4, 2,000 tok/s) |" in table
