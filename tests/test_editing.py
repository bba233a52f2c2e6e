"""Editing real images (ddpm_editing: RePaint, inversion and slerp, and the jobs): the maths pinned, the jobs
end to end."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_main
from ddpm_diffusion import ClassMix, Diffusion, cosine_beta_schedule, guided_prediction
from ddpm_editing import ddim_invert, fill_masks, psnr, repaint, repaint_levels, slerp
from ddpm_jobs import image_items


def diffusion(timesteps=100):
    return Diffusion(timesteps, cosine_beta_schedule)


class ExactModel(torch.nn.Module):
    """The exact ε of data N(mean, s² I): ε̂(x_t) = σ_t (x_t − α_t mean) / (α_t² s² + σ_t²); s = 0 is the one image
    `mean`. The DDIM ODE of such data is known in closed form, so inversion has a right answer."""

    def __init__(self, diffusion, mean, spread=0.0):
        super().__init__()
        self.diffusion, self.mean, self.spread = diffusion, mean, spread
        self.num_classes = None
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, t, class_labels=None):
        alpha_bar = self.diffusion.alphas_cumprod[t].view(-1, 1, 1, 1).double()
        alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        return (sigma * (x.double() - alpha * self.mean) / (alpha_bar * self.spread ** 2 + sigma ** 2)).float()


@pytest.mark.parametrize("levels,jump_length,jump_count", [(250, 10, 10), (50, 5, 5), (20, 7, 3), (10, 10, 3),
                                                            (12, 1, 2), (8, 3, 1)])
def test_repaint_visits_the_levels_diffusers_repaint_scheduler_does(levels, jump_length, jump_count):
    from diffusers import RePaintScheduler
    scheduler = RePaintScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(levels, jump_length=jump_length, jump_n_sample=jump_count)
    theirs = [t // (1000 // levels) for t in scheduler.timesteps.tolist()]  # their timesteps, on our levels
    path = repaint_levels(levels, jump_length, jump_count)
    assert path[0] == levels and path[1:] == theirs and path[-1] == 0
    down = sum(b < a for a, b in zip(path, path[1:]))               # the network evaluations
    assert down == levels + (math.ceil(levels / jump_length) - 1) * (jump_count - 1) * jump_length


def test_repaint_levels_pinned():
    assert repaint_levels(6, 2, 2) == [6, 5, 4, 3, 2, 3, 4, 3, 2, 1, 0, 1, 2, 1, 0]
    assert repaint_levels(4, 2, 1) == [4, 3, 2, 1, 0]


def test_repaint_keeps_the_known_region_exactly_and_fills_the_rest():
    d = diffusion(50)
    torch.manual_seed(0)
    known = torch.rand(3, 3, 8, 8) * 2 - 1
    fill = fill_masks("centre", 3, (8, 8), 0)
    other = torch.full((3, 3, 8, 8), 0.5)                           # what the model believes the images are
    steps = list(range(49, -1, -5))
    out = repaint(d, ExactModel(d, other), known, fill, steps, None, [1.0] * len(steps), jump_length=2, jump_count=3)
    assert torch.equal(out[:, :, fill[0, 0] == 0], known[:, :, fill[0, 0] == 0])
    assert torch.allclose(out[:, :, fill[0, 0] == 1], other[:, :, fill[0, 0] == 1], atol=1e-4)


def test_masks_cover_what_they_say(tmp_path):
    centre, left = fill_masks("centre", 2, (8, 6), 0), fill_masks("left", 1, (8, 6), 0)
    assert centre[0, 0].sum() == 9 and torch.equal(centre[0, 0, 2:5, 1:4], torch.ones(3, 3))
    assert left[0, 0, :, :3].all() and not left[0, 0, :, 3:].any()
    strokes = fill_masks("strokes", 4, (32, 32), 7)
    assert torch.equal(strokes, fill_masks("strokes", 4, (32, 32), 7))  # from the seed
    assert 0.05 < strokes.mean() < 0.7 and not torch.equal(strokes[0], strokes[1])
    pixels = np.zeros((8, 6), np.uint8)
    pixels[0, :2] = 255
    Image.fromarray(pixels).save(tmp_path / "mask.png")
    mask = fill_masks(str(tmp_path / "mask.png"), 3, (8, 6), 0)
    assert mask.shape == (3, 1, 8, 6) and mask.sum() == 6 and mask[:, 0, 0, :2].all()


def test_an_exact_one_image_model_inverts_and_reconstructs_within_float_tolerance():
    d = diffusion(100)
    image = torch.rand(1, 3, 8, 8) * 2 - 1
    model = ExactModel(d, image)
    steps = d.sampling_timesteps(15)
    noise = ddim_invert(d, model, image, steps, None, [1.0] * 15)
    back = d.ddim(model, noise, steps, None, [1.0] * 15)
    assert (back - image).abs().max() < 1e-5


def test_inversion_of_gaussian_data_converges_to_the_exact_ode():
    """For data N(0, s² I) the DDIM ODE maps x_0 to x_T = x_0 · √(ᾱ_T s² + 1 − ᾱ_T) / s exactly; the inversion's
    error shrinks as the steps grow, and the round trip with it."""
    d, s = diffusion(1000), 0.5
    model = ExactModel(d, torch.zeros(1), spread=s)
    x0 = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * s
    exact = x0 * math.sqrt(d.alphas_cumprod[-1].item() * s ** 2 + 1 - d.alphas_cumprod[-1].item()) / s
    errors, round_trips = [], []
    for count in (10, 50, 250):
        steps = d.sampling_timesteps(count)
        noise = ddim_invert(d, model, x0, steps, None, [1.0] * count)
        errors.append(((noise - exact).norm() / exact.norm()).item())
        round_trips.append((d.ddim(model, noise, steps, None, [1.0] * count, clip_denoised=False) - x0).abs().max())
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.02, errors
    assert round_trips[0] > round_trips[2] and round_trips[2] < 0.02, round_trips


def test_psnr_pinned():
    originals = torch.zeros(2, 1, 2, 2, dtype=torch.uint8)
    images = torch.full((2, 1, 2, 2), -1.0)
    images[1, 0, 0, 0] = -1 + 2 * 10 / 255                           # one pixel 10 levels off: MSE 25
    scores = psnr(originals, images)
    assert math.isinf(scores[0]) and scores[1] == pytest.approx(10 * math.log10(255 ** 2 / 25))


def test_slerp_pinned():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    assert torch.allclose(slerp(a, b, 0.5), torch.tensor([math.sqrt(0.5)] * 2))
    assert torch.allclose(slerp(a, b, 1 / 3), torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]))
    assert torch.allclose(slerp(a, 2 * a, 0.25), torch.tensor([1.25, 0.0]))  # parallel: the straight line
    noise_a, noise_b = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    middle = slerp(noise_a, noise_b, 0.5)
    line = torch.lerp(noise_a, noise_b, 0.5)  # a straight line's midpoint: about 1/√2 of the norm
    assert abs(middle.norm() / noise_a.norm() - 1) < 0.05 < 1 - line.norm() / noise_a.norm()


class Labelled(torch.nn.Module):
    """A conditional 'network' whose output is its class label (the null label num_classes too)."""
    num_classes = 3

    def forward(self, x, t, class_labels):
        return class_labels.float().view(-1, 1, 1, 1).expand_as(x).clone()


def test_class_mix_blends_guided_predictions():
    x, t = torch.zeros(3, 1, 2, 2), torch.zeros(3, dtype=torch.long)
    mix = ClassMix(torch.tensor([0, 0, 0]), torch.tensor([2, 2, 2]), torch.tensor([0.0, 0.25, 1.0]))
    out = guided_prediction(Labelled(), x, t, mix, 2.0)  # guided: null + 2 (c − null) = 2c − 3
    assert out[:, 0, 0, 0].tolist() == [-3.0, -3.0 + 0.25 * 4, 1.0]
    assert torch.equal(out[0], guided_prediction(Labelled(), x[:1], t[:1], torch.tensor([0]), 2.0)[0])


def edit(trained, tmp_path, *argv, model="cond"):
    return run_main("--inference", "--model_path", trained / "models" / model / "ckpt.pt", "--sampling_steps", "4",
                    "--no_cuda", "--save_dir", tmp_path / "out", *argv, cwd=tmp_path)


def test_inpainting_keeps_the_known_region_of_test_images(trained, tmp_path):
    result = edit(trained, tmp_path, "--inpaint", "centre", "--conditional", "--images", "0,3,9", "--jump_length",
                  "2", "--jump_count", "2")
    assert result.returncode == 0, result.stderr
    assert "RePaint, jumps of 2 levels made 2 times, on ddim, 4 steps, eta 1.0, guidance" in result.stdout
    saved = np.load(tmp_path / "out" / "inpaint_cond.npz")
    keep = ~saved["fill"]
    assert saved["inputs"].shape == (3, 16, 16, 3) and saved["fill"][:, 4:12, 4:12].all() and keep.sum() == 3 * 192
    assert np.array_equal(saved["outputs"][keep], saved["inputs"][keep])
    assert not np.array_equal(saved["outputs"][~keep], saved["inputs"][~keep])
    assert (tmp_path / "out" / "inpaint_cond.png").stat().st_size > 0


def test_inpainting_with_strokes_and_a_mask_file(trained, tmp_path):
    pixels = np.zeros((16, 16), np.uint8)
    pixels[:, 10:] = 255
    Image.fromarray(pixels).save(tmp_path / "right.png")
    result = edit(trained, tmp_path, "--inpaint", "right.png", "--num_samples", "2", model="uncond")
    assert result.returncode == 0, result.stderr
    saved = np.load(tmp_path / "out" / "inpaint_uncond.npz")
    assert saved["fill"].shape == (2, 16, 16) and saved["fill"][:, :, 10:].all() and not saved["fill"][:, :, :10].any()
    assert np.array_equal(saved["outputs"][:, :, :10], saved["inputs"][:, :, :10])
    strokes = edit(trained, tmp_path, "--inpaint", "strokes", "--images", "1", model="uncond")
    assert strokes.returncode == 0 and "of the pixels filled" in strokes.stdout, strokes.stderr


def test_inversion_writes_its_psnr_and_the_interpolation_ends_are_the_reconstructions(trained, tmp_path):
    inverted = edit(trained, tmp_path, "--invert", "--conditional", "--images", "2,7")
    assert inverted.returncode == 0, inverted.stderr
    assert "ddim, 4 steps, eta 0.0, guidance 1.0" in inverted.stdout and "PSNR" in inverted.stdout
    import json
    report = json.loads((tmp_path / "out" / "invert_cond.json").read_text())
    arrays = np.load(tmp_path / "out" / "invert_cond.npz")
    assert report["images"] == ["test 2", "test 7"] and report["network_evaluations_per_image"] == 8
    assert report["psnr_db"] == pytest.approx(arrays["psnr_db"].tolist())
    assert arrays["noises"].shape == (2, 3, 16, 16) and arrays["reconstructions"].shape == (2, 16, 16, 3)
    strip = edit(trained, tmp_path, "--interpolate", "2,7", "--conditional", "--frames", "5")
    assert strip.returncode == 0, strip.stderr
    frames = np.load(tmp_path / "out" / "interpolate_cond.npz")
    assert frames["frames"].shape == (5, 16, 16, 3) and frames["weights"].tolist() == [0, 0.25, 0.5, 0.75, 1]
    assert np.allclose(frames["noises"][[0, -1]], arrays["noises"], atol=1e-5)
    ends = frames["frames"][[0, -1]].astype(int)
    assert np.abs(ends - arrays["reconstructions"].astype(int)).max() <= 1  # a batch of 5, not 2: float rounding


def test_interpolation_between_two_seeds_and_two_classes(trained, tmp_path):
    result = edit(trained, tmp_path, "--interpolate", "seed:1,seed:2", "--conditional", "--sample_classes", "0,4",
                  "--frames", "3")
    assert result.returncode == 0, result.stderr
    frames = np.load(tmp_path / "out" / "interpolate_cond.npz")
    for end, seed in ((0, 1), (-1, 2)):  # each end the noise of its seed, exactly
        assert np.array_equal(frames["noises"][end], torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(
            seed)).numpy())
    assert "interpolated seed 1 → seed 2 in 3 frames" in result.stdout
    assert (tmp_path / "out" / "interpolate_cond.png").stat().st_size > 0


def test_image_items():
    assert [(i.kind, i.value) for i in image_items()("3, a.png,7")] == [("test", 3), ("file", "a.png"), ("test", 7)]
    assert [(i.kind, i.value) for i in image_items(ends=True)("seed:-2,b.jpg")] == [("seed", -2), ("file", "b.jpg")]
    assert image_items()("seed:5")[0].kind == "file"  # seeds only where noise can stand for an image
