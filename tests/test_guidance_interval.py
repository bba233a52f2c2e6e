"""Guidance in a limited interval (Kynkäänniemi et al. 2024): w where the noise level σ_t = √(1 − ᾱ_t)/√ᾱ_t lies in
(σ_lo, σ_hi], the plain conditional prediction (one forward of the N-batch) elsewhere; for every sampler, in the
checkpoint's sampling settings and on the command line."""
import math

import pytest
import torch
from test_diffusion import ClassShift

import ddpm_config
import ddpm_main
from conftest import TINY_MODEL
from ddpm_checkpoint import load_checkpoint
from ddpm_diffusion import Diffusion, SamplerSettings, cosine_beta_schedule, guided_prediction
from ddpm_sample import describe_sampling

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


@pytest.mark.parametrize("text,interval", [("0.28,2.9", (0.28, 2.9)), ("1,inf", (1.0, math.inf)),
                                           ("all", (0.0, math.inf))])
def test_flag_values(text, interval):
    assert ddpm_config.noise_interval(text) == interval


@pytest.mark.parametrize("text", ["2.9,0.28", "-1,2", "1", "a,b", "1,1", "inf,inf", "nan,1", "1,2,3", ""])
def test_bad_flag_values_exit_2_with_one_line(text, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        ddpm_main.main([f"--guidance_interval={text}", "--data_dir", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "--guidance_interval: expected LO,HI with 0 ≤ LO < HI (HI may be inf), or all" in err
    assert list(tmp_path.iterdir()) == []


def test_the_checkpoint_carries_the_interval_and_inference_can_change_it(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ddpm_main.main(["--data_dir", tiny_data, "--conditional", "--epochs", "1", "--save_model", "--run_name", "g",
                    "--guidance_scale", "2", "--guidance_interval", "0.5,20", "--quiet", *TINY_MODEL])
    assert load_checkpoint("models/g/ckpt.pt")["config"]["sampling"]["guidance_interval"] == (0.5, 20.0)

    def sampled_with(*flags):
        ddpm_main.main(["--inference", "--conditional", "--model_path", "models/g/ckpt.pt", "--num_samples", "2",
                        "--no_cuda", *flags])
        return next(line for line in capsys.readouterr().out.splitlines() if line.startswith("sampling on "))

    assert sampled_with().endswith(": dpm++2m, 10 steps (lambda spacing), guidance 2.0 for σ in (0.5, 20]")
    assert sampled_with("--sampler", "ddim").endswith(": ddim, 10 steps, eta 0.0, guidance 2.0 for σ in (0.5, 20]")
    assert sampled_with("--guidance_interval", "0.1,inf").endswith("guidance 2.0 for σ in (0.1, inf]")
    assert sampled_with("--guidance_interval", "all").endswith(": dpm++2m, 10 steps (lambda spacing), guidance 2.0")
    ddpm_main.main(["--inference", "--model_path", "models/g/ckpt.pt", "--guidance_sweep", "1,3", "--no_cuda",
                    "--quiet", "--run_name", "sweep"])
    assert (tmp_path / "outputs" / "guidance_sweep_sweep.png").stat().st_size > 0
