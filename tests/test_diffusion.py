"""The diffusion process pinned to closed forms: forward marginals, posterior, reverse process, guidance."""
import pytest
import torch
from torch import nn

from ddpm_diffusion import (Diffusion, SamplerSettings, cosine_beta_schedule, extract, guided_prediction,
                            linear_beta_schedule)
from ddpm_sample import describe_sampling, generate, guidance_sweep


@pytest.fixture
def diffusion():
    return Diffusion(100, cosine_beta_schedule)


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


class ClassShift(nn.Module):
    """ε = x · 0.1 + label (null label: 10), so guided combinations are easy to read."""
    num_classes = 10

    def forward(self, x, t, class_labels=None):
        labels = torch.full_like(t, 10) if class_labels is None else class_labels
        return x * 0.1 + labels.float().view(-1, 1, 1, 1)


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


def test_sampler_settings_describe_themselves_as_metrics_record_them():
    assert describe_sampling(SamplerSettings()) == "dpm++2m, default steps (lambda spacing), guidance 3.0"
    assert describe_sampling(SamplerSettings(spacing="time").for_timesteps(100)) == \
        "dpm++2m, 25 steps (time spacing), guidance 3.0"
    assert describe_sampling(SamplerSettings("ddpm").for_timesteps(100)) == "ddpm, 100 steps, guidance 3.0"
    assert describe_sampling(SamplerSettings("ddim", steps=25, eta=0.5, guidance_scale=1.5)) == \
        "ddim, 25 steps, eta 0.5, guidance 1.5"


def test_default_steps_are_25_or_t_and_ddpm_always_runs_t():
    assert SamplerSettings().for_timesteps(1000).steps == 25
    assert SamplerSettings().for_timesteps(10).steps == 10
    assert SamplerSettings("ddim", steps=7).for_timesteps(10).steps == 7
    assert SamplerSettings("ddpm", steps=7).for_timesteps(10).steps == 10
    with pytest.raises(ValueError, match="1..10"):
        SamplerSettings("dpm++2m", steps=11).for_timesteps(10)
    with pytest.raises(ValueError, match="unknown sampler"):
        SamplerSettings("euler")


def test_generate_in_batches_from_a_seed_leaves_the_callers_rng_alone(diffusion):
    model, labels = ClassShift(), torch.tensor([0, 1, 2, 3, 4])
    settings = SamplerSettings("ddim", steps=5, eta=0.5, guidance_scale=2.0)
    torch.manual_seed(0)
    caller_state = torch.get_rng_state()
    images = generate(diffusion, model, settings, 5, 8, 3, labels, batch_size=2, seed=7)
    assert torch.equal(torch.get_rng_state(), caller_state)
    torch.manual_seed(7)  # the same draws, batch by batch: 2 + 2 + 1
    expected = torch.cat([diffusion.sample(model, (len(part), 3, 8, 8), settings, part) for part in labels.split(2)])
    assert images.shape == (5, 3, 8, 8) and torch.equal(images, expected)


def test_guidance_sweep_rows_are_generate_at_each_scale_from_one_seed(diffusion):
    model, classes = ClassShift(), [1, 6]
    settings = SamplerSettings("ddim", steps=4, eta=1.0)
    rows = guidance_sweep(diffusion, model, settings, [0.0, 2.0], classes, 8, 3, seed=5).view(2, 2, 3, 8, 8)
    for row, w in zip(rows, (0.0, 2.0)):
        expected = generate(diffusion, model, SamplerSettings("ddim", steps=4, eta=1.0, guidance_scale=w), 2, 8, 3,
                            torch.tensor(classes), seed=5)
        assert torch.equal(row, expected)
