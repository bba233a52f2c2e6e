"""DPM-Solver++(2M) pinned to a hand computation, to the exact probability-flow ODE of Gaussian data, to
classifier-free guidance and to the v-parametrisation; the λ spacing; the direct x̂_0 of v-models."""
import math

import pytest
import torch

from ddpm_diffusion import (Diffusion, SamplerSettings, cosine_beta_schedule, guided_prediction,
                            linear_beta_schedule, scaled_beta_range)
from test_diffusion import ClassShift, GaussianOptimalEps, GaussianOptimalV

MU, S = 0.2, 0.3  # the Gaussian data N(MU, S²) of GaussianOptimalEps


def schedule64(timesteps):
    """α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t), λ_t = log(α_t / σ_t) of the cosine schedule, in float64, from the β alone."""
    alpha_bar = torch.cumprod(1 - cosine_beta_schedule(timesteps), 0)
    alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    return alpha, sigma, (alpha / sigma).log()


def x_zero_of_gaussian(x, alpha, sigma):
    """E[x_0 | x_t] for x_0 ~ N(MU, S²): MU + α S² (x − α MU) / (α² S² + σ²), in float64."""
    return MU + alpha * S ** 2 * (x - alpha * MU) / (alpha ** 2 * S ** 2 + sigma ** 2)


def test_four_steps_by_hand():
    """Timesteps 80, 60, 30, 5 of T = 100, then x_0: step 1 first order (nothing to extrapolate from), step 2
    second order, step 3 first order (fewer than 15 steps: the one onto the last timestep), step 4 returns x̂_0."""
    d = Diffusion(100, cosine_beta_schedule)
    alpha, sigma, lam = schedule64(100)
    x = torch.linspace(-2, 2, 12, dtype=torch.float64).view(1, 3, 2, 2)
    a, b, c, e = 80, 60, 30, 5
    x0_a = x_zero_of_gaussian(x, alpha[a], sigma[a])
    h1 = lam[b] - lam[a]
    x_b = sigma[b] / sigma[a] * x - alpha[b] * (math.exp(-h1) - 1) * x0_a
    x0_b = x_zero_of_gaussian(x_b, alpha[b], sigma[b])
    h2 = lam[c] - lam[b]
    r2 = h1 / h2
    d2 = (1 + 1 / (2 * r2)) * x0_b - 1 / (2 * r2) * x0_a
    x_c = sigma[c] / sigma[b] * x_b - alpha[c] * (math.exp(-h2) - 1) * d2
    x0_c = x_zero_of_gaussian(x_c, alpha[c], sigma[c])
    h3 = lam[e] - lam[c]
    x_e = sigma[e] / sigma[c] * x_c - alpha[e] * (math.exp(-h3) - 1) * x0_c
    expected = x_zero_of_gaussian(x_e, alpha[e], sigma[e])

    out = d.dpm_solver_2m(GaussianOptimalEps(d, MU, S), x.float(), [a, b, c, e], None, [1.0] * 4, clip_denoised=False)
    assert torch.allclose(out.double(), expected, atol=1e-6, rtol=0)


def exact_flow(d, x_start):
    """Where the probability-flow ODE takes x at t = T−1 for Gaussian data: the standardised value
    z = (x − α MU) / √(α² S² + σ²) is constant along it, so x_0 = MU + S z."""
    alpha, sigma = d.sqrt_alphas_cumprod[-1].double(), d.sqrt_one_minus_alphas_cumprod[-1].double()
    return MU + S * (x_start.double() - alpha * MU) / (alpha ** 2 * S ** 2 + sigma ** 2).sqrt()


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_ten_steps_recover_gaussian_data_closer_than_ddim(schedule):
    betas = cosine_beta_schedule if schedule == "cosine" else lambda T: linear_beta_schedule(*scaled_beta_range(T), T)
    d = Diffusion(1000, betas)
    noise = torch.randn(4000, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    target = exact_flow(d, noise)  # the ODE's own answer for this noise: no sampling error in the comparison
    model = GaussianOptimalEps(d, MU, S)

    def errors(settings):
        x = d.sample(model, noise.shape, settings, noise=noise, clip_denoised=False).double()
        return abs(x.mean() - target.mean()).item(), abs(x.std() - target.std()).item()

    ddim_mean, ddim_std = errors(SamplerSettings("ddim", steps=10))
    for spacing in ("time", "lambda"):
        mean_error, std_error = errors(SamplerSettings("dpm++2m", steps=10, spacing=spacing))
        assert mean_error < ddim_mean and std_error < ddim_std, (spacing, mean_error, ddim_mean, std_error, ddim_std)
    assert ddim_std > 0.05  # 10-step DDIM is visibly off: the comparison means something


def test_guided_solver_follows_guided_prediction():
    """The solver guides exactly as guided_prediction does: sampling the guided model equals sampling a model
    whose output is guided_prediction's, unguided."""
    d = Diffusion(50, cosine_beta_schedule)
    model, labels, w = ClassShift(), torch.tensor([0, 3, 9]), 2.5

    class Guided(torch.nn.Module):
        num_classes = None

        def forward(self, x, t, class_labels=None):
            return guided_prediction(model, x, t, labels, w)

    x = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    steps = d.sampling_timesteps(6)
    guided = d.dpm_solver_2m(model, x, steps, labels, [w] * len(steps), clip_denoised=True)
    assert torch.equal(guided, d.dpm_solver_2m(Guided(), x, steps, None, [w] * len(steps), clip_denoised=True))
    assert not torch.equal(guided, d.dpm_solver_2m(model, x, steps, labels, [1.0] * len(steps), clip_denoised=True))


@pytest.mark.parametrize("spacing", ["time", "lambda"])
def test_eps_model_and_equivalent_v_model_give_the_same_samples(spacing):
    """The linear schedule: at t = T−1 of the cosine one (√ᾱ ≈ 1e-4) an ε-model's own x̂_0 = (x − σ ε̂)/α loses
    about 1e-4 to float32, which is the ε-parametrisation's limit, not the solver's."""
    linear = lambda T: linear_beta_schedule(*scaled_beta_range(T), T)  # noqa: E731
    eps_diffusion = Diffusion(1000, linear)
    v_diffusion = Diffusion(1000, linear, prediction="v")
    noise = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    settings = SamplerSettings("dpm++2m", steps=15, spacing=spacing)
    a = eps_diffusion.sample(GaussianOptimalEps(eps_diffusion, MU, S), noise.shape, settings, noise=noise)
    b = v_diffusion.sample(GaussianOptimalV(v_diffusion, MU, S), noise.shape, settings, noise=noise)
    assert torch.allclose(a, b, atol=1e-5)


def test_v_model_x_zero_is_exact_even_at_t_max():
    """x̂_0 = √ᾱ x_t − √(1−ᾱ) v̂ directly: at t = T−1 of the cosine schedule (√ᾱ ≈ 1e-4) the detour through ε̂
    would lose about 5e-3 to float32 cancellation."""
    d = Diffusion(1000, cosine_beta_schedule, prediction="v")
    x_zero, noise = torch.rand(4, 3, 8, 8) * 2 - 1, torch.randn(4, 3, 8, 8)
    t = torch.full((4,), 999)
    x_t = d.q_sample(x_zero, t, noise)

    class TrueV(torch.nn.Module):
        num_classes = None

        def forward(self, x, t_, class_labels=None):
            return d.v_target(x_zero, t_, noise)

    eps, predicted = d.model_predictions(TrueV(), x_t, t)
    assert (predicted - x_zero).abs().max() < 1e-6
    assert (eps - noise).abs().max() < 1e-6
    detour = d.predict_start_from_noise(x_t, t, eps)  # what v̂ → ε̂ → x̂_0 gives
    assert (detour - x_zero).abs().max() > 1e-4


def test_lambda_spacing_is_even_in_lambda():
    d = Diffusion(1000, lambda T: linear_beta_schedule(*scaled_beta_range(T), T))
    steps = d.sampling_timesteps(10, "lambda")
    assert steps[0] == 999 and steps[-1] == 0 and steps == sorted(set(steps), reverse=True)
    gaps = (d.half_log_snr[steps[1:]] - d.half_log_snr[steps[:-1]]).double()
    even = (d.half_log_snr[0] - d.half_log_snr[999]).item() / 9
    assert torch.allclose(gaps, torch.full_like(gaps, even), rtol=0.05)


@pytest.mark.parametrize("steps", [1, 2, 9, 10])
def test_lambda_spacing_gives_distinct_timesteps_down_to_zero(steps):
    """Where λ moves fast (t near 0 and T−1 of the cosine schedule), nearest indices would collide: they are moved."""
    d = Diffusion(10, cosine_beta_schedule)
    spaced = d.sampling_timesteps(steps, "lambda")
    assert len(spaced) == steps and spaced == sorted(set(spaced), reverse=True)
    assert spaced[0] == 9 and (steps == 1 or spaced[-1] == 0)
    if steps == 10:
        assert spaced == list(range(9, -1, -1))
