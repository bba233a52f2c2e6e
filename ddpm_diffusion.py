"""Noise schedules and the Gaussian diffusion process (Ho et al. 2020, "DDPM").

Notation follows the paper: β_t the noise schedule, α_t = 1 − β_t, ᾱ_t = ∏_{s≤t} α_s.
Timesteps are 0-based indices t ∈ {0, …, T−1}; index t stands for the paper's step t+1.
Schedules are computed in float64 and stored as float32 buffers.

Samplers: DPM-Solver++(2M) and (3M) (Lu et al. 2022, Algorithm 2 and its third-order form), DDIM (Song et al.
2021, eq. 12) and ancestral DDPM (Algorithm 2), all with classifier-free guidance (Ho & Salimans 2022):
ε̂ = ε̂_uncond + w (ε̂_cond − ε̂_uncond), at every step or only in an interval of noise levels (Kynkäänniemi et al.
2024). The multistep solvers' steps are spaced by a rule (in t, in λ, EDM's ρ = 7) or given (fitted to a model by
ddpm_fit_steps).
SAMPLERS is the table of samplers (a Diffusion method each, and the settings it takes); SamplerSettings names one way
to sample; Diffusion.sample runs it (ddpm_sample.generate batches it for the CLI, the benchmarks and FID).

For editing real images: ClassMix, the guided prediction of a blend of two classes (RePaint, DDIM inversion and slerp
are ddpm_editing's).
"""
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

DEFAULT_GUIDANCE_SCALE = 3.0
DEFAULT_SAMPLING_STEPS = 25   # network evaluations of dpm++2m and ddim when nothing says otherwise
SCHEDULES = ("linear", "cosine", "sigmoid")
PREDICTIONS = ("eps", "v")
LOSS_TYPES = ("l1", "l2", "huber")
SPACINGS = ("time", "lambda", "karras")  # the multistep solvers' steps: even in t, even in λ, or EDM's ρ = 7
STEP_PLACING = ("spacing", "timesteps")  # the sampler options that place its steps (sampler_timesteps)
KARRAS_RHO = 7  # EDM's σ_i = (σ_max^{1/ρ} + i/(N−1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ (Karras et al. 2022, eq. 5)
VARIANCES = ("posterior", "beta")  # σ_t² of p_θ(x_{t−1} | x_t), in the ancestral sampler and the bound: β̃_t or β_t
PIXEL_HALF_BIN = 1 / 255  # half the width of a uint8 pixel's bin once pixels are scaled to [−1, 1]
LOWER_ORDER_FINAL_BELOW = 15  # DPM-Solver++ with fewer steps takes its step onto the last timestep one order lower


@dataclass(frozen=True)
class SamplerKind:
    """A sampler: the Diffusion method that runs it, (model, x_T, timesteps T−1 first, class labels, the guidance
    scale at each timestep, clip_denoised, progress, trace, **its options) → x_0, whether it takes every one of the T
    steps (no steps to choose), and the SamplerSettings fields only it reads ('spacing' places the steps)."""
    method: str
    every_step: bool = False
    options: tuple = ()


# The samplers, by --sampler name: a new one is a Diffusion method and an entry here. 'spacing' and 'timesteps' place
# the steps (sampler_timesteps); the other options are the method's keyword arguments.
SAMPLERS = {
    "dpm++2m": SamplerKind("dpm_solver_2m", options=("spacing", "timesteps")),  # Lu et al. 2022, second order
    "dpm++3m": SamplerKind("dpm_solver_3m", options=("spacing", "timesteps")),  # third order
    "ddim": SamplerKind("ddim", options=("eta",)),                  # Song et al. 2021, first order
    "ddpm": SamplerKind("ancestral", every_step=True, options=("variance",)),  # Ho et al. 2020, all T steps
}


def samplers_where(holds):
    """The samplers whose SamplerKind `holds`, as a sentence names them: 'dpm++2m, dpm++3m and ddim'."""
    names = [name for name, kind in SAMPLERS.items() if holds(kind)]
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def linear_beta_schedule(beta_start, beta_end, timesteps):
    """β_t evenly spaced from beta_start to beta_end (Ho et al. 2020, §4)."""
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


def cosine_beta_schedule(timesteps, s=0.008):
    """ᾱ_t = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s) · π/2); β_t = 1 − ᾱ_t/ᾱ_{t−1} ≤ 0.999
    (Nichol & Dhariwal 2021, eq. 17)."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64)
    f = torch.cos((steps / timesteps + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = f / f[0]
    betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return betas.clamp(max=0.999)


def sigmoid_beta_schedule(beta_start, beta_end, timesteps):
    """β_t = beta_start + (beta_end − beta_start) · sigmoid(x_t), x_t evenly spaced on [−6, 6]."""
    x = torch.linspace(-6, 6, timesteps, dtype=torch.float64)
    return torch.sigmoid(x) * (beta_end - beta_start) + beta_start


def scaled_beta_range(timesteps):
    """Ho et al.'s β range (1e-4, 0.02) is for T = 1000; scale it so other T give the same ᾱ_T."""
    scale = 1000 / timesteps
    return 1e-4 * scale, min(0.02 * scale, 0.999)


def make_schedule(name, timesteps):
    """β for the CLI's --schedule name: 'linear', 'cosine' or 'sigmoid'."""
    if name == "cosine":
        return cosine_beta_schedule(timesteps)
    beta_start, beta_end = scaled_beta_range(timesteps)
    if name == "linear":
        return linear_beta_schedule(beta_start, beta_end, timesteps)
    if name == "sigmoid":
        return sigmoid_beta_schedule(beta_start, beta_end, timesteps)
    raise ValueError(f"unknown schedule {name!r}")


@dataclass(frozen=True)
class SamplerSettings:
    """One way to sample: the sampler, its steps, their spacing and noise, and the classifier-free guidance scale.
    The defaults are what a checkpoint that names no settings is sampled with: on the shipped model DPM-Solver++(2M)
    with λ spacing reads at 15 steps the FID that DDIM reads at 25 (BENCHMARKS.md)."""
    sampler: str = "dpm++2m"     # 'dpm++2m', 'dpm++3m': Lu et al. 2022; 'ddim': Song et al. 2021; 'ddpm': all T steps
    steps: int = None            # network evaluations of dpm++ and ddim (None: 25, or T when T < 25); ddpm runs T
    eta: float = 0.0             # DDIM noise: 0 deterministic, 1 DDPM's variance (eq. 16)
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE  # w: 0 unconditional, 1 conditional, > 1 stronger class
    spacing: str = "lambda"      # dpm++'s steps evenly spaced in λ_t = log(√ᾱ_t / √(1 − ᾱ_t)), in t ('time'), or
                                 # EDM's ρ = 7 in σ_t ('karras')
    guidance_interval: tuple = None  # (σ_lo, σ_hi): w only where σ_lo < σ_t ≤ σ_hi, else the conditional output
                                     # (one forward of N); σ_t = √(1 − ᾱ_t)/√ᾱ_t. None: w at every step
    variance: str = "posterior"  # σ_t² of ddpm's steps: 'posterior', β̃_t (eq. 7), or 'beta', β_t (Ho et al.'s CIFAR-10
                                 # samples; improved-diffusion's FIXED_LARGE)
    timesteps: tuple = None      # dpm++'s timesteps themselves, T−1 first, strictly decreasing (fitted to a model by
                                 # --fit_steps); None: `steps` of them placed by `spacing`

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; use one of {', '.join(SAMPLERS)}")
        if self.spacing not in SPACINGS:
            raise ValueError(f"unknown spacing {self.spacing!r}; use one of {', '.join(SPACINGS)}")
        if self.variance not in VARIANCES:
            raise ValueError(f"unknown variance {self.variance!r}; use one of {', '.join(VARIANCES)}")
        if self.guidance_interval is not None:
            interval = tuple(float(v) for v in self.guidance_interval)  # a list, as JSON and checkpoints keep it
            if len(interval) != 2 or not 0 <= interval[0] < interval[1] or math.isnan(interval[1]):
                raise ValueError(f"the guidance interval is two noise levels 0 ≤ σ_lo < σ_hi, got {interval}")
            # (0, ∞) is every step: stored as None, so both say the same thing the same way
            object.__setattr__(self, "guidance_interval", None if interval == (0, math.inf) else interval)
        if self.timesteps is not None:
            self._check_timesteps()

    def _check_timesteps(self):
        """Given timesteps: a sampler that places its steps, whole numbers ≥ 0 strictly decreasing, as many as
        `steps` says (None: their count); kept as a tuple (a list, as JSON and checkpoints keep it)."""
        times = tuple(self.timesteps)
        if "timesteps" not in SAMPLERS[self.sampler].options:
            takers = samplers_where(lambda kind: "timesteps" in kind.options)
            raise ValueError(f"given timesteps apply to {takers}, not {self.sampler}")
        if (not times or not all(isinstance(t, int) and not isinstance(t, bool) for t in times) or times[-1] < 0
                or any(a <= b for a, b in zip(times, times[1:]))):
            raise ValueError(f"timesteps must be whole numbers ≥ 0, strictly decreasing, got {list(times)}")
        if self.steps not in (None, len(times)):
            raise ValueError(f"{self.steps} steps but {len(times)} timesteps")
        object.__setattr__(self, "timesteps", times)
        object.__setattr__(self, "steps", len(times))

    def evaluations_per_step(self, conditional):
        """Network evaluations an image takes per step: two where classifier-free guidance runs both branches (a
        conditional model, w other than 0 and 1: counted at every step, an upper bound with a guidance interval)."""
        return 2 if conditional and self.guidance_scale not in (0, 1) else 1

    def guides_at(self, sigma):
        """Whether w applies at noise level σ_t (inside the guidance interval, or there is none)."""
        return self.guidance_interval is None or self.guidance_interval[0] < sigma <= self.guidance_interval[1]

    def for_timesteps(self, timesteps):
        """These settings with `steps` filled in for a T-step model: T for ddpm, else steps or min(25, T)."""
        steps = timesteps if SAMPLERS[self.sampler].every_step else self.steps or min(DEFAULT_SAMPLING_STEPS, timesteps)
        if not 1 <= steps <= timesteps:
            raise ValueError(f"sampling steps must be in 1..{timesteps} (the model's T), got {steps}")
        if self.timesteps is not None and self.timesteps[0] != timesteps - 1:
            raise ValueError(f"the first timestep must be T − 1 = {timesteps - 1} (where x_T is), got "
                             f"{self.timesteps[0]}")
        return dataclasses.replace(self, steps=steps)


def extract(a, t, shape):
    """a[t] reshaped to broadcast over a batch of the given shape: (N,) -> (N, 1, 1, 1)."""
    return a.gather(0, t).reshape(t.shape[0], *((1,) * (len(shape) - 1)))


@dataclass(frozen=True)
class ClassMix:
    """Class labels that blend two classes: each image's guided prediction is (1 − weight) · that of `first` +
    weight · that of `second` (N,) each — the conditional scores mixed, as composable diffusion does (Liu et al.
    2022); weight 0 is `first` exactly, 1 `second`. Stands wherever class_labels (N,) may."""
    first: torch.Tensor   # (N,) class indices
    second: torch.Tensor  # (N,)
    weight: torch.Tensor  # (N,) in [0, 1]

    def to(self, device):
        return ClassMix(self.first.to(device), self.second.to(device), self.weight.to(device))

    def __getitem__(self, index):
        return ClassMix(self.first[index], self.second[index], self.weight[index])

    def __len__(self):
        return len(self.first)


def guided_prediction(model, x, t, class_labels=None, guidance_scale=DEFAULT_GUIDANCE_SCALE):
    """The network's output (ε̂, or v̂ for a v-prediction model) with classifier-free guidance,
    out_uncond + w (out_cond − out_uncond), both branches in one forward of the 2N batch.

    w = 0: unconditional; w = 1: plain conditional; w > 1: amplified class. ε and v are linear in each
    other at fixed x_t, so guiding either gives the same ε̂. class_labels may be a ClassMix.
    """
    if isinstance(class_labels, ClassMix):  # linear in the conditional outputs: mixing guided outputs mixes classes
        first = guided_prediction(model, x, t, class_labels.first, guidance_scale)
        second = guided_prediction(model, x, t, class_labels.second, guidance_scale)
        return torch.lerp(first, second, class_labels.weight.to(first.dtype).view(-1, 1, 1, 1))
    num_classes = getattr(model, "num_classes", None)
    if class_labels is None or num_classes is None:
        return model(x, t, class_labels)
    if guidance_scale == 1:
        return model(x, t, class_labels)
    null = torch.full_like(class_labels, num_classes)
    if guidance_scale == 0:
        return model(x, t, null)
    eps_cond, eps_uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([class_labels, null])).chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def normal_kl(mean1, log_var1, mean2, log_var2):
    """KL(N(mean1, e^log_var1) ‖ N(mean2, e^log_var2)), elementwise, in nats."""
    return 0.5 * (log_var2 - log_var1 + torch.exp(log_var1 - log_var2) + (mean1 - mean2) ** 2 * torch.exp(-log_var2)
                  - 1)


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log p(x) of pixels x (uint8 scaled to [−1, 1]) under N(mean, e^{2 log_scale}) integrated over each pixel's bin
    [x − 1/255, x + 1/255], the bins of −1 and 1 reaching to −∞ and ∞ (the decoder of Ho et al. §3.3, eq. 13);
    elementwise, in nats. In float64 and log space: a bin's mass Φ(b) − Φ(a) is taken on the side of the Gaussian
    nearer to it, as log Φ(b) + log(1 − Φ(a)/Φ(b)), so that bins far out in a tail keep their (tiny) mass."""
    x, mean, inv_std = x.double(), mean.double(), torch.exp(-log_scale.double())
    upper, lower = inv_std * (x - mean + PIXEL_HALF_BIN), inv_std * (x - mean - PIXEL_HALF_BIN)
    log_cdf = torch.special.log_ndtr                                       # log Φ, the standard normal CDF
    a, b = torch.where(lower > 0, -upper, lower), torch.where(lower > 0, -lower, upper)  # the mass Φ(b) − Φ(a)
    log_mass = log_cdf(b) + torch.log(-torch.expm1(log_cdf(a) - log_cdf(b)))
    return torch.where(x < -1 + PIXEL_HALF_BIN, log_cdf(upper),                        # log Φ(upper)
                       torch.where(x > 1 - PIXEL_HALF_BIN, log_cdf(-lower), log_mass))  # log (1 − Φ(lower))


def bits_per_dim(nats):
    """Nats per element (N, C, H, W) → bits per dimension of each image (N,)."""
    return nats.flatten(1).mean(1) / math.log(2)


class Diffusion(nn.Module):
    """The forward process q(x_t | x_0), the loss, and the reverse-process samplers."""

    def __init__(self, timesteps, get_noise_schedule, device="cpu", prediction="eps", min_snr_gamma=None,
                 dtype=torch.float32):
        """prediction: what the network outputs, 'eps' (ε, Ho et al.) or 'v' (v = √ᾱ ε − √(1−ᾱ) x_0,
        Salimans & Ho 2022). min_snr_gamma: weight each t's loss by min(SNR_t, γ) / SNR_t for ε
        (/ (SNR_t + 1) for v), the Min-SNR-γ weighting of Hang et al. 2023; None: uniform. dtype: the buffers'
        (float64 where a comparison needs every digit)."""
        super().__init__()
        if prediction not in ("eps", "v"):
            raise ValueError(f"unknown prediction {prediction!r}; use 'eps' or 'v'")
        self.prediction, self.min_snr_gamma = prediction, min_snr_gamma
        betas = torch.as_tensor(get_noise_schedule(timesteps), dtype=torch.float64)
        if betas.shape != (timesteps,) or not ((betas > 0) & (betas < 1)).all():
            raise ValueError(f"the schedule must give {timesteps} values with 0 < β < 1")
        self.timesteps = timesteps
        alphas = 1 - betas
        alphas_cumprod = torch.cumprod(alphas, 0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        # β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t)   (eq. 7)
        posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
        buffers = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
            "sqrt_recip_alphas_cumprod": (1 / alphas_cumprod).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1 / alphas_cumprod - 1).sqrt(),
            "posterior_variance": posterior_variance,
            # β̃_0 = 0: log-variance clipped to β̃_1 so it stays finite
            "posterior_log_variance_clipped": torch.cat([posterior_variance[1:2], posterior_variance[1:]]).log(),
            # log β_t, with β̃_1 at t = 0 for the decoder (Ho et al.'s code): the other choice of σ_t², the sampler's
            # and the bound's
            "log_betas_decoder_clipped": torch.cat([posterior_variance[1:2], betas[1:]]).log(),
            # μ̃_t = coef1 · x_0 + coef2 · x_t   (eq. 7)
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod),
            "posterior_mean_coef2": (1 - alphas_cumprod_prev) * alphas.sqrt() / (1 - alphas_cumprod),
            "snr": alphas_cumprod / (1 - alphas_cumprod),  # signal-to-noise ratio ᾱ_t / (1 − ᾱ_t)
            # λ_t = log(α_t / σ_t) with α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t): half the log-SNR, DPM-Solver's time variable
            "half_log_snr": 0.5 * (alphas_cumprod.log() - (1 - alphas_cumprod).log()),
        }
        for name, value in buffers.items():
            self.register_buffer(name, value.to(dtype), persistent=False)
        # σ_t = √(1 − ᾱ_t)/√ᾱ_t, EDM's noise level, in float64 on the host: where guidance applies, no device sync
        self.noise_levels = (1 / alphas_cumprod - 1).sqrt().tolist()
        self.to(device)

    # forward process -----------------------------------------------------------------

    def q_sample(self, x_zero, t, noise=None):
        """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε   (eq. 4)."""
        if noise is None:
            noise = torch.randn_like(x_zero)
        return (extract(self.sqrt_alphas_cumprod, t, x_zero.shape) * x_zero
                + extract(self.sqrt_one_minus_alphas_cumprod, t, x_zero.shape) * noise)

    def q_posterior_mean_variance(self, x_zero, x_t, t):
        """Mean, variance and log-variance of q(x_{t−1} | x_t, x_0)   (eqs. 6–7)."""
        mean = (extract(self.posterior_mean_coef1, t, x_t.shape) * x_zero
                + extract(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        return (mean, extract(self.posterior_variance, t, x_t.shape),
                extract(self.posterior_log_variance_clipped, t, x_t.shape))

    def v_target(self, x_zero, t, noise):
        """v = √ᾱ_t ε − √(1 − ᾱ_t) x_0   (Salimans & Ho 2022, §4)."""
        return (extract(self.sqrt_alphas_cumprod, t, x_zero.shape) * noise
                - extract(self.sqrt_one_minus_alphas_cumprod, t, x_zero.shape) * x_zero)

    def model_predictions(self, model, x_t, t, class_labels=None, guidance_scale=DEFAULT_GUIDANCE_SCALE,
                          clip_denoised=False):
        """(ε̂, x̂_0) from one (guided) network evaluation at x_t.

        ε-models: x̂_0 = (x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t, eq. 4 solved for x_0. v-models: x̂_0 = √ᾱ_t x_t − √(1 − ᾱ_t) v̂
        and ε̂ = √(1 − ᾱ_t) x_t + √ᾱ_t v̂ directly (Salimans & Ho 2022, §4): going through ε̂ would subtract two
        float32 terms of about 1/√ᾱ_t ≈ 10⁴ near t = T. clip_denoised clamps x̂_0 to [−1, 1] and returns the ε̂
        consistent with it, so the samplers' deterministic paths stay on the clipped x̂_0.
        """
        out = guided_prediction(model, x_t, t, class_labels, guidance_scale)
        alpha = extract(self.sqrt_alphas_cumprod, t, x_t.shape)            # α_t = √ᾱ_t
        sigma = extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape)  # σ_t = √(1 − ᾱ_t)
        if self.prediction == "eps":
            eps, x_zero = out, self.predict_start_from_noise(x_t, t, out)
        else:
            eps, x_zero = sigma * x_t + alpha * out, alpha * x_t - sigma * out
        if clip_denoised:
            x_zero = x_zero.clamp(-1, 1)
            eps = (x_t - alpha * x_zero) / sigma
        return eps, x_zero

    def predict_start_from_noise(self, x_t, t, noise):
        """x̂_0 = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t, eq. 4 solved for x_0."""
        return (extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * noise)

    # training ---------------------------------------------------------------------------

    def p_losses(self, denoise_model, x_zero, t, noise=None, loss_type="l2", class_labels=None):
        """The simplified objective ‖ε − ε_θ(x_t, t)‖ (eq. 14) — or ‖v − v_θ‖ for v-prediction — with an
        L1, L2 or Huber norm, averaged per image, then over the batch (Min-SNR-weighted if set)."""
        if noise is None:
            noise = torch.randn_like(x_zero)
        x_t = self.q_sample(x_zero, t, noise)
        prediction = denoise_model(x_t, t, class_labels)
        target = noise if self.prediction == "eps" else self.v_target(x_zero, t, noise)
        if loss_type == "l1":
            elementwise = (prediction - target).abs()
        elif loss_type == "l2":
            elementwise = (prediction - target) ** 2
        elif loss_type == "huber":
            elementwise = F.smooth_l1_loss(prediction, target, reduction="none")
        else:
            raise ValueError(f"unknown loss_type {loss_type!r}; use 'l1', 'l2' or 'huber'")
        per_image = elementwise.flatten(1).mean(1)                          # (N,)
        if self.min_snr_gamma is not None:
            snr = self.snr[t]
            gamma = min(self.min_snr_gamma, torch.finfo(snr.dtype).max)  # a γ past the float's range clamps nothing
            per_image = per_image * snr.clamp(max=gamma) / (snr if self.prediction == "eps" else snr + 1)
        return per_image.mean()

    # likelihood -----------------------------------------------------------------------------

    def p_mean_variance(self, model, x_t, t, class_labels=None, variance="posterior", clip_denoised=True):
        """Mean and log-variance of p_θ(x_{t−1} | x_t) = N(μ̃_t(x_t, x̂_0), σ_t² I) (eq. 11 through x̂_0), unguided:
        σ_t² = β̃_t ('posterior', what the ancestral sampler draws with) or β_t ('beta')."""
        _, x_zero = self.model_predictions(model, x_t, t, class_labels, 1.0, clip_denoised)
        mean, _, posterior_log_variance = self.q_posterior_mean_variance(x_zero, x_t, t)
        if variance == "posterior":
            return mean, posterior_log_variance
        return mean, extract(self.log_betas_decoder_clipped, t, x_t.shape)

    def prior_bpd(self, x_zero):
        """L_T = KL(q(x_T | x_0) ‖ N(0, I)) of each image (eq. 5), in bits/dim: (N,). No parameters: about 0 when
        ᾱ_T is."""
        t = torch.full((len(x_zero),), self.timesteps - 1, device=x_zero.device, dtype=torch.long)
        mean = extract(self.sqrt_alphas_cumprod, t, x_zero.shape).double() * x_zero.double()
        log_var = extract(1 - self.alphas_cumprod, t, x_zero.shape).double().log()
        return bits_per_dim(normal_kl(mean, log_var, torch.zeros_like(mean), torch.zeros_like(mean)))

    def vb_term_bpd(self, model, x_zero, x_t, t, class_labels=None, variance="posterior", clip_denoised=True):
        """The bound's term at t of each image, in bits/dim (N,) (eq. 5): L_t = KL(q(x_t | x_{t+1}, x_0) ‖
        p_θ(x_t | x_{t+1})) in the paper's 1-based steps, here index t > 0; at index 0 the decoder
        L_0 = −log p_θ(x_0 | x_1), discretized (§3.3). t is one index for the whole batch."""
        mean, log_var = self.p_mean_variance(model, x_t, t, class_labels, variance, clip_denoised)
        if int(t[0]) == 0:
            return -bits_per_dim(discretized_gaussian_log_likelihood(x_zero, mean, 0.5 * log_var))
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_zero, x_t, t)
        return bits_per_dim(normal_kl(true_mean.double(), true_log_var.double(), mean.double(), log_var.double()))

    @torch.no_grad()
    def bound_terms(self, model, x_zero, class_labels=None, variance="posterior", clip_denoised=True, bar=None):
        """The variational bound (eq. 5) of images x_zero (N, C, H, W), pixels uint8 scaled to [−1, 1], term by term
        in bits/dim: (terms (N, T), column t the term L_t of index t: L_0 the decoder, L_1 … L_{T−1} the KLs; and
        L_T, the prior, (N,)). The total is their sum. One x_t ~ q(x_t | x_0) per t: T network evaluations an image;
        `bar` (a tqdm) counts them."""
        terms = []
        for step in range(self.timesteps):
            t = torch.full((len(x_zero),), step, device=x_zero.device, dtype=torch.long)
            terms.append(self.vb_term_bpd(model, x_zero, self.q_sample(x_zero, t), t, class_labels, variance,
                                          clip_denoised))
            if bar is not None:
                bar.update(len(x_zero))
        return torch.stack(terms, 1), self.prior_bpd(x_zero)               # (N, T), (N,)

    # reverse process ----------------------------------------------------------------------

    @torch.no_grad()
    def p_sample(self, model, x, t, t_index, class_labels=None, guidance_scale=DEFAULT_GUIDANCE_SCALE,
                 clip_denoised=True, noise=None, trace=None, variance="posterior"):
        """One ancestral step x_t → x_{t−1} (Algorithm 2) with variance σ_t² = β̃_t ('posterior') or β_t ('beta');
        no noise at t_index 0.

        clip_denoised clamps the implied x̂_0 to [−1, 1] before forming the posterior mean
        (Ho et al.'s released sampler); without it the step is eq. 11 exactly. trace: a list x̂_0 is appended to.
        """
        _, x_zero = self.model_predictions(model, x, t, class_labels, guidance_scale, clip_denoised)
        if trace is not None:
            trace.append(x_zero)
        mean, _, log_variance = self.q_posterior_mean_variance(x_zero, x, t)
        if variance == "beta":
            log_variance = extract(self.log_betas_decoder_clipped, t, x.shape)  # log β_t   (§3.2: σ_t² = β_t)
        if t_index == 0:
            return mean
        if noise is None:
            noise = torch.randn_like(x)
        return mean + (0.5 * log_variance).exp() * noise

    @torch.no_grad()
    def ddim_step(self, model, x, t, t_prev, class_labels=None, guidance_scale=DEFAULT_GUIDANCE_SCALE,
                  eta=0.0, clip_denoised=True, noise=None, trace=None):
        """One DDIM step x_t → x_{t_prev} (Song et al. 2021, eq. 12); t_prev = −1 means x_0. trace: a list x̂_0 is
        appended to."""
        eps, x_zero = self.model_predictions(model, x, t, class_labels, guidance_scale, clip_denoised)
        if trace is not None:
            trace.append(x_zero)
        if t_prev < 0:
            return x_zero
        alpha_bar = extract(self.alphas_cumprod, t, x.shape)
        alpha_bar_prev = self.alphas_cumprod[t_prev]
        # σ_t(η) = η √((1 − ᾱ_prev)/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev)   (eq. 16)
        sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)).sqrt()
        x_prev = alpha_bar_prev.sqrt() * x_zero + (1 - alpha_bar_prev - sigma ** 2).clamp(min=0).sqrt() * eps
        if eta > 0:
            x_prev = x_prev + sigma * (torch.randn_like(x) if noise is None else noise)
        return x_prev

    @torch.no_grad()
    def dpm_solver_2m(self, model, x, steps, class_labels, guidance_scales, clip_denoised=True, progress=False,
                      trace=None):
        """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): dpm_solver_multistep of order 2."""
        return self.dpm_solver_multistep(model, x, steps, class_labels, guidance_scales, clip_denoised, progress,
                                         trace, order=2)

    @torch.no_grad()
    def dpm_solver_3m(self, model, x, steps, class_labels, guidance_scales, clip_denoised=True, progress=False,
                      trace=None):
        """DPM-Solver++(3M): dpm_solver_multistep of order 3, as diffusers' DPMSolverMultistepScheduler(solver_order=3,
        algorithm_type='dpmsolver++', final_sigmas_type='zero') on the same timesteps."""
        return self.dpm_solver_multistep(model, x, steps, class_labels, guidance_scales, clip_denoised, progress,
                                         trace, order=3)

    @torch.no_grad()
    def dpm_solver_multistep(self, model, x, steps, class_labels, guidance_scales, clip_denoised=True,
                             progress=False, trace=None, order=2, states=None):
        """DPM-Solver++ multistep of `order` 2 or 3 (Lu et al. 2022): x at timestep steps[0] through steps[1:] to x_0,
        one network evaluation (its data prediction x̂_0) per timestep, guided by guidance_scales[i] at steps[i].
        With α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t) and λ_t = log(α_t/σ_t), each step s → t extrapolates the last k x̂_0
        (multistep_data_prediction). Lower orders: step i has i + 1 x̂_0, so k ≤ i + 1 (the warm-up); with fewer
        than 15 steps the step onto the last timestep takes k = order − 1 (the lower-order final steps that steady
        few-step sampling); the final step onto σ = 0, where e^{−h} = 0, returns x̂_0. trace: a list each x̂_0 is
        appended to; states: a list each x_s is appended to, before its evaluation."""
        alpha, sigma = self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod
        lam = self.half_log_snr.tolist()  # on the host once: no device sync per step
        x_zeros, lams = [], []            # the last `order` x̂_0 and their λ, newest last
        for i, s in enumerate(tqdm(steps, desc=f"sampling (dpm++{order}m)", leave=False, disable=not progress)):
            t_vec = torch.full((len(x),), s, device=x.device, dtype=torch.long)
            _, x_zero = self.model_predictions(model, x, t_vec, class_labels, guidance_scales[i], clip_denoised)
            if trace is not None:
                trace.append(x_zero)
            if states is not None:
                states.append(x)
            if i + 1 == len(steps):
                return x_zero                                          # last step, onto σ = 0: x_0 = x̂_0
            x_zeros, lams = [*x_zeros, x_zero][-order:], [*lams, lam[s]][-order:]
            t = steps[i + 1]
            final = t == steps[-1] and len(steps) < LOWER_ORDER_FINAL_BELOW
            k = min(i + 1, order - 1 if final else order)
            d = multistep_data_prediction(x_zeros[-k:], lams[-k:], lam[t])
            # x̃_{t_i} = (σ_{t_i} / σ_{t_{i−1}}) x̃_{t_{i−1}} − α_{t_i} (e^{−h_i} − 1) D_i
            x = (sigma[t] / sigma[s]) * x - alpha[t] * math.expm1(-(lam[t] - lam[s])) * d

    def sampling_timesteps(self, steps, spacing="time"):
        """`steps` timestep indices from T−1 down to 0, evenly spaced in t (DDIM's sub-sequence τ), in λ_t, or in
        σ_t^{1/ρ} (EDM's ρ = 7, 'karras'): each the index nearest its target λ, moved where needed so that all are
        distinct."""
        if not 1 <= steps <= self.timesteps:
            raise ValueError(f"sampling steps must be in 1..{self.timesteps}, got {steps}")
        if spacing == "time":
            return torch.linspace(self.timesteps - 1, 0, steps).round().long().tolist()
        lam = self.half_log_snr.double().cpu()
        if spacing == "lambda":
            targets = torch.linspace(lam[-1].item(), lam[0].item(), steps, dtype=torch.float64)
        else:  # σ_i = (σ_max^{1/ρ} + i/(N−1) (σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ   (Karras et al. 2022, eq. 5); λ = −log σ
            ends = torch.tensor([self.noise_levels[-1], self.noise_levels[0]], dtype=torch.float64) ** (1 / KARRAS_RHO)
            targets = -KARRAS_RHO * torch.linspace(ends[0].item(), ends[1].item(), steps, dtype=torch.float64).log()
        nearest = (lam[None, :] - targets[:, None]).abs().argmin(1).tolist()  # (steps,), T−1 … 0
        indices = []
        for i, index in enumerate(nearest):  # strictly decreasing, leaving room for the steps still to come
            highest = self.timesteps - 1 if not indices else indices[-1] - 1
            indices.append(min(max(index, steps - 1 - i), highest))
        return indices

    def sampler_timesteps(self, settings):
        """The timestep indices a sampler evaluates the network at, T−1 first: dpm++'s given ones, else spaced as
        settings say; DDIM's evenly in t (as the DDIM paper); all T for ddpm."""
        settings, kind = settings.for_timesteps(self.timesteps), SAMPLERS[settings.sampler]
        if kind.every_step:
            return list(range(self.timesteps - 1, -1, -1))
        if settings.timesteps is not None:
            return list(settings.timesteps)
        return self.sampling_timesteps(settings.steps, settings.spacing if "spacing" in kind.options else "time")

    def guidance_scales(self, settings, steps):
        """The guidance scale at each timestep index of `steps`: settings' w where its interval holds the noise level
        σ_t = √(1 − ᾱ_t)/√ᾱ_t = e^{−λ_t}, else 1, the plain conditional output in one forward of the N-batch
        (Kynkäänniemi et al. 2024: guidance in a limited interval)."""
        return [settings.guidance_scale if settings.guides_at(self.noise_levels[t]) else 1.0 for t in steps]

    @torch.no_grad()
    def sample(self, model, shape, settings=SamplerSettings(), class_labels=None, noise=None, clip_denoised=True,
               progress=False, trace=None):
        """The reverse process from x_T ~ N(0, I) (or `noise`) to x_0, `shape` (N, C, H, W), in [−1, 1], sampled
        as `settings` say; class_labels (N,) or None. trace: a list each network evaluation's x̂_0 is appended to."""
        device = self.betas.device
        x = torch.randn(shape, device=device) if noise is None else noise.to(device)
        if class_labels is not None:
            class_labels = class_labels.to(device)
        settings = settings.for_timesteps(self.timesteps)
        steps = self.sampler_timesteps(settings)
        scales = self.guidance_scales(settings, steps)  # w at each step: 1 outside the guidance interval
        kind = SAMPLERS[settings.sampler]
        options = {name: getattr(settings, name) for name in kind.options if name not in STEP_PLACING}
        return getattr(self, kind.method)(model, x, steps, class_labels, scales, clip_denoised, progress, trace,
                                          **options).clamp(-1, 1)

    @torch.no_grad()
    def ddim(self, model, x, steps, class_labels, guidance_scales, clip_denoised=True, progress=False, trace=None,
             eta=0.0):
        """DDIM (Song et al. 2021): x at timestep steps[0] through steps[1:] to x_0, one ddim_step each, guided by
        guidance_scales[i] at steps[i]."""
        for i, step in enumerate(tqdm(steps, desc="sampling (ddim)", leave=False, disable=not progress)):
            t = torch.full((len(x),), step, device=x.device, dtype=torch.long)
            t_prev = steps[i + 1] if i + 1 < len(steps) else -1
            x = self.ddim_step(model, x, t, t_prev, class_labels, guidance_scales[i], eta, clip_denoised, trace=trace)
        return x

    @torch.no_grad()
    def ancestral(self, model, x, steps, class_labels, guidance_scales, clip_denoised=True, progress=False,
                  trace=None, variance="posterior"):
        """Ancestral sampling (Algorithm 2): x_T through every timestep of `steps` (T−1 … 0) to x_0, one p_sample
        each with σ_t² = β̃_t ('posterior') or β_t ('beta'), guided by guidance_scales[i] at steps[i]."""
        for i, step in enumerate(tqdm(steps, desc="sampling (ddpm)", leave=False, disable=not progress)):
            t = torch.full((len(x),), step, device=x.device, dtype=torch.long)
            x = self.p_sample(model, x, t, step, class_labels, guidance_scales[i], clip_denoised, trace=trace,
                              variance=variance)
        return x

def multistep_data_prediction(x_zeros, lams, lam_t):
    """DPM-Solver++'s D of a step s → t, x_t = (σ_t/σ_s) x_s − α_t (e^{−h} − 1) D, from the last k data predictions
    x_zeros (newest last) at half-log-SNRs lams; h = λ_t − λ_s, r = (λ_s − λ_{s₁}) / h. k = 1: D = x̂_0(s), DDIM.
    k = 2: D = (1 + 1/(2r)) x̂_0(s) − 1/(2r) x̂_0(s₁) (Lu et al. 2022, Algorithm 2). k = 3:
    D = x̂_0(s) − (φ/h + 1)/φ D1 + ((φ + h)/h² − 1/2)/φ D2 with φ = e^{−h} − 1 and D1, D2 the first and second
    differences (Lu et al.'s multistep third-order code; diffusers' multistep_dpm_solver_third_order_update)."""
    h = lam_t - lams[-1]                                               # h_i = λ_{t_i} − λ_{t_{i−1}}
    if len(x_zeros) == 1:
        return x_zeros[0]
    if len(x_zeros) == 2:
        r = (lams[1] - lams[0]) / h                                    # r_i = h_{i−1} / h_i
        return (1 + 1 / (2 * r)) * x_zeros[1] - 1 / (2 * r) * x_zeros[0]
    m2, m1, m0 = x_zeros                                               # x̂_0 at s₂, s₁, s
    r0, r1 = (lams[2] - lams[1]) / h, (lams[1] - lams[0]) / h
    d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1                        # first differences, over r
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)                         # ≈ h dx̂_0/dλ
    d2 = (d1_0 - d1_1) / (r0 + r1)                                     # ≈ h² d²x̂_0/dλ² / 2
    phi = math.expm1(-h)
    return m0 - (phi / h + 1) / phi * d1 + ((phi + h) / h ** 2 - 0.5) / phi * d2
