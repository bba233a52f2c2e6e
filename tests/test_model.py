"""The U-Nets (ddpm_model): shapes, conditioning, Ho et al.'s layout, sizes, and that they learn."""
import pytest
import torch
import torch.nn.functional as F

from conftest import SHIPPED
from ddpm_checkpoint import (CHECKPOINT_FORMAT, export_for_inference, load_checkpoint, load_sampling_model,
                             write_checkpoint)
from ddpm_diffusion import Diffusion, cosine_beta_schedule
from ddpm_model import Attention, DDPMUNet, ResnetBlock, StridedConvDownsample, UNet, UNetConfig, build_unet


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


def test_ddpm_unet_shapes_conditioning_and_dropout():
    torch.manual_seed(0)
    config = UNetConfig(architecture="ddpm", dim=8, dim_mults=(1, 2, 2), groups=4, attn_resolutions=(8,),
                        dropout=0.5, resblock="add", image_size=16, num_classes=3)
    model = build_unet(config)
    assert isinstance(model, DDPMUNet)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0, 7])
    model.eval()
    out = model(x, t, torch.tensor([0, 1]))
    assert out.shape == x.shape and torch.equal(out, model(x, t, torch.tensor([0, 1])))  # eval: no dropout
    assert not torch.equal(out, model(x, t, torch.tensor([2, 2])))
    assert torch.equal(model(x, t), model(x, t, torch.tensor([3, 3])))  # no label: the null label
    model.train()
    assert not torch.equal(model(x, t, torch.tensor([0, 1])), model(x, t, torch.tensor([0, 1])))  # dropout


def test_the_papers_residual_block_adds_the_embedding_after_the_first_convolution():
    torch.manual_seed(0)
    block = ResnetBlock(4, 8, 16, groups=2, resblock="add").eval()
    x, emb = torch.randn(2, 4, 5, 5), torch.randn(2, 16)
    h = block.conv1(F.silu(F.group_norm(x, 2, block.norm1.weight, block.norm1.bias)))
    h = h + block.emb_proj[1](F.silu(emb))[:, :, None, None]
    h = block.conv2(F.silu(F.group_norm(h, 2, block.norm2.weight, block.norm2.bias)))
    assert torch.allclose(block(x, emb), h + block.skip(x), atol=1e-6)


def test_the_papers_downsampling_pads_right_and_bottom_as_tensorflows_same():
    down = StridedConvDownsample(1)
    with torch.no_grad():
        down.conv.weight.fill_(1.0)
        down.conv.bias.zero_()
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    # windows start at rows/columns 0 and 2; the second reaches the zero padding past row and column 3
    expected = torch.tensor([[x[0, 0, 0:3, 0:3].sum(), x[0, 0, 0:3, 2:4].sum()],
                             [x[0, 0, 2:4, 0:3].sum(), x[0, 0, 2:4, 2:4].sum()]])
    assert torch.equal(down(x)[0, 0], expected)


def test_compact_unet_options_blocks_attention_sides_and_the_add_block():
    config = UNetConfig(dim=8, dim_mults=(1, 2, 2), num_res_blocks=3, attn_resolutions=(4,), resblock="add",
                        image_size=16)
    model = build_unet(config)
    assert isinstance(model, UNet) and len(model.downs[0]) == 3 + 2  # three blocks, attention, down-sampling
    assert [isinstance(stage[3], Attention) for stage in model.downs] == [False, False, True]  # sides 16, 8, 4
    x = torch.randn(2, 3, 16, 16)
    assert model(x, torch.tensor([1, 2])).shape == x.shape


def test_older_checkpoints_build_the_network_they_were_trained_as(tmp_path):
    """A file written before the U-Net options (the first shipped model's model entry, at dim 8) lacks them."""
    older_model = {"dim": 8, "dim_mults": [1, 2, 2], "channels": 3, "num_classes": 10, "class_emb_dim": 128,
                   "groups": 8, "attn_heads": 4, "attn_dim_head": 32}
    config = {**load_checkpoint(SHIPPED)["config"], "model": older_model}
    export_for_inference({"config": config, "ema": UNet(UNetConfig.from_dict(older_model)).state_dict()},
                         tmp_path / "older.pt")
    _, model = load_sampling_model(tmp_path / "older.pt")
    assert isinstance(model, UNet) and model.config.architecture == "compact"
    assert [type(stage[2]).__name__ for stage in model.downs] == ["Identity", "Attention", "Attention"]
