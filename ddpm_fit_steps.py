"""Fitting a model's sampling steps (--fit_steps N): the N timesteps at which DPM-Solver++ best follows a many-step
teacher from the same noise, found by dynamic programming over the teacher's own grid (GITS: Chen et al. 2024,
"On the Trajectory Regularity of ODE-based Diffusion Sampling", §4).

The teacher is DPM-Solver++(3M) on TEACHER_STEPS timesteps evenly spaced in λ, run at the checkpoint's own sampling
settings (guidance scale and interval, class-balanced labels) from FIT_SAMPLES noises; it keeps x and x̂_0 at every
grid point. One DDIM step from the teacher's x at grid point i to grid point j costs the RMS distance of where it lands
from the teacher's x at j, over √σ_j (σ_j = √(1 − ᾱ_j), the noise's standard deviation in x_j): every cost comes
from the teacher's evaluations, none more. The N-step path from T − 1 to 0 (where the sampler's last x̂_0 is the
image, as with every spacing) with the least summed cost is the fit: minutes on a CPU, and no gradient through the
network (LD3's way, Tong et al. 2025, needs one per step and sample).
"""
import dataclasses
import math
import sys
import time

import torch

from ddpm_checkpoint import load_checkpoint, refuse_existing_run, write_new_run
from ddpm_diffusion import SAMPLERS, samplers_where
from ddpm_helpers import RunFiles, UserError, stderr_is_terminal
from ddpm_sample import balanced_labels, describe_sampling

TEACHER_STEPS = 100  # the teacher's grid: the fitted steps are chosen among these timesteps
FIT_SAMPLES = 256    # teacher trajectories by default (--num_samples)
# A step's RMS distance is divided by σ_j^COST_SIGMA_POWER. Plain RMS (0) spends the steps at high noise, where x moves
# most: the shipped model's 8 such steps lost detail (precision 0.68); in noise units (1) they lost variety (recall
# 0.42); 0.5 kept both and read FID-1k 41.9 against 44.7 and 44.2 (docs/sampling.md, bench/step_table.json).
COST_SIGMA_POWER = 0.5


@torch.no_grad()
def teacher_trajectories(sampler, labels, num_samples, seed, progress=False):
    """(grid, states, x_zeros, images) of the teacher from num_samples noises of `seed` (class labels (N,) or None):
    its timesteps (G,), T − 1 first, x and x̂_0 at each (G, N, C, H, W), and the images it ends at (N, C, H, W), its
    last x̂_0."""
    diffusion, settings = sampler.diffusion, sampler.settings
    grid = diffusion.sampling_timesteps(min(TEACHER_STEPS, diffusion.timesteps), "lambda")
    shape = (num_samples, sampler.config["model"]["channels"], sampler.config["image_size"],
             sampler.config["image_size"])
    generator = torch.Generator(sampler.device).manual_seed(seed)
    noise = torch.randn(shape, generator=generator, device=sampler.device)
    states, x_zeros = [], []
    diffusion.dpm_solver_multistep(sampler.denoiser, noise, grid, labels, diffusion.guidance_scales(settings, grid),
                                   progress=progress, trace=x_zeros, order=3, states=states)
    return grid, torch.stack(states).float(), torch.stack(x_zeros).float(), x_zeros[-1].float()


def step_costs(diffusion, grid, states, x_zeros):
    """costs (G, G): costs[i, j] the RMS distance, averaged over the samples, of one DDIM step from the teacher's x at
    grid[i] to grid[j] (i < j; ∞ elsewhere) from the teacher's x there, over σ_j^COST_SIGMA_POWER."""
    alpha, sigma = diffusion.sqrt_alphas_cumprod.double().cpu(), diffusion.sqrt_one_minus_alphas_cumprod.double().cpu()
    costs = torch.full((len(grid), len(grid)), math.inf, dtype=torch.float64)
    for i, s in enumerate(grid):
        for j in range(i + 1, len(grid)):
            t = grid[j]
            # DDIM (eq. 12, η = 0): x_t = α_t x̂_0 + σ_t (x_s − α_s x̂_0) / σ_s
            landed = (sigma[t] / sigma[s]).item() * states[i] + (alpha[t] - sigma[t] * alpha[s] / sigma[s]).item() \
                * x_zeros[i]
            rms = (landed - states[j]).flatten(1).pow(2).mean(1).sqrt().mean().item()
            costs[i, j] = rms / sigma[t].item() ** COST_SIGMA_POWER
    return costs


def cheapest_path(costs, steps):
    """The `steps` grid indices from the first to the last (T − 1 to 0) with the least summed cost: dynamic
    programming over (steps taken, where), O(steps · G²). Returns (indices, cost)."""
    size = len(costs)
    if not 2 <= steps <= size:
        raise ValueError(f"steps must be in 2..{size} (the grid's points), got {steps}")
    best = torch.full((size,), math.inf, dtype=torch.float64)
    best[0] = 0.0                                          # (G,): the least cost of reaching each point so far
    came_from = []
    for _ in range(steps - 1):
        best, previous = (best[:, None] + costs).min(0)    # reach i in best[i], then step i → j
        came_from.append(previous)
    path = [size - 1]
    for previous in reversed(came_from):
        path.append(int(previous[path[-1]]))
    return path[::-1], best[-1].item()


def fitted_timesteps(sampler, steps, labels, num_samples=FIT_SAMPLES, seed=0, progress=False):
    """The `steps` timesteps of the sampler's model and settings that best follow the teacher (T − 1 first), and the
    teacher's pieces, for measuring them: (timesteps, (grid, states, x_zeros, images))."""
    teacher = teacher_trajectories(sampler, labels, num_samples, seed, progress)
    path, _ = cheapest_path(step_costs(sampler.diffusion, *teacher[:3]), steps)
    return [teacher[0][i] for i in path], teacher


@torch.no_grad()
def distance_to_teacher(sampler, settings, teacher, labels):
    """RMS distance, averaged over the samples, of `settings`' images from the teacher's, from the same noises."""
    grid, states, _, images = teacher
    samples = sampler.diffusion.sample(sampler.denoiser, images.shape, settings, labels, noise=states[0])
    return (samples.float() - images.clamp(-1, 1)).flatten(1).pow(2).mean(1).sqrt().mean().item()


def fit_banner(options, settings, config):
    """What --fit_steps runs, for its banner."""
    samples = options.num_samples or FIT_SAMPLES
    return (f"{options.fit_steps} steps of {describe_sampling(settings, options.conditional)}, to the "
            f"{min(TEACHER_STEPS, config['timesteps'])}-step dpm++3m teacher from {samples} noises")


def fit_keep(options, config, settings):
    """What fitting holds (Job.keeps): x and x̂_0 of every teacher sample at each grid point."""
    return (options.num_samples or FIT_SAMPLES) * 2 * min(TEACHER_STEPS, config["timesteps"]), "--num_samples"


def fit_job(options, sampler, files, classes):
    """--fit_steps N: the checkpoint --model_path names, its sampling settings now carrying the N fitted timesteps,
    as <models_dir>/<run>_fit<N>/ckpt.pt (a new run folder, never over its input)."""
    settings, steps, timesteps = sampler.settings, options.fit_steps, sampler.diffusion.timesteps
    if "timesteps" not in SAMPLERS[settings.sampler].options:
        takers = samplers_where(lambda kind: "timesteps" in kind.options)
        raise UserError(f"--fit_steps fits the steps of {takers}; the sampler here is {settings.sampler}")
    if steps >= min(TEACHER_STEPS, timesteps):
        raise UserError(f"--fit_steps {steps} must be less than the teacher's {min(TEACHER_STEPS, timesteps)} "
                        f"steps (and the model's T = {timesteps})")
    if classes is not None:
        raise UserError("--fit_steps fits on class-balanced samples of every class; drop --sample_classes")
    target = RunFiles(options.models_dir, options.save_dir, options.run_name or f"{files.run_name}_fit{steps}")
    refuse_existing_run(target, "--fit_steps")  # now, not after minutes of fitting
    verbose, start, count = not options.quiet, time.perf_counter(), options.num_samples or FIT_SAMPLES
    labels = balanced_labels(sampler.config, count, sampler.device) if options.conditional else None
    fitted, teacher = fitted_timesteps(sampler, steps, labels, count, options.seed, verbose and stderr_is_terminal())
    fitted_settings = dataclasses.replace(settings, steps=None, timesteps=tuple(fitted))
    ckpt = load_checkpoint(options.model_path)
    config = {**ckpt["config"], "run_name": target.run_name, "sampling": dataclasses.asdict(fitted_settings)}
    write_new_run(target, {**ckpt, "config": config}, config, "--fit_steps")
    if verbose:
        spaced = dataclasses.replace(settings, steps=steps, timesteps=None)
        fitted_distance, spaced_distance = (distance_to_teacher(sampler, chosen, teacher, labels)
                                            for chosen in (fitted_settings, spaced))
        print(f"fitted in {time.perf_counter() - start:.0f} s: {describe_sampling(fitted_settings)}; RMS distance to "
              f"the {len(teacher[0])}-step teacher {fitted_distance:.4f} ({settings.spacing} spacing: "
              f"{spaced_distance:.4f}). Wrote {target.checkpoint('ckpt.pt')}; sample it: python ddpm_main.py "
              f"--inference {'--conditional ' if options.conditional else ''}--model_path "
              f"{target.checkpoint('ckpt.pt')}", file=sys.stderr)
