"""The method (ddpm_diffusion): schedules, the forward process, the loss, the samplers (DPM-Solver++(2M) and (3M),
DDIM, ancestral) pinned to closed forms and to diffusers, the spacings and given timesteps, guidance and its
interval, the bound's terms."""
import math
import re

import pytest
import torch
from torch import nn

from conftest import ClassShift
from ddpm_diffusion import (KARRAS_RHO, Diffusion, SamplerSettings, cosine_beta_schedule,
                            discretized_gaussian_log_likelihood, extract, guided_prediction, linear_beta_schedule,
                            make_schedule, normal_kl, scaled_beta_range, sigmoid_beta_schedule)
from ddpm_sample import describe_sampling


def test_extract_broadcasts_per_example():
    a = torch.arange(10.0)
    out = extract(a, torch.tensor([3, 7]), (2, 3, 4, 4))
    assert out.shape == (2, 1, 1, 1) and out.flatten().tolist() == [3.0, 7.0]


def test_q_sample_closed_form(diffusion):
    x0 = torch.full((2, 3, 8, 8), 0.5)
    noise = torch.randn_like(x0)
    t = torch.tensor([10, 90])
    ab = torch.cumprod(1 - cosine_beta_schedule(100), 0)
    expected = torch.stack([ab[i].sqrt() * x0[j] + (1 - ab[i]).sqrt() * noise[j] for j, i in enumerate(t)])
    assert torch.allclose(diffusion.q_sample(x0, t, noise), expected.float(), atol=1e-6)


@pytest.mark.parametrize("step", [0, 30, 99])
def test_q_sample_mean_and_variance_over_draws(diffusion, step):
    torch.manual_seed(0)
    x0 = torch.full((20000, 1, 2, 2), -0.4)
    t = torch.full((20000,), step)
    xt = diffusion.q_sample(x0, t)
    ab = diffusion.alphas_cumprod[step].item()
    assert xt.mean().item() == pytest.approx(ab ** 0.5 * -0.4, abs=0.01)
    assert xt.var().item() == pytest.approx(1 - ab, rel=0.02, abs=2e-4)


def test_posterior_matches_closed_form(diffusion):
    b = cosine_beta_schedule(100)
    a = 1 - b
    ab = torch.cumprod(a, 0)
    x0, xt = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    t = torch.tensor([1, 50, 99])
    mean, var, log_var = diffusion.q_posterior_mean_variance(x0, xt, t)
    for j, i in enumerate(t.tolist()):
        # μ̃_t = √ᾱ_{t−1} β_t / (1 − ᾱ_t) x_0 + √α_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t) x_t ;  β̃_t = (1 − ᾱ_{t−1}) / (1 − ᾱ_t) β_t
        c0 = ab[i - 1].sqrt() * b[i] / (1 - ab[i])
        ct = a[i].sqrt() * (1 - ab[i - 1]) / (1 - ab[i])
        assert torch.allclose(mean[j], (c0 * x0[j] + ct * xt[j]).float(), atol=1e-5)
        beta_tilde = ((1 - ab[i - 1]) / (1 - ab[i]) * b[i]).item()
        assert var[j].item() == pytest.approx(beta_tilde, rel=1e-5)
        assert log_var[j].exp().item() == pytest.approx(beta_tilde, rel=1e-4)
    _, var0, log_var0 = diffusion.q_posterior_mean_variance(x0, xt, torch.tensor([0, 0, 0]))
    assert (var0 == 0).all() and torch.isfinite(log_var0).all()


def test_predict_start_from_noise_inverts_q_sample(diffusion):
    x0, noise, t = torch.rand(4, 3, 8, 8) * 2 - 1, torch.randn(4, 3, 8, 8), torch.tensor([0, 5, 50, 99])
    assert torch.allclose(diffusion.predict_start_from_noise(diffusion.q_sample(x0, t, noise), t, noise), x0,
                          atol=2e-3)


class GaussianOptimalEps(nn.Module):
    """E[ε | x_t] when x_0 ~ N(mu, s²) per pixel: √(1−ᾱ)(x_t − √ᾱ mu) / (ᾱ s² + 1 − ᾱ)."""
    num_classes = None

    def __init__(self, diffusion, mu, s):
        super().__init__()
        self.d, self.mu, self.s = diffusion, mu, s

    def forward(self, x, t, class_labels=None):
        ab = extract(self.d.alphas_cumprod, t, x.shape)
        return (1 - ab).sqrt() * (x - ab.sqrt() * self.mu) / (ab * self.s ** 2 + 1 - ab)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m"])
def test_reverse_process_reproduces_gaussian_data(sampler):
    """With the optimal ε for Gaussian data, T = 1000 reverse steps give back the data's mean and std."""
    d = Diffusion(1000, cosine_beta_schedule)
    mu, s = 0.2, 0.3  # almost all mass inside [−1, 1], where sample() clamps its output
    torch.manual_seed(0)
    x = d.sample(GaussianOptimalEps(d, mu, s), (4000, 1, 4, 4), SamplerSettings(sampler, steps=1000),
                 clip_denoised=False)
    assert x.shape == (4000, 1, 4, 4)
    assert x.mean().item() == pytest.approx(mu, abs=0.005)
    assert x.std().item() == pytest.approx(s, rel=0.02)


def test_ddim_error_shrinks_with_more_steps():
    d = Diffusion(100, cosine_beta_schedule)
    noise = torch.randn(4000, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    errors = [abs(d.sample(GaussianOptimalEps(d, 0.2, 0.3), noise.shape, SamplerSettings("ddim", steps=n),
                           noise=noise, clip_denoised=False).std().item() - 0.3) for n in (10, 25, 100)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.015


def test_p_sample_is_algorithm_2(diffusion):
    """x_{t−1} = 1/√α_t (x_t − β_t/√(1−ᾱ_t) ε_θ) + √β̃_t z   (Algorithm 2, line 4, with σ_t² = β̃_t)."""
    d = Diffusion(100, lambda T: linear_beta_schedule(1e-3, 0.2, T))
    model = GaussianOptimalEps(d, 0.1, 0.7)
    x, z = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    for step in (60, 0):
        t = torch.full((2,), step)
        beta, ab = d.betas[step], d.alphas_cumprod[step]
        expected = (x - beta / (1 - ab).sqrt() * model(x, t)) / (1 - beta).sqrt()
        if step > 0:
            expected = expected + d.posterior_variance[step].sqrt() * z
        out = d.p_sample(model, x, t, step, clip_denoised=False, noise=z)
        assert torch.allclose(out, expected, atol=1e-5)


def test_ddim_with_eta_one_is_ddpm_step(diffusion):
    model = GaussianOptimalEps(diffusion, 0.0, 0.6)
    x, z = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    t = torch.full((2,), 40)
    ddpm = diffusion.p_sample(model, x, t, 40, clip_denoised=False, noise=z)
    ddim = diffusion.ddim_step(model, x, t, 39, eta=1.0, clip_denoised=False, noise=z)
    assert torch.allclose(ddpm, ddim, atol=1e-5)


@pytest.mark.parametrize("w", [0.0, 1.0, 3.0, 7.5])
def test_classifier_free_guidance(w):
    model = ClassShift()
    x, t, labels = torch.randn(3, 3, 4, 4), torch.tensor([1, 2, 3]), torch.tensor([0, 4, 9])
    eps_uncond = model(x, t, torch.full_like(labels, 10))
    eps_cond = model(x, t, labels)
    out = guided_prediction(model, x, t, labels, w)
    assert torch.allclose(out, eps_uncond + w * (eps_cond - eps_uncond), atol=1e-5)
    if w == 0:
        assert torch.equal(out, eps_uncond)
    if w == 1:
        assert torch.equal(out, eps_cond)


def test_guidance_uses_one_batched_forward():
    calls = []

    class Recorder(ClassShift):
        def forward(self, x, t, class_labels=None):
            calls.append(len(x))
            return super().forward(x, t, class_labels)

    guided_prediction(Recorder(), torch.randn(5, 3, 4, 4), torch.zeros(5, dtype=torch.long), torch.arange(5), 3.0)
    assert calls == [10]


def test_p_losses_types(diffusion):
    x0, noise, t = torch.zeros(2, 3, 8, 8), torch.ones(2, 3, 8, 8), torch.tensor([3, 4])
    zero_model = ClassShift()
    zero_model.forward = lambda x, t, c=None: torch.zeros_like(x)  # predicts ε = 0: error is exactly 1
    assert diffusion.p_losses(zero_model, x0, t, noise, "l2").item() == pytest.approx(1.0)
    assert diffusion.p_losses(zero_model, x0, t, noise, "l1").item() == pytest.approx(1.0)
    assert diffusion.p_losses(zero_model, x0, t, noise, "huber").item() == pytest.approx(0.5)
    with pytest.raises(ValueError):
        diffusion.p_losses(zero_model, x0, t, noise, "l3")


def test_sample_shape_and_range(diffusion):
    model = ClassShift()
    for sampler in ("dpm++2m", "ddim", "ddpm"):
        settings = SamplerSettings(sampler, guidance_scale=2.0)
        out = diffusion.sample(model, (3, 3, 8, 8), settings, torch.tensor([0, 1, 2]))
        assert out.shape == (3, 3, 8, 8) and out.min() >= -1 and out.max() <= 1


class GaussianOptimalV(GaussianOptimalEps):
    """The same optimal predictor expressed as v = √ᾱ ε − √(1−ᾱ) x̂_0, x̂_0 = (x_t − √(1−ᾱ) ε)/√ᾱ."""

    def forward(self, x, t, class_labels=None):
        eps = super().forward(x, t)
        ab = extract(self.d.alphas_cumprod, t, x.shape)
        x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()
        return ab.sqrt() * eps - (1 - ab).sqrt() * x0


def test_v_target_closed_form(diffusion):
    x0, noise, t = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.tensor([5, 80])
    ab = diffusion.alphas_cumprod[t].view(2, 1, 1, 1)
    assert torch.allclose(diffusion.v_target(x0, t, noise), ab.sqrt() * noise - (1 - ab).sqrt() * x0, atol=1e-6)


def test_v_prediction_samples_like_eps_prediction():
    eps_diffusion = Diffusion(100, cosine_beta_schedule)
    v_diffusion = Diffusion(100, cosine_beta_schedule, prediction="v")
    x, z = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    for step in (90, 40, 0):
        t = torch.full((3,), step)
        a = eps_diffusion.p_sample(GaussianOptimalEps(eps_diffusion, 0.2, 0.3), x, t, step, noise=z)
        b = v_diffusion.p_sample(GaussianOptimalV(v_diffusion, 0.2, 0.3), x, t, step, noise=z)
        assert torch.allclose(a, b, atol=1e-4)


def test_v_prediction_loss_is_zero_for_the_true_v():
    d = Diffusion(100, cosine_beta_schedule, prediction="v")
    x0, noise, t = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4), torch.tensor([0, 10, 50, 99])

    class TrueV(nn.Module):
        num_classes = None

        def forward(self, x_t, t_, class_labels=None):
            return d.v_target(x0, t_, noise)

    assert d.p_losses(TrueV(), x0, t, noise).item() == pytest.approx(0, abs=1e-10)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_weights(prediction):
    gamma = 5.0
    d = Diffusion(100, cosine_beta_schedule, prediction=prediction, min_snr_gamma=gamma)
    plain = Diffusion(100, cosine_beta_schedule, prediction=prediction)

    class Zero(nn.Module):
        num_classes = None

        def forward(self, x, t, class_labels=None):
            return torch.zeros_like(x)

    x0, noise = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    for step in (0, 30, 99):
        t = torch.tensor([step])
        ab = cosine_beta_schedule(100).neg().add(1).cumprod(0)[step].item()
        snr = ab / (1 - ab)
        weight = min(snr, gamma) / (snr if prediction == "eps" else snr + 1)
        assert d.p_losses(Zero(), x0, t, noise).item() == pytest.approx(
            weight * plain.p_losses(Zero(), x0, t, noise).item(), rel=1e-4)


def test_default_steps_are_25_or_t_and_ddpm_always_runs_t():
    assert SamplerSettings().for_timesteps(1000).steps == 25
    assert SamplerSettings().for_timesteps(10).steps == 10
    assert SamplerSettings("ddim", steps=7).for_timesteps(10).steps == 7
    assert SamplerSettings("ddpm", steps=7).for_timesteps(10).steps == 10
    with pytest.raises(ValueError, match="1..10"):
        SamplerSettings("dpm++2m", steps=11).for_timesteps(10)
    with pytest.raises(ValueError, match="unknown sampler"):
        SamplerSettings("euler")


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


def linear_betas(timesteps):
    return linear_beta_schedule(*scaled_beta_range(timesteps), timesteps)


class Float64Torch:
    """torch, but its float32 is float64: diffusers' DPMSolverMultistepScheduler.step casts the sample to float32."""

    def __getattr__(self, name):
        return torch.float64 if name == "float32" else getattr(torch, name)


@pytest.mark.parametrize("steps", [[999, 700, 400, 200, 90, 30, 5, 0], 20, [999, 500, 0]])
def test_third_order_solver_is_diffusers_dpm_solver_3m(steps, monkeypatch):
    """dpm++3m = DPMSolverMultistepScheduler(solver_order=3, algorithm_type='dpmsolver++', final_sigmas_type='zero')
    on the same timesteps, in float64 to 1e-12: first order on step 1, second on step 2 (the warm-up), second onto the
    last timestep below 15 steps (lower_order_final), x̂_0 onto σ = 0. The scheduler's own float32 rounding of x and
    of σ is taken out (its σ set from the same ᾱ in float64); dpm++2m differs by far more."""
    from diffusers import DPMSolverMultistepScheduler
    from diffusers.schedulers import scheduling_dpmsolver_multistep
    monkeypatch.setattr(scheduling_dpmsolver_multistep, "torch", Float64Torch())
    d = Diffusion(1000, linear_betas, dtype=torch.float64)
    steps = d.sampling_timesteps(steps, "lambda") if isinstance(steps, int) else steps
    model = GaussianOptimalEps(d, MU, S)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    scheduler = DPMSolverMultistepScheduler(1000, trained_betas=linear_betas(1000).numpy(), solver_order=3,
                                            algorithm_type="dpmsolver++", final_sigmas_type="zero")
    scheduler.set_timesteps(timesteps=steps)
    alpha_bar = d.alphas_cumprod[steps]
    scheduler.sigmas = torch.cat([((1 - alpha_bar) / alpha_bar).sqrt(), torch.zeros(1, dtype=torch.float64)])
    theirs = x
    for t in scheduler.timesteps:
        theirs = scheduler.step(model(theirs, t.repeat(len(x))), t, theirs).prev_sample
    ours = d.dpm_solver_3m(model, x, steps, None, [1.0] * len(steps), clip_denoised=False)
    assert (ours - theirs).abs().max() < 1e-12
    if len(steps) > 3:
        second = d.dpm_solver_2m(model, x, steps, None, [1.0] * len(steps), clip_denoised=False)
        assert (second - theirs).abs().max() > 1e-5


def test_third_order_beats_second_on_gaussian_data_at_few_steps():
    d = Diffusion(1000, linear_betas)
    noise = torch.randn(4000, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    target, model = exact_flow(d, noise), GaussianOptimalEps(d, MU, S)
    error = {sampler: (d.sample(model, noise.shape, SamplerSettings(sampler, steps=6), noise=noise,
                                clip_denoised=False).double() - target).pow(2).mean().sqrt().item()
             for sampler in ("dpm++2m", "dpm++3m")}
    assert error["dpm++3m"] < error["dpm++2m"], error


def test_karras_spacing_is_even_in_sigma_to_the_one_over_rho():
    """EDM's σ_i = (σ_max^{1/ρ} + i/(N−1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, each the timestep nearest in λ = −log σ."""
    d = Diffusion(1000, linear_betas)
    sigma = torch.tensor(d.noise_levels, dtype=torch.float64)
    ramp = torch.linspace(sigma[-1] ** (1 / KARRAS_RHO), sigma[0] ** (1 / KARRAS_RHO), 10, dtype=torch.float64)
    expected = [int((sigma.log() - target.log() * KARRAS_RHO).abs().argmin()) for target in ramp]
    assert d.sampling_timesteps(10, "karras") == expected
    assert expected[0] == 999 and expected[-1] == 0 and expected == sorted(set(expected), reverse=True)


def test_given_timesteps_are_the_steps_sampled():
    d = Diffusion(50, cosine_beta_schedule)
    settings = SamplerSettings("dpm++3m", timesteps=[49, 30, 12, 0])
    assert settings.timesteps == (49, 30, 12, 0) and settings.steps == 4
    assert d.sampler_timesteps(settings) == [49, 30, 12, 0]
    model, x = ClassShift(), torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(d.sample(model, x.shape, settings, noise=x),
                       d.dpm_solver_3m(model, x, [49, 30, 12, 0], None, [3.0] * 4).clamp(-1, 1))


@pytest.mark.parametrize("settings, words", [
    (dict(timesteps=[49, 30, 30, 0]), "strictly decreasing"),
    (dict(timesteps=[49, 30, -1]), "≥ 0"),
    (dict(timesteps=[49, 30.0, 0]), "whole numbers"),
    (dict(timesteps=[]), "whole numbers"),
    (dict(timesteps=[49, 0], steps=3), "3 steps but 2 timesteps"),
    (dict(sampler="ddim", timesteps=[49, 0]), "apply to dpm++2m and dpm++3m, not ddim"),
])
def test_given_timesteps_are_checked(settings, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        SamplerSettings(**settings)


@pytest.mark.parametrize("timesteps", [[40, 20, 0], [60, 20, 0]])
def test_given_timesteps_start_at_t_minus_one(timesteps):
    with pytest.raises(ValueError, match="the first timestep must be T − 1 = 49"):
        SamplerSettings(timesteps=timesteps).for_timesteps(50)


W = 2.5
LABELS = torch.tensor([0, 3, 9])
SAMPLERS = [SamplerSettings("dpm++2m", steps=8), SamplerSettings("ddim", steps=8), SamplerSettings("ddpm")]


def noise_levels(diffusion):
    """σ_t = √(1 − ᾱ_t)/√ᾱ_t of every timestep, in float64 from the β alone."""
    alpha_bar = torch.cumprod(1 - cosine_beta_schedule(diffusion.timesteps), 0)
    return (1 / alpha_bar - 1).sqrt()


class IntervalGuided(torch.nn.Module):
    """ClassShift guided as the interval says, computed here from t: w inside (σ_lo, σ_hi], 1 outside. Sampling it
    unguided must equal sampling ClassShift with the interval."""
    num_classes = None

    def __init__(self, sigmas, interval):
        super().__init__()
        self.sigmas, self.interval = sigmas, interval

    def forward(self, x, t, class_labels=None):
        inside = self.interval[0] < self.sigmas[int(t[0])] <= self.interval[1]
        return guided_prediction(ClassShift(), x, t, LABELS, W if inside else 1.0)


class CountingShift(ClassShift):
    """ClassShift that records the batch size of every forward."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def forward(self, x, t, class_labels=None):
        self.batches.append(len(x))
        return super().forward(x, t, class_labels)


def test_the_scale_is_w_inside_the_interval_and_1_outside():
    """15 λ-spaced steps of T = 1000 (the shipped model's sampler): σ_t runs 20291 … 0.0064, and the interval
    (0.28, 2.9] of Kynkäänniemi et al.'s ImageNet-512 record holds the 10th and 11th (σ = 1.346, 0.462)."""
    d = Diffusion(1000, cosine_beta_schedule)
    settings = SamplerSettings("dpm++2m", steps=15, guidance_scale=W, guidance_interval=(0.28, 2.9))
    steps = d.sampler_timesteps(settings)
    assert steps == [999, 998, 997, 996, 995, 992, 980, 943, 839, 589, 269, 92, 27, 5, 0]
    assert [round(s, 3) for s in noise_levels(d)[[589, 269]].tolist()] == [1.346, 0.462]
    assert d.guidance_scales(settings, steps) == [1.0] * 9 + [W, W] + [1.0] * 4
    everywhere = SamplerSettings("dpm++2m", steps=15, guidance_scale=W)
    assert d.guidance_scales(everywhere, steps) == [W] * 15


def test_the_interval_is_open_below_and_closed_above():
    d = Diffusion(50, cosine_beta_schedule)
    sigmas = noise_levels(d)
    steps = list(range(49, -1, -1))
    settings = SamplerSettings("ddpm", guidance_scale=W, guidance_interval=(sigmas[10].item(), sigmas[20].item()))
    scales = d.guidance_scales(settings, steps)
    assert [t for t, w in zip(steps, scales) if w == W] == list(range(20, 10, -1))  # 20 in, 10 out


@pytest.mark.parametrize("settings", SAMPLERS, ids=lambda s: s.sampler)
def test_w_inside_the_interval_and_the_conditional_prediction_outside(settings):
    d = Diffusion(20, cosine_beta_schedule)
    sigmas = noise_levels(d)
    interval = (sigmas[4].item(), sigmas[13].item())
    noise = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(0))

    def sample(model, settings, labels):
        torch.manual_seed(1)  # the same per-step noise for ddpm
        return d.sample(model, noise.shape, settings, labels, noise=noise)

    guided = SamplerSettings(settings.sampler, settings.steps, guidance_scale=W, guidance_interval=interval)
    with_interval = sample(ClassShift(), guided, LABELS)
    assert torch.equal(with_interval, sample(IntervalGuided(sigmas, interval), settings, None))
    everywhere = sample(ClassShift(), SamplerSettings(settings.sampler, settings.steps, guidance_scale=W), LABELS)
    assert not torch.equal(with_interval, everywhere)
    # an interval holding every step is no interval; one holding none is w = 1
    assert torch.equal(everywhere, sample(ClassShift(), SamplerSettings(
        settings.sampler, settings.steps, guidance_scale=W, guidance_interval=(0, 1e9)), LABELS))
    conditional = sample(ClassShift(), SamplerSettings(settings.sampler, settings.steps, guidance_scale=1), LABELS)
    assert torch.equal(conditional, sample(ClassShift(), SamplerSettings(
        settings.sampler, settings.steps, guidance_scale=W, guidance_interval=(1e8, 1e9)), LABELS))


@pytest.mark.parametrize("settings", SAMPLERS, ids=lambda s: s.sampler)
def test_steps_outside_the_interval_take_one_forward_of_the_n_batch(settings):
    d = Diffusion(20, cosine_beta_schedule)
    sigmas = noise_levels(d)
    interval = (sigmas[4].item(), sigmas[13].item())
    model = CountingShift()
    settings = SamplerSettings(settings.sampler, settings.steps, guidance_scale=W, guidance_interval=interval)
    d.sample(model, (3, 3, 4, 4), settings, LABELS)
    steps = d.sampler_timesteps(settings)
    assert model.batches == [6 if 4 < t <= 13 else 3 for t in steps]
    assert 3 in model.batches and 6 in model.batches  # both kinds of step happen


def test_settings_normalise_and_check_the_interval():
    assert SamplerSettings(guidance_interval=[0.28, 2.9]).guidance_interval == (0.28, 2.9)  # as JSON keeps it
    assert SamplerSettings(guidance_interval=(0, math.inf)).guidance_interval is None  # every step
    for bad in [(2.9, 0.28), (-1, 1), (1, 1), (1,), (0, 1, 2), (0, math.nan)]:
        with pytest.raises(ValueError, match="two noise levels"):
            SamplerSettings(guidance_interval=bad)
    assert (describe_sampling(SamplerSettings("dpm++2m", 15, guidance_scale=2, guidance_interval=(0.28, 2.9)))
            == "dpm++2m, 15 steps (lambda spacing), guidance 2 for σ in (0.28, 2.9]")


class ZeroNoise(torch.nn.Module):
    num_classes = None

    def forward(self, x, t, class_labels=None):
        return torch.zeros_like(x)


@pytest.mark.parametrize("index, variance, expected", [
    (500, "beta", math.sqrt(0.01005995995995996)),        # β_501 = 1e-4 + (0.02 − 1e-4) · 500/999
    (999, "beta", math.sqrt(0.02)),                       # β_T
    (1, "beta", math.sqrt(0.00011991991991991993)),       # β_2
    (1, "posterior", math.sqrt(5.4531876613021935e-05)),  # β̃_2 = β_2 (1 − ᾱ_1)/(1 − ᾱ_2)
    (0, "beta", 0.0),                                     # the last step adds no noise
])
def test_the_ancestral_step_draws_with_beta_or_the_posterior_variance(index, variance, expected):
    """x_t = 0 and ε̂ = 0 make x̂_0 = 0 and the mean 0: x_{t−1} = σ_t · noise, with noise 1."""
    diffusion = Diffusion(1000, lambda T: make_schedule("linear", T))
    x, t = torch.zeros(1, 3, 2, 2), torch.full((1,), index)
    step = diffusion.p_sample(ZeroNoise(), x, t, index, noise=torch.ones(1, 3, 2, 2), variance=variance)
    assert step.flatten().tolist() == pytest.approx([expected] * 12, rel=1e-6)
    assert math.exp(diffusion.log_betas_decoder_clipped[0].item()) == pytest.approx(5.4531876613021935e-05, rel=1e-6)


LN2 = math.log(2)


def phi(x):
    """The standard normal CDF, from math.erf: independent of torch.special."""
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def test_normal_kl_is_the_closed_form():
    # KL(N(0, 1) ‖ N(1, 4)) = ½ (log 4 + 1/4 + 1/4 − 1)
    kl = normal_kl(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(1.0), torch.tensor(math.log(4)))
    assert kl.item() == pytest.approx(0.5 * (math.log(4) - 0.5), abs=1e-7)
    assert normal_kl(torch.tensor(0.3), torch.tensor(-2.0), torch.tensor(0.3), torch.tensor(-2.0)).item() == 0


def test_discretized_gaussian_gives_each_pixel_its_bins_mass():
    h = 1 / 255  # half a bin
    cases = [  # (x, mean, σ, the bin's mass)
        (0.0, 0.0, h, phi(1) - phi(-1)),                      # an inner bin one σ each side
        (-1.0, -1.0, h, phi(1)),                              # x = −1: the bin reaches to −∞
        (1.0, 1.0, h, 1 - phi(-1)),                           # x = 1: to +∞
        (0.2, 0.5, 0.1, phi((0.2 - 0.5 + h) / 0.1) - phi((0.2 - 0.5 - h) / 0.1)),
        (0.6, 0.1, 0.05, 0.5 * (math.erfc((0.5 - h) / (0.05 * math.sqrt(2)))
                                - math.erfc((0.5 + h) / (0.05 * math.sqrt(2))))),
        # ten σ out, in the upper tail: a mass of 10⁻²³ (1 − Φ(x) = erfc(x/√2)/2)
    ]
    x, mean, sigma, mass = (torch.tensor(v, dtype=torch.float64) for v in zip(*cases))
    log_p = discretized_gaussian_log_likelihood(x, mean, sigma.log())
    assert torch.allclose(log_p, mass.log(), rtol=1e-9)


def test_the_prior_term_is_the_kl_of_q_x_T_from_the_standard_normal():
    d = Diffusion(10, lambda T: make_schedule("linear", T))
    x0 = torch.tensor([-1.0, 0.0, 0.5, 1.0]).reshape(1, 1, 2, 2)
    a = d.alphas_cumprod[-1].double().item()  # ᾱ_T
    per_dim = [0.5 * (a * x ** 2 + (1 - a) - 1 - math.log(1 - a)) for x in (-1.0, 0.0, 0.5, 1.0)]
    assert d.prior_bpd(x0).item() == pytest.approx(sum(per_dim) / 4 / LN2, rel=1e-6)


class ExactModel(GaussianOptimalEps):
    """The network that knows the data is the one image x* (Gaussian data of spread 0): ε(x_t, t) = (x_t − √ᾱ_t x*) /
    √(1 − ᾱ_t), or v = √ᾱ_t ε − √(1 − ᾱ_t) x*."""

    def __init__(self, diffusion, image, prediction):
        super().__init__(diffusion, image, 0.0)
        self.prediction = prediction

    def forward(self, x, t, class_labels=None):
        eps = super().forward(x, t)
        ab = self.d.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        return eps if self.prediction == "eps" else ab.sqrt() * eps - (1 - ab).sqrt() * self.mu


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("variance", ["posterior", "beta"])
def test_the_bound_of_a_model_that_knows_its_one_image_is_the_closed_form(prediction, variance):
    """x̂_0 = x* exactly, so p_θ's mean is q's: each KL is the variances' alone (0 for β̃_t; ½ (log(β_t/β̃_t) +
    β̃_t/β_t − 1) a dimension for β_t), the decoder is N(x*, β̃_1)'s mass on each pixel's bin, and L_T is the prior."""
    T = 10
    d = Diffusion(T, lambda T: make_schedule("linear", T), prediction=prediction)
    pixels = torch.tensor([0, 255, 128, 17, 200, 64, 3, 250, 99, 180, 40, 222], dtype=torch.float64)
    image = (pixels / 127.5 - 1).reshape(1, 3, 2, 2)
    torch.manual_seed(0)
    terms, prior = d.bound_terms(ExactModel(d, image.float(), prediction), image.float(), variance=variance)

    betas = make_schedule("linear", T)
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    posterior = betas[1:] * (1 - alphas_cumprod[:-1]) / (1 - alphas_cumprod[1:])   # β̃ at indices 1 … T−1
    kl = 0.5 * ((betas[1:] / posterior).log() + posterior / betas[1:] - 1) if variance == "beta" else 0 * posterior
    sigma = posterior[0].sqrt().item()                                              # β̃ at index 1, the decoder's
    h = 1 / 255
    masses = [phi(h / sigma) if p in (0, 255) else phi(h / sigma) - phi(-h / sigma) for p in pixels.tolist()]
    decoder = -sum(math.log(m) for m in masses) / len(masses) / LN2
    expected = torch.cat([torch.tensor([decoder], dtype=torch.float64), kl / LN2])
    assert torch.allclose(terms[0].double(), expected, atol=1e-6)
    assert prior.item() == pytest.approx(d.prior_bpd(image.float()).item())
    assert (terms.sum() + prior).item() == pytest.approx(expected.sum().item() + prior.item(), abs=1e-5)


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
