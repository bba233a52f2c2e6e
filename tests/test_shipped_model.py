"""The model shipped in models/cifar10_cond_speedrun/: small, weights-only, trained, and samples from the CLI."""
import os

import numpy as np
import torch

from conftest import ROOT, run_cli
from ddpm_checkpoint import load_checkpoint
from ddpm_config import build_diffusion
from ddpm_model import UNet, UNetConfig

SHIPPED = os.path.join(ROOT, "models", "cifar10_cond_speedrun", "ckpt.pt")


def test_shipped_model_is_a_small_bf16_ema_checkpoint():
    assert os.path.getsize(SHIPPED) <= 8_000_000
    ckpt = torch.load(SHIPPED, map_location="cpu", weights_only=True)  # plain torch, as the model card says
    assert ckpt["format"] == "ddpm-cifar10"
    assert set(ckpt) == {"format", "version", "config", "versions", "ema", "sha256"}  # no raw weights, no optimizer
    assert {v.dtype for v in ckpt["ema"].values()} == {torch.bfloat16}
    config = ckpt["config"]
    assert config["conditional"] and config["num_classes"] == 10 and config["image_size"] == 32
    assert len(config["classes"]) == 10


def smooth_images(n, generator):
    """(n, 3, 32, 32) in [−1, 1]: two random colours blended left to right — images with CIFAR-like low frequencies."""
    left, right = torch.rand(2, n, 3, 1, 1, generator=generator) * 2 - 1
    ramp = torch.linspace(0, 1, 32).view(1, 1, 1, 32)
    return (left + (right - left) * ramp).expand(n, 3, 32, 32)


def test_shipped_weights_denoise_far_better_than_untrained_ones():
    ckpt = load_checkpoint(SHIPPED)
    config = ckpt["config"]
    trained = UNet(UNetConfig.from_dict(config["model"]))
    trained.load_state_dict(ckpt["ema"])
    untrained = UNet(UNetConfig.from_dict(config["model"]))
    diffusion = build_diffusion(config, "cpu")
    generator = torch.Generator().manual_seed(0)
    x_zero = smooth_images(16, generator)
    t = torch.full((16,), config["timesteps"] // 2)
    noise = torch.randn(x_zero.shape, generator=generator)
    labels = torch.full((16,), config["num_classes"])  # the null label: the unconditional half of CFG
    with torch.no_grad():
        trained_loss = diffusion.p_losses(trained.eval(), x_zero, t, noise, class_labels=labels).item()
        untrained_loss = diffusion.p_losses(untrained.eval(), x_zero, t, noise, class_labels=labels).item()
    assert trained_loss < 0.25 * untrained_loss, (trained_loss, untrained_loss)


def test_readme_command_samples_a_class_grid_from_the_shipped_model(tmp_path):
    """The README's main command (one row instead of eight), with the sampler settings the model carries."""
    result = run_cli("--inference", "--conditional", "--model_path", SHIPPED, "--num_samples", "10",
                     "--run_name", "shipped", "--no_cuda", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert ": dpm++2m, 15 steps (lambda spacing), guidance 3.0 for σ in (0.28, 2.9]" in result.stdout
    images = np.load(tmp_path / "outputs" / "samples_shipped.npz")["images"]
    assert images.shape == (10, 32, 32, 3) and images.dtype == np.uint8
    assert images.reshape(10, -1).std(axis=1).min() > 5  # real pictures, not flat or blank tiles
    names = sorted(os.listdir(tmp_path / "outputs" / "samples_shipped"))
    assert names[0] == "00000_airplane.png" and names[9] == "00009_truck.png"
    assert (tmp_path / "outputs" / "samples_shipped.png").is_file()
