"""The U-Net: shapes, conditioning, learning, and checkpoint round trips."""
import pytest
import torch

from ddpm_diffusion import Diffusion, cosine_beta_schedule
from ddpm_checkpoint import CHECKPOINT_FORMAT, load_checkpoint, write_checkpoint
from ddpm_model import UNet, UNetConfig


@pytest.mark.parametrize("kwargs,size", [({}, 32), ({"dim": 8, "dim_mults": (1, 2, 2)}, 16),
                                         ({"dim": 8, "dim_mults": (1, 2), "num_classes": 10}, 16),
                                         ({"dim": 8, "dim_mults": (1,), "channels": 1}, 8)])
def test_output_shape_equals_input_shape(kwargs, size):
    model = UNet(**kwargs)
    channels = kwargs.get("channels", 3)
    x = torch.randn(2, channels, size, size)
    assert model(x, torch.tensor([0, 99])).shape == x.shape


def test_default_model_size():
    assert UNet().num_classes is None
    assert 2.5e6 < sum(p.numel() for p in UNet().parameters()) < 2.7e6  # the seed's 2.6M U-Net


def test_class_label_changes_output_and_null_label_is_default():
    torch.manual_seed(0)
    model = UNet(dim=8, dim_mults=(1, 2), num_classes=10)
    with torch.no_grad():  # the class embedding reaches the output through FiLM
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 5])
    out_a = model(x, t, torch.tensor([0, 0]))
    out_b = model(x, t, torch.tensor([7, 7]))
    assert not torch.allclose(out_a, out_b)
    assert torch.equal(model(x, t), model(x, t, torch.tensor([10, 10])))


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = UNet(dim=8, dim_mults=(1, 2))
    d = Diffusion(10, cosine_beta_schedule)
    x0 = torch.rand(8, 3, 16, 16) * 2 - 1
    t, noise = torch.randint(0, 10, (8,)), torch.randn(8, 3, 16, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):  # the loss falls to about 5 % of its start
        loss = d.p_losses(model, x0, t, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


def test_checkpoint_round_trip_reproduces_outputs(tmp_path):
    torch.manual_seed(0)
    config = UNetConfig(dim=8, dim_mults=(1, 2), num_classes=10)
    model = UNet(config)
    path = str(tmp_path / "ckpt.pt")
    write_checkpoint({"format": CHECKPOINT_FORMAT, "config": {"model": config.to_dict(), "timesteps": 10,
                                                              "schedule": "cosine", "image_size": 16,
                                                              "classes": [f"c{i}" for i in range(10)]},
                      "model": model.state_dict()}, path)
    ckpt = load_checkpoint(path)
    rebuilt = UNet(UNetConfig.from_dict(ckpt["config"]["model"]))
    rebuilt.load_state_dict(ckpt["model"])
    x, t, y = torch.randn(3, 3, 16, 16), torch.tensor([0, 4, 9]), torch.tensor([1, 2, 10])
    assert torch.equal(model(x, t, y), rebuilt(x, t, y))
    assert rebuilt.config == config
    assert not list(tmp_path.glob("*.tmp*"))
