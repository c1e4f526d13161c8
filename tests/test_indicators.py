"""Stability indicators (issue 10, point 5) for every parametrization: branch-output RMS and the
outlier share of the residual stream, computed on device during the training forward."""

import pytest
import torch

from mupfast.model import build_model, outlier_share
from tests.helpers import tiny_config


def test_outlier_share_counts_elements_beyond_five_token_sigmas():
    x = torch.randn(2, 8, 256, generator=torch.Generator().manual_seed(0)).clamp(-3, 3)
    assert outlier_share(x).item() == 0.0
    x[0, 3, 7] = 1e3  # one spike in one token: beyond 5σ even counting its own pull on μ and σ
    x[1, 5, 9] = -1e3
    assert outlier_share(x).item() == pytest.approx(2 / x.numel())


@pytest.mark.parametrize("parametrization", ["sp", "mup", "completep", "hyperp"])
def test_branch_rms_and_outlier_share_are_logged_for_every_parametrization(parametrization):
    cfg = tiny_config(f"model.parametrization={parametrization}")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    branch_ms = {"attn": [], "mlp": []}
    for block in model.blocks:
        for name in branch_ms:
            getattr(block, name).register_forward_hook(
                lambda mod, inp, out, name=name, s=block.residual_scale: branch_ms[name].append(
                    (s * out).square().mean().sqrt()
                )
            )
    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(1))
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    stats = model.stability_stats()
    for name in branch_ms:
        got = stats[f"{name}_branch_rms"]
        assert isinstance(got, torch.Tensor) and not got.requires_grad
        assert got.item() == pytest.approx(torch.stack(branch_ms[name]).mean().item(), rel=1e-5)
    assert 0.0 <= stats["outlier_share"].item() < 0.05
    assert "max_abs_logit" in stats
