"""Noise schedules against their closed forms at fixed t."""
import math

import pytest
import torch

from ddpm_diffusion import (Diffusion, cosine_beta_schedule, linear_beta_schedule, make_schedule,
                            sigmoid_beta_schedule)


def test_linear_schedule_values():
    betas = linear_beta_schedule(1e-4, 0.02, 1000)
    assert betas.shape == (1000,)
    for t in (0, 1, 500, 999):
        assert betas[t].item() == pytest.approx(1e-4 + t * (0.02 - 1e-4) / 999, rel=1e-12)


def test_cosine_schedule_values():
    T, s = 100, 0.008

    def f(t):
        return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2

    betas = cosine_beta_schedule(T)
    for t in (0, 1, 50, 98):  # paper step t+1: β = 1 − ᾱ_{t+1}/ᾱ_t with ᾱ_t = f(t)/f(0)
        assert betas[t].item() == pytest.approx(1 - f(t + 1) / f(t), rel=1e-10)
    assert betas[-1].item() == pytest.approx(0.999)  # 1 − f(T)/f(T−1) = 1, clipped
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    assert alphas_cumprod[49].item() == pytest.approx(f(50) / f(0), rel=1e-10)


def test_sigmoid_schedule_values():
    betas = sigmoid_beta_schedule(1e-4, 0.02, 101)
    for t, x in ((0, -6.0), (50, 0.0), (100, 6.0)):
        assert betas[t].item() == pytest.approx(1e-4 + (0.02 - 1e-4) / (1 + math.exp(-x)), rel=1e-12)
    assert betas[50].item() == pytest.approx((1e-4 + 0.02) / 2, rel=1e-12)


@pytest.mark.parametrize("name", ["linear", "cosine", "sigmoid"])
@pytest.mark.parametrize("T", [10, 100, 1000])
def test_schedules_valid_and_alpha_bar_monotone(name, T):
    betas = make_schedule(name, T)
    assert betas.shape == (T,) and betas.dtype == torch.float64
    assert ((betas > 0) & (betas < 1)).all()
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    assert (alphas_cumprod[1:] < alphas_cumprod[:-1]).all()
    assert alphas_cumprod[-1] < 0.01  # x_T is close to pure noise at every T (β range scaled by 1000/T)


def test_diffusion_buffers_float32_and_consistent():
    d = Diffusion(100, cosine_beta_schedule)
    assert d.betas.dtype == torch.float32
    assert torch.allclose(d.alphas_cumprod, torch.cumprod(1 - cosine_beta_schedule(100), 0).float())
    assert d.alphas_cumprod_prev[0] == 1 and d.posterior_variance[0] == 0


def test_diffusion_rejects_bad_schedule():
    with pytest.raises(ValueError):
        Diffusion(10, lambda T: torch.linspace(0, 1.5, T))
