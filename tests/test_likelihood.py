"""The variational bound in bits/dim (Ho et al. eq. 5): each term pinned to hand-computed values, and the whole bound
of a model that knows the data exactly (one image) equal to its closed form; then --eval_nll end to end."""
import json
import math

import pytest
import torch
from conftest import TINY_MODEL, run_main
from ddpm_diffusion import Diffusion, discretized_gaussian_log_likelihood, make_schedule, normal_kl
from ddpm_sample import spread
from test_diffusion import GaussianOptimalEps

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


def test_eval_nll_after_training_and_at_inference_writes_the_terms_and_their_total(tiny_data, trained, tmp_path):
    result = run_main("--inference", "--model_path", trained / "models" / "cond" / "ckpt.pt", "--eval_nll", 5,
                      "--data_dir", tiny_data, "--conditional", "--save_dir", tmp_path, "--precision", "fp32",
                      cwd=trained)
    assert result.returncode == 0, result.stderr
    nll = json.load(open(tmp_path / "nll_cond.json"))
    assert nll["images"] == 5 and len(nll["terms_L_t"]) == 10 and nll["network_evaluations_per_image"] == 10
    assert nll["labels"] == "conditioned on each image's class label" and nll["variance"] == "posterior"
    assert nll["bits_per_dim"] == pytest.approx(sum(nll["terms_L_t"]) + nll["prior_L_T"])
    assert nll["std_error"] > 0 and nll["decoder_L_0"] == nll["terms_L_t"][0]
    assert "bits/dim" in result.stdout and "s per image (10 network evaluations)" in result.stdout
    assert (tmp_path / "nll_terms_cond.png").stat().st_size > 0
    assert not (tmp_path / "samples_cond.png").exists()  # its own job: no samples

    null = run_main("--inference", "--model_path", trained / "models" / "cond" / "ckpt.pt", "--eval_nll", 5,
                    "--data_dir", tiny_data, "--save_dir", tmp_path / "null", "--precision", "fp32", cwd=trained)
    assert null.returncode == 0, null.stderr
    assert json.load(open(tmp_path / "null" / "nll_cond.json"))["labels"] == "null label (unconditional)"

    train = run_main("--data_dir", tiny_data, "--epochs", "1", "--run_name", "v", "--prediction", "v", "--eval_nll",
                     3, "--nll_variance", "beta", *TINY_MODEL, "--save_dir", tmp_path, cwd=tmp_path)
    assert train.returncode == 0, train.stderr
    metrics, nll = json.load(open(tmp_path / "metrics_v.json")), json.load(open(tmp_path / "nll_v.json"))
    assert metrics["nll_bits_per_dim"] == nll["bits_per_dim"] and nll["variance"] == "beta"
    assert nll["labels"] == "unconditional model" and nll["images"] == 3


def test_the_test_images_are_spread_over_the_split_so_a_class_sorted_folder_gives_every_class():
    labels = torch.arange(10).repeat_interleave(1000)  # CIFAR-10's test folder: 1,000 of each class, in order
    images = torch.arange(10000)
    chosen, chosen_labels = spread(images, labels, 1000)
    assert torch.equal(torch.bincount(chosen_labels), torch.full((10,), 100))
    assert torch.equal(chosen_labels, labels[chosen]) and chosen[0] == 0 and chosen[-1] == 9999
    everything, _ = spread(images[:7], None, 50)  # more than the split holds: all of it
    assert torch.equal(everything, images[:7])


@pytest.mark.parametrize("argv,message", [
    (["--eval_nll", "2", "--denoising_strip"], "separate jobs at --inference"),
    (["--nll_variance", "beta"], "--nll_variance does nothing in --inference (it is for training and --eval_nll)"),
    (["--eval_nll", "-1"], "--eval_nll must be 0 (off) or an image count"),
])
def test_nll_flags_that_do_not_go_together_stop_with_one_line(trained, argv, message):
    result = run_main("--inference", "--model_path", trained / "models" / "uncond" / "ckpt.pt", *argv, cwd=trained)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
