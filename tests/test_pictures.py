"""Pictures (ddpm_pictures): the forward-process strip, loss curves, PNGs."""
import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_pictures import tile


def test_forward_process_strip_and_loss_curves(trained):
    strip = Image.open(trained / "outputs" / "forward_process_cond.png")
    assert strip.size == (10 * 18 + 2, 18 + 2)  # ten 16-px images, t = 0 … T−1
    pixels = np.asarray(strip.convert("RGB"), dtype=float)
    first, last = pixels[2:18, 2:18], pixels[2:18, -18:-2]
    assert first.std() != last.std()  # t = 0 is the image, t = T−1 is noise
    assert Image.open(trained / "outputs" / "loss_curves_cond.png").size[0] > 300


def test_individual_pngs_replace_an_earlier_larger_batch(tmp_path):
    from ddpm_pictures import save_individual_pngs
    (tmp_path / "notes.txt").write_text("kept")
    save_individual_pngs(torch.zeros(3, 3, 4, 4), str(tmp_path))
    save_individual_pngs(torch.zeros(2, 3, 4, 4), str(tmp_path), torch.tensor([0, 1]), ["cat", "dog"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000_cat.png", "00001_dog.png", "notes.txt"]


@pytest.mark.parametrize("count, channels, nrow", [(1, 3, 8), (5, 3, 2), (8, 1, 8), (10, 3, 4), (3, 1, 7)])
def test_tile_draws_the_grid_torchvision_draws(count, channels, nrow):
    from torchvision.utils import make_grid
    images = torch.rand(count, channels, 6, 5, generator=torch.Generator().manual_seed(count)) * 2.4 - 1.2
    assert torch.equal(tile(images, nrow), make_grid(images, nrow=nrow, normalize=True, value_range=(-1, 1), padding=2))
