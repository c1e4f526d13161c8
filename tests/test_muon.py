"""Newton–Schulz orthogonalisation and the Muon-on-the-sphere (MuonH) update."""

import pytest
import torch

from mupfast.optim.muon import NS_COEFFS, NS_STEPS, muon_sphere_update, newton_schulz

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Measured: the quintic map x ↦ 3.4445x − 4.7750x³ + 2.0315x⁵, applied 5 times, sends every
# normalised singular value σ/‖G‖_F ≥ 2e-3 into [0.6818, 1.2024] (its maximum on [0, 1]).
# Gaussian matrices with aspect ratio ≥ 2 came out within [0.682, 1.135] in every draw we tried.
BAND = (0.68, 1.21)
GAUSSIAN_BAND = (0.68, 1.14)


def _scalar_map(x: torch.Tensor) -> torch.Tensor:
    a, b, c = NS_COEFFS
    for _ in range(NS_STEPS):
        x = a * x + b * x**3 + c * x**5
    return x


def _with_spectrum(shape, s, gen):
    """A random matrix with singular values s (descending), and its singular vectors."""
    m, n = shape
    u, _ = torch.linalg.qr(torch.randn(m, len(s), generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(s), generator=gen, dtype=torch.float64))
    return u @ torch.diag(s) @ v.T, u, v


@pytest.mark.parametrize("shape", [(32, 32), (64, 16), (16, 64), (96, 40), (40, 96)])
def test_newton_schulz_sends_singular_values_into_a_band_around_one(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    k = min(shape)
    # A spread of 200× (down to ≥ 2e-3 of ‖G‖_F): every singular value must land in the band.
    s = torch.logspace(0, -2.3, k, dtype=torch.float64)
    assert s.min() / s.norm() >= 2e-3
    s = s * 3.7  # the scale of the input does not matter
    g, u, v = _with_spectrum(shape, s, gen)
    out = newton_schulz(g.float())
    assert out.shape == shape and out.dtype == torch.float32
    sv = torch.linalg.svdvals(out.double())
    assert BAND[0] <= sv.min() and sv.max() <= BAND[1], (sv.min().item(), sv.max().item())
    # Same singular vectors, singular values moved by the scalar quintic map (orientation correct).
    expected = u @ torch.diag(_scalar_map(s / s.norm())) @ v.T
    assert (out.double() - expected).norm() / expected.norm() < 1e-4

    gauss = torch.randn(shape[0] * 2, shape[1], generator=gen)  # aspect ratio ≥ 2
    sv = torch.linalg.svdvals(newton_schulz(gauss).double())
    assert GAUSSIAN_BAND[0] <= sv.min() and sv.max() <= GAUSSIAN_BAND[1], (sv.min().item(), sv.max().item())


def test_newton_schulz_keeps_the_input_dtype_and_batches():
    g = torch.randn(3, 24, 8, generator=torch.Generator().manual_seed(1)).half()
    out = newton_schulz(g)
    assert out.dtype == torch.float16 and out.shape == g.shape
    for i in range(3):
        ref = newton_schulz(g[i].float())
        assert (out[i].float() - ref).norm() / ref.norm() < 1e-2


@pytest.mark.parametrize("shape", [(48, 48), (96, 32), (32, 96)])
def test_sphere_radius_holds_after_200_steps_of_random_gradients(shape):
    gen = torch.Generator().manual_seed(7)
    w = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.05)
    r0 = w.detach().double().norm().item()
    state: dict = {}
    for _ in range(200):
        grad = torch.randn(shape, generator=gen) * torch.rand((), generator=gen).item() * 10
        muon_sphere_update(w, grad, state, lr=0.05)
    assert abs(w.detach().double().norm().item() / r0 - 1) < 1e-6
    assert torch.isfinite(w).all()


def test_a_zero_gradient_leaves_the_matrix_alone():
    w = torch.randn(16, 8)
    before = w.clone()
    muon_sphere_update(w, torch.zeros_like(w), {}, lr=0.1)
    torch.testing.assert_close(w, before, rtol=1e-6, atol=0)


def test_steps_reduce_a_quadratic_loss_on_the_sphere():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(24, 40, generator=gen)
    target = torch.randn(24, 40, generator=gen)
    target *= w.norm() / target.norm()  # reachable: on the same sphere

    def loss(x):
        return 0.5 * (x - target).square().sum().item()

    state: dict = {}
    losses = [loss(w)]
    for _ in range(30):
        muon_sphere_update(w, w - target, state, lr=0.05)
        losses.append(loss(w))
    assert losses[1] < losses[0]  # the very first step already helps
    assert losses[-1] < 0.2 * losses[0]
    assert w.norm().item() == pytest.approx(state["radius"].item(), rel=1e-6)
