"""Fitting a model's steps (ddpm_fit_steps, --fit_steps N): the dynamic programme pinned by hand, the fit on Gaussian
data whose exact sample is known, and the job through the CLI: the checkpoint it writes, what samples with it, what
overrides it, and bad input."""
import hashlib
import math
import types

import pytest
import torch

from conftest import one_line_error, run_main, save_edited
from ddpm_checkpoint import load_checkpoint
from ddpm_diffusion import Diffusion, SamplerSettings, cosine_beta_schedule
from ddpm_fit_steps import cheapest_path, fitted_timesteps, step_costs, teacher_trajectories
from test_diffusion import MU, S, GaussianOptimalEps, exact_flow

INF = math.inf


def test_the_cheapest_path_runs_from_the_first_point_to_the_last():
    """Four points, three steps: 0 → 1 → 3 costs 1 + 1 = 2, less than 0 → 2 → 3 (0.5 + 2) and 0 → 3 alone is one
    step too few; with two steps only 0 → 3 (5) is left."""
    costs = torch.tensor([[INF, 1.0, 0.5, 5.0],
                          [INF, INF, 0.2, 1.0],
                          [INF, INF, INF, 2.0],
                          [INF, INF, INF, INF]], dtype=torch.float64)
    assert cheapest_path(costs, 3) == ([0, 1, 3], 2.0)
    assert cheapest_path(costs, 2) == ([0, 3], 5.0)
    assert cheapest_path(costs, 4) == ([0, 1, 2, 3], 3.2)
    with pytest.raises(ValueError, match="steps must be in 2..4"):
        cheapest_path(costs, 5)


def gaussian_sampler(diffusion):
    """What the fit reads of a Sampler, for the Gaussian-data model that knows E[x_0 | x_t] exactly."""
    return types.SimpleNamespace(diffusion=diffusion, denoiser=GaussianOptimalEps(diffusion, MU, S),
                                 settings=SamplerSettings(guidance_scale=1.0), device=torch.device("cpu"),
                                 config={"model": {"channels": 1}, "image_size": 4})


def test_the_costs_are_ddim_steps_from_the_teacher():
    d = Diffusion(1000, cosine_beta_schedule)
    grid, states, x_zeros, images = teacher_trajectories(gaussian_sampler(d), None, 8, seed=0)
    assert grid == d.sampling_timesteps(100, "lambda") and states.shape == (100, 8, 1, 4, 4)
    assert torch.equal(images, x_zeros[-1])
    costs = step_costs(d, grid, states, x_zeros)
    i, j = 10, 60
    s, t = grid[i], grid[j]
    a, sigma = d.sqrt_alphas_cumprod.double(), d.sqrt_one_minus_alphas_cumprod.double()
    landed = a[t] * x_zeros[i].double() + sigma[t] * (states[i].double() - a[s] * x_zeros[i].double()) / sigma[s]
    rms = (landed - states[j]).flatten(1).pow(2).mean(1).sqrt().mean().item()
    assert costs[i, j].item() == pytest.approx(rms / sigma[t].item() ** 0.5, rel=1e-4)  # RMS over √σ_t
    assert torch.isinf(costs[j, i]) and torch.isinf(costs[i, i])


@pytest.mark.parametrize("steps", [4, 6])
def test_fitted_steps_come_closer_to_the_exact_sample_than_lambda_spacing(steps):
    """Gaussian data: the probability-flow ODE's own answer is known, so the error of each schedule is exact."""
    d = Diffusion(1000, cosine_beta_schedule)
    fitted, _ = fitted_timesteps(gaussian_sampler(d), steps, None, num_samples=64, seed=1)
    assert len(fitted) == steps and fitted[0] == 999 and fitted[-1] == 0
    assert fitted == sorted(set(fitted), reverse=True)
    noise = torch.randn(2000, 1, 4, 4, generator=torch.Generator().manual_seed(2))  # not the noises fitted on
    target, model = exact_flow(d, noise), GaussianOptimalEps(d, MU, S)

    def error(settings):
        x = d.sample(model, noise.shape, settings, noise=noise, clip_denoised=False).double()
        return (x - target).pow(2).mean().sqrt().item()

    lambda_error = error(SamplerSettings("dpm++2m", steps=steps, spacing="lambda"))
    fitted_error = error(SamplerSettings("dpm++2m", timesteps=fitted))
    assert fitted_error < 0.7 * lambda_error, (fitted, fitted_error, lambda_error)


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_fit_writes_a_new_checkpoint_that_samples_with_its_steps(trained):
    source = trained / "models" / "cond" / "ckpt.pt"
    before = digest(source)
    result = run_main("--inference", "--conditional", "--model_path", "models/cond/ckpt.pt", "--fit_steps", "4",
                      "--num_samples", "8", "--no_cuda", cwd=trained)
    assert result.returncode == 0, result.stderr
    assert digest(source) == before
    fitted = load_checkpoint(str(trained / "models" / "cond_fit4" / "ckpt.pt"))
    timesteps = fitted["config"]["sampling"]["timesteps"]
    assert len(timesteps) == 4 and timesteps[0] == 9 and timesteps[-1] == 0
    assert list(timesteps) == sorted(set(timesteps), reverse=True)
    assert fitted["config"]["sampling"]["steps"] == 4 and fitted["config"]["run_name"] == "cond_fit4"
    assert (trained / "models" / "cond_fit4" / "config.json").exists()
    steps_words = f"4 steps at t = {', '.join(map(str, timesteps))}"
    assert steps_words in result.stderr and "RMS distance to the 10-step teacher" in result.stderr

    sampled = run_main("--inference", "--conditional", "--model_path", "models/cond_fit4/ckpt.pt", "--num_samples",
                       "2", "--no_cuda", cwd=trained)
    assert sampled.returncode == 0 and steps_words in sampled.stdout, sampled.stdout + sampled.stderr
    for flags, words in ((["--sampling_steps", "3"], "3 steps (lambda spacing)"),
                         (["--spacing", "time"], "(time spacing)"),
                         (["--sampler", "ddim"], "ddim, 10 steps"),
                         (["--sampling_timesteps", "9,5,0"], "3 steps at t = 9, 5, 0")):
        overridden = run_main("--inference", "--conditional", "--model_path", "models/cond_fit4/ckpt.pt",
                              "--num_samples", "2", "--no_cuda", *flags, cwd=trained)
        assert overridden.returncode == 0 and words in overridden.stdout, overridden.stdout + overridden.stderr

    again = run_main("--inference", "--conditional", "--model_path", "models/cond/ckpt.pt", "--fit_steps", "4",
                     "--num_samples", "8", "--no_cuda", cwd=trained)
    assert "cond_fit4 exists and holds ckpt.pt, config.json: --fit_steps writes a new run folder" in \
        one_line_error(again)


@pytest.mark.parametrize("flags, words", [
    (["--fit_steps", "1"], "--fit_steps must be at least 2"),
    (["--fit_steps", "10"], "--fit_steps 10 must be less than the teacher's 10 steps"),
    (["--fit_steps", "3", "--sampling_steps", "3"], "--fit_steps and --sampling_steps cannot go together"),
    (["--fit_steps", "3", "--sampler", "ddim"], "--fit_steps fits the steps of dpm++2m and dpm++3m; the sampler "
                                                "here is ddim"),
    (["--fit_steps", "3", "--sample_classes", "1"], "drop --sample_classes"),
    (["--fit_steps", "3", "--run_name", "cond"], "models/cond exists and holds best.pt, ckpt.pt"),
])
def test_bad_fits_are_one_line_and_write_nothing(trained, flags, words):
    before = sorted(p.name for p in (trained / "models").iterdir())
    result = run_main("--inference", "--conditional", "--model_path", "models/cond/ckpt.pt", "--num_samples", "4",
                      "--no_cuda", *flags, cwd=trained)
    assert words in one_line_error(result)
    assert sorted(p.name for p in (trained / "models").iterdir()) == before


def test_an_unconditional_model_fits_its_own_steps(trained):
    result = run_main("--inference", "--model_path", "models/uncond/ckpt.pt", "--fit_steps", "3", "--num_samples", "4",
                      "--run_name", "uncond_three", "--no_cuda", cwd=trained)
    assert result.returncode == 0, result.stderr
    sampling = load_checkpoint(str(trained / "models" / "uncond_three" / "ckpt.pt"))["config"]["sampling"]
    assert len(sampling["timesteps"]) == 3 and sampling["timesteps"][0] == 9 and sampling["timesteps"][-1] == 0


def test_an_unconditional_checkpoint_refuses_the_class_flags(trained):
    result = run_main("--inference", "--conditional", "--model_path", "models/uncond/ckpt.pt", "--fit_steps", "3",
                      "--no_cuda", cwd=trained)
    assert "is an unconditional model" in one_line_error(result)


@pytest.mark.parametrize("timesteps, words", [([8, 4, 0], "the first timestep must be T − 1 = 9"),
                                              ([9, 4, 4, 0], "strictly decreasing")])
def test_a_checkpoint_with_bad_stored_timesteps_is_refused(trained, tmp_path, timesteps, words):
    ckpt = load_checkpoint(str(trained / "models" / "cond" / "ckpt.pt"))
    ckpt["config"]["sampling"] = {**ckpt["config"]["sampling"], "steps": None, "timesteps": timesteps}
    save_edited(ckpt, tmp_path / "edited.pt")
    result = run_main("--inference", "--model_path", str(tmp_path / "edited.pt"), "--no_cuda", cwd=trained)
    assert words in one_line_error(result)
