"""The fast path computes the same function as the plain fp32 path; the device-resident loader is exact."""
import pytest
import torch

import ddpm_data
import ddpm_pictures
from conftest import make_image_folder
from ddpm_data import DeviceLoader, load_dataset
from ddpm_diffusion import Diffusion, SamplerSettings, cosine_beta_schedule
from ddpm_model import UNet
from ddpm_runtime import Denoiser


@pytest.fixture
def model():
    torch.manual_seed(0)
    return UNet(dim=8, dim_mults=(1, 2), num_classes=10)


def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 3, 16, 16, generator=g) * 2 - 1
    return x, torch.randint(0, 10, (8,), generator=g), torch.randint(0, 10, (8,), generator=g), \
        torch.randn(8, 3, 16, 16, generator=g)


def test_bf16_loss_and_gradients_match_fp32(model):
    d = Diffusion(10, cosine_beta_schedule)
    x, t, y, noise = batch()
    plain = d.p_losses(model, x, t, noise, class_labels=y)
    plain_grads = torch.autograd.grad(plain, list(model.parameters()))
    fast = d.p_losses(Denoiser(model, precision="bf16"), x, t, noise, class_labels=y)
    fast_grads = torch.autograd.grad(fast, list(model.parameters()))
    assert fast.item() == pytest.approx(plain.item(), rel=2e-2)
    cosine = torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in plain_grads]),
                                                   torch.cat([g.flatten() for g in fast_grads]), dim=0)
    assert cosine > 0.99


def test_compile_failure_falls_back_to_eager(model, monkeypatch, capsys):
    def broken_compile(module, **kwargs):
        def fail(*args, **kw):
            raise RuntimeError("no C++ compiler")
        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    x, t, y, _ = batch()
    denoiser = Denoiser(model, compile=True)
    assert torch.equal(denoiser(x, t, y), model(x, t, y))
    assert not denoiser.compiled and "torch.compile failed" in capsys.readouterr().err


def test_fast_sampling_matches_plain_sampling(model):
    d = Diffusion(10, cosine_beta_schedule)
    noise = torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    for settings in (SamplerSettings("dpm++2m"), SamplerSettings("ddim"), SamplerSettings("ddpm")):
        torch.manual_seed(3)
        plain = d.sample(model, noise.shape, settings, labels, noise=noise)
        torch.manual_seed(3)
        fast = d.sample(Denoiser(model, precision="bf16"), noise.shape, settings, labels, noise=noise)
        assert (fast - plain).abs().mean() < 0.02, settings


def test_loader_yields_every_image_once_per_epoch_flipped_about_half():
    n = 1000
    images = torch.randint(0, 256, (n, 3, 4, 4), dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(n) % 256  # make every image identifiable and asymmetric
    images[:, 1, 0, 0] = torch.arange(n) // 256
    images[:, :, :, -1] = 0
    loader = DeviceLoader(images, torch.arange(n), 64, "cpu", seed=3)
    assert len(loader) == 16
    seen, flipped = [], 0
    for x, idx in loader.batches(epoch=1):
        assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
        original = ddpm_pictures.to_model_range(images[idx])
        is_flipped = (x == original.flip(3)).flatten(1).all(1)
        assert (is_flipped | (x == original).flatten(1).all(1)).all()
        flipped += int(is_flipped.sum())
        seen += idx.tolist()
    assert sorted(seen) == list(range(n))
    assert 0.4 * n < flipped < 0.6 * n
    order_2 = torch.cat([idx for _, idx in loader.batches(epoch=2)])
    assert not torch.equal(order_2, torch.tensor(seen))  # a new order every epoch
    resumed = torch.cat([idx for _, idx in loader.batches(epoch=2, start_batch=5)])
    assert torch.equal(resumed, order_2[5 * 64:])  # an epoch can be replayed from any batch


def test_loader_shards_are_disjoint_and_cover_the_epoch():
    images, labels = torch.zeros(103, 3, 2, 2, dtype=torch.uint8), torch.arange(103)
    loaders = [DeviceLoader(images, labels, 8, "cpu", seed=1, rank=r, world_size=3) for r in range(3)]
    shards = [torch.cat([y for _, y in loader.batches(epoch=4)]) for loader in loaders]
    assert [len(s) for s in shards] == [34, 34, 34] and len({len(loader) for loader in loaders}) == 1
    seen = torch.cat(shards)
    assert len(set(seen.tolist())) == 102  # disjoint; 103 % 3 = 1 image waits for the next epoch's order
    order, _ = DeviceLoader(images, labels, 8, "cpu", seed=1).epoch_indices(4)
    assert sorted(seen.tolist()) == sorted(order[:102].tolist())  # exactly the single-process epoch, cut


def test_uint8_cache_is_written_and_reused(tmp_path, monkeypatch):
    root = make_image_folder(str(tmp_path / "d"), per_class_train=2, num_classes=3)
    first = load_dataset(root)
    assert (tmp_path / "d" / ddpm_data.CACHE_NAME).is_file()
    monkeypatch.setattr(ddpm_data, "_decode", lambda path: pytest.fail("decoded again"))
    second = load_dataset(root)
    assert torch.equal(first["train_images"], second["train_images"]) and second["classes"] == first["classes"]
    assert first["train_images"].dtype == torch.uint8 and first["train_images"].shape == (6, 3, 16, 16)
