"""mupfast.model.flops (issue 18, point 4): the FLOP count per token against counts taken from real models
(the Linear layers each token passes through; torch's FlopCounterMode over a training step), the
attention term's scaling, and the nominal-peak lookup behind MFU."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mupfast.config import load_config
from mupfast.model import Transformer, build_model
from mupfast.model.flops import (
    attention_flops_per_token,
    flops_per_token,
    matmul_params_per_token,
    peak_bf16_tflops,
    throughput_metrics,
)
from mupfast.model.moe import SqrtGateMoE
from tests.helpers import ROOT, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MOE = ["model.moe_experts=4", "model.moe_top_k=2"]
VARIANTS = {
    "dense": [],
    "gqa": ["model.num_heads=4", "model.num_kv_heads=2"],
    "mqa-gelu": ["model.num_kv_heads=1", "model.mlp=gelu"],
    "tied": ["model.tie_embeddings=true"],
    "bias-learned-pos": ["model.bias=true", "model.position=learned"],
    "moe": MOE,
    "moe-fine-shared-every2": [*MOE, "model.moe_granularity=2", "model.moe_shared_expert=true"]
    + ["model.moe_every=2", "model.num_layers=4", "model.moe_top_k=3"],
    "moe-gelu": [*MOE, "model.mlp=gelu", "model.moe_top_k=1"],
}


def _batch(cfg, batch: int, seq_len: int):
    g = torch.Generator().manual_seed(seq_len)
    x = torch.randint(0, cfg.model.vocab_size, (batch, seq_len), generator=g)
    y = torch.randint(0, cfg.model.vocab_size, (batch, seq_len), generator=g)
    return x, y


def _lively_routers(model: nn.Module) -> None:
    """Routers far from init, so tokens spread unevenly over the experts (some get none)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SqrtGateMoE):
                m.router.weight.normal_(0, 1.0)


def _params_passed_through(model: Transformer, x: torch.Tensor, y: torch.Tensor) -> float:
    """Per token: Σ over the nn.Linear layers of rows they saw × their weight's size, plus the
    routers (applied as F.linear to every token) and the readout (every token), from one forward."""
    seen = {"weights": 0}

    def count(module, inputs, output):
        rows = inputs[0].reshape(-1, module.in_features).shape[0]
        seen["weights"] += rows * module.weight.numel()

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        model(x, y)
    finally:
        for h in hooks:
            h.remove()
    tokens = x.numel()
    routers = sum(m.router.weight.numel() for m in model.modules() if isinstance(m, SqrtGateMoE))
    return seen["weights"] / tokens + routers + model.readout._weight().numel()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_matmul_params_are_the_weights_a_token_passes_through(name):
    cfg = tiny_config(*VARIANTS[name])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    _lively_routers(model)
    x, y = _batch(cfg, 3, 16)
    counted = _params_passed_through(model, x, y)
    assert matmul_params_per_token(cfg.model) == counted
    expected = 6 * counted + attention_flops_per_token(cfg.model, 16)
    assert flops_per_token(cfg.model, 16) == pytest.approx(expected, rel=1e-12)
    if cfg.model.moe_experts:  # fewer than all experts' weights: only the active ones count
        every_linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
        assert counted < every_linear + model.readout._weight().numel()


@pytest.mark.parametrize("name", ["dense", "gqa", "mqa-gelu", "tied", "moe-fine-shared-every2"])
def test_flops_per_token_equals_torchs_count_of_a_training_step(name):
    """FlopCounterMode over forward + backward, SDPA on its math backend (plain matmuls over the full
    T×T scores, i.e. the non-causal count), divided by the tokens."""
    cfg = tiny_config(*VARIANTS[name])
    torch.manual_seed(1)
    model = build_model(cfg.model)
    _lively_routers(model)
    model.train()
    batch, seq_len = 2, 24
    x, y = _batch(cfg, batch, seq_len)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, y).backward()
    measured = counter.get_total_flops() / x.numel()
    assert flops_per_token(cfg.model, seq_len) == pytest.approx(measured, rel=1e-9)


@pytest.mark.parametrize("config", ["125m.yaml", "1.3b.yaml", "proxy-40m.yaml"])
def test_forward_flops_of_the_real_shapes_are_a_third_of_the_count(config):
    """The target shapes, built on the meta device (no memory, no arithmetic): the forward's matmul
    FLOPs are 2·N + the forward third of the attention term; the backward doubles both."""
    cfg = load_config(ROOT / "configs" / config)
    with torch.device("meta"):
        model = Transformer(cfg.model)
    x = torch.zeros(1, 32, dtype=torch.long, device="meta")
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x)  # the logits path: the readout matmul on every token, as in training
    measured = counter.get_total_flops() / x.numel()
    assert 3 * measured == pytest.approx(flops_per_token(cfg.model, 32), rel=1e-9)


def test_attention_term_is_linear_in_seq_len_and_depth_and_ignores_kv_heads():
    cfg = tiny_config("model.num_heads=4")
    m = cfg.model
    base = flops_per_token(m, 16)
    # Each extra token of context costs 12·L·H·d_head more per token.
    step = 12 * m.num_layers * m.num_heads * m.head_dim
    assert flops_per_token(m, 17) - base == pytest.approx(step)
    assert flops_per_token(m, 64) - base == pytest.approx(48 * step)
    assert attention_flops_per_token(m, 0) == 0
    deeper = tiny_config("model.num_heads=4", "model.num_layers=4").model
    assert attention_flops_per_token(deeper, 16) == 2 * attention_flops_per_token(m, 16)
    gqa = tiny_config("model.num_heads=4", "model.num_kv_heads=1").model
    assert attention_flops_per_token(gqa, 16) == attention_flops_per_token(m, 16)
    assert matmul_params_per_token(gqa) < matmul_params_per_token(m)  # k, v at a quarter of the width


def test_moe_counts_only_the_active_experts():
    """Doubling the experts at fixed top-k adds only router width, not expert FLOPs."""
    few = tiny_config(*MOE).model
    many = tiny_config("model.moe_experts=8", "model.moe_top_k=2").model
    routers = few.num_layers * few.hidden_size * (8 - 4)
    assert matmul_params_per_token(many) - matmul_params_per_token(few) == routers
    # top-k = E with every expert the dense MLP's size: the dense model's experts' work, k times over.
    dense = tiny_config().model
    topk = tiny_config("model.moe_experts=2", "model.moe_top_k=2").model
    ffn = 3 * dense.hidden_size * dense.filter_size
    extra = topk.num_layers * (ffn + 2 * dense.hidden_size)  # a second expert, and the 2-wide router
    assert matmul_params_per_token(topk) - matmul_params_per_token(dense) == extra


@pytest.mark.parametrize(
    "name,peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.4),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100-PCIE-40GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA B200", 2250.0),
    ],
)
def test_known_devices_have_their_nominal_peak(name, peak):
    assert peak_bf16_tflops(name) == peak


@pytest.mark.parametrize(
    "name",
    ["NVIDIA GeForce RTX 4090", "NVIDIA H100 NVL", "NVIDIA GB200", "NVIDIA H1000", "CPU x86_64", ""],
)
def test_unknown_devices_have_no_peak(name):
    assert peak_bf16_tflops(name) is None


def test_throughput_metrics_on_cpu_have_no_mfu_and_no_cuda_memory():
    fpt = flops_per_token(tiny_config().model, 32)
    out = throughput_metrics(12345.0, fpt, torch.device("cpu"))
    assert out == {"tflops": pytest.approx(12345.0 * fpt / 1e12)}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_throughput_metrics_on_cuda_report_mfu_against_the_devices_peak_and_peak_memory():
    device = torch.device("cuda")
    x = torch.empty(1 << 20, device=device)  # something allocated, so the peak is above zero
    out = throughput_metrics(1e5, 1e9, device)
    assert out["tflops"] == pytest.approx(100.0)
    assert out["peak_mem_GiB"] >= x.numel() * 4 / 2**30
    peak = peak_bf16_tflops(torch.cuda.get_device_name(device))
    assert ("mfu" in out) == (peak is not None)
    if peak:
        assert out["mfu"] == pytest.approx(100.0 / peak)
