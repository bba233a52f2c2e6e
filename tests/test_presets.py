"""Ho et al.'s network (DDPMUNet) and the U-Net options, the presets (--preset ddpm_cifar10 is the paper's 35,746,307-
parameter network and recipe; speedrun is bench/speedrun.py's; cpu is the recipe study's best row), and the denoising
strip."""
import json
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import ddpm_flags
import ddpm_main
from conftest import ROOT, run_main
from ddpm_checkpoint import export_for_inference, load_checkpoint, load_sampling_model
from ddpm_config import preset_flags, training_config
from ddpm_presets import preset_network
from ddpm_data import CIFAR10_CLASSES
from ddpm_flags import flags_markdown
from ddpm_model import Attention, DDPMUNet, ResnetBlock, StridedConvDownsample, UNet, UNetConfig, build_unet
from ddpm_presets import PRESETS
from ddpm_runtime import parameter_count
from ddpm_sample import asked_sampling, sampler_settings

CIFAR10 = {"dataset": "cifar10", "classes": CIFAR10_CLASSES, "channels": 3, "data_size": [32, 32], "num_train": 45000,
           "num_val": 5000, "num_test": 10000}
PAPER_PARAMETERS = 35_746_307  # Ho et al.'s CIFAR-10 model in its published PyTorch port
SHIPPED = os.path.join(ROOT, "models", "cifar10_cond_speedrun", "ckpt.pt")
sys.path.insert(0, os.path.join(ROOT, "bench"))  # the speedrun's and the recipe study's recipes, which two presets must match


def config_of(argv):
    """The training config a command line resolves to on CIFAR-10 (the data's facts given, nothing read)."""
    args = ddpm_flags.parse_command_line(ddpm_flags.build_parser(), argv)
    sampling = sampler_settings(asked_sampling(args), None, args.timesteps)
    return training_config({**vars(args), "world_size": 1, "sampling": sampling}, CIFAR10)


def test_the_paper_preset_is_the_papers_network_and_recipe():
    config = config_of(["--preset", "ddpm_cifar10"])
    assert parameter_count(UNetConfig.from_dict(config["model"])) == PAPER_PARAMETERS
    assert UNetConfig.from_dict(config["model"]) == preset_network("ddpm_cifar10")
    assert config["model"] == {**config["model"], "architecture": "ddpm", "dim": 128, "dim_mults": [1, 2, 2, 2],
                               "num_res_blocks": 2, "attn_resolutions": [16], "dropout": 0.1, "resblock": "add",
                               "groups": 32, "num_classes": None, "image_size": 32}
    assert {key: config[key] for key in ("timesteps", "schedule", "prediction", "loss_type", "lr", "warmup_steps",
                                         "weight_decay", "lr_decay", "batch_size", "ema_decay")} == {
        "timesteps": 1000, "schedule": "linear", "prediction": "eps", "loss_type": "l2", "lr": 2e-4,
        "warmup_steps": 5000, "weight_decay": 0.0, "lr_decay": "none", "batch_size": 128, "ema_decay": 0.9999}
    steps_per_epoch = math.ceil(config["num_train"] / config["batch_size"])
    assert 800_000 <= config["epochs"] * steps_per_epoch < 800_000 + steps_per_epoch  # 800k steps
    assert config["sampling"]["sampler"] == "ddpm"
    network = build_unet(UNetConfig.from_dict(config["model"]))
    attended = [m for m in network.modules() if isinstance(m, Attention)]
    assert len(attended) == 2 + 3 + 1  # the 16×16 stage's blocks down (2) and up (3), and the middle
    assert parameter_count(UNetConfig.from_dict(config_of(["--preset", "ddpm_cifar10", "--conditional"])["model"])) \
        == PAPER_PARAMETERS  # a lower bound for conditional networks: the class embedding left out


def test_flags_given_beside_a_preset_override_it_and_help_and_docs_list_every_preset(capsys):
    config = config_of(["--preset", "ddpm_cifar10", "--lr", "1e-4", "--dropout", "0", "--dim", "64"])
    assert (config["lr"], config["model"]["dropout"], config["model"]["dim"]) == (1e-4, 0.0, 64)
    assert config["model"]["architecture"] == "ddpm" and config["warmup_steps"] == 5000
    with pytest.raises(SystemExit):
        ddpm_main.main(["--help"])
    assert f"--preset {{{','.join(PRESETS)}}}" in capsys.readouterr().out
    docs = flags_markdown()  # docs/flags.md, which tests/test_config.py keeps equal to it
    for name, (what, flags) in PRESETS.items():
        assert f"**{name}**: {what}. `{preset_flags(name)}`" in docs
    assert "--dim_mults 1,2,2,2" in docs and "--lr 0.0002" in docs


def test_the_speedrun_preset_is_bench_speedruns_recipe():
    import speedrun
    assert speedrun.TRAIN_ARGS == ["--preset", "speedrun"]
    config = config_of(speedrun.TRAIN_ARGS)
    assert (config["model"]["dim"], config["model"]["dim_mults"], config["batch_size"], config["lr"],
            config["ema_decay"]) == (48, [1, 2, 2], 500, 2e-3, 0.9995)
    assert config["model"]["architecture"] == "compact"


def test_the_cpu_preset_is_the_recipe_studys_best_row():
    import recipe_study
    row_flags, _ = recipe_study.ROWS["lr_2e-3_attn_8_batch_32"]
    study_row = config_of([*recipe_study.SHIPPED_RECIPE, *row_flags, "--epochs", "1000", "--time_budget_min", "20"])
    preset = config_of(["--preset", "cpu", "--conditional"])
    assert {**preset, "preset": None} == {**study_row, "preset": None}
    assert (preset["lr"], preset["batch_size"], preset["model"]["attn_resolutions"], preset["time_budget_min"]) == \
        (2e-3, 32, [8], 20)
    network = build_unet(UNetConfig.from_dict(preset["model"]))
    assert sum(p.numel() for p in network.parameters()) == 3_039_571  # the row's count in bench/recipe_study.json


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


@pytest.fixture(scope="module")
def paper_preset_run(tiny_data, tmp_path_factory):
    """A 1-epoch run of the paper preset, shrunk to the tiny data (16×16 images, T = 10)."""
    cwd = tmp_path_factory.mktemp("preset")
    result = run_main("--preset", "ddpm_cifar10", "--data_dir", tiny_data, "--dim", "8", "--groups", "4",
                      "--dim_mults", "1,2", "--attn_resolutions", "8", "--timesteps", "10", "--batch_size", "8",
                      "--epochs", "1", "--eval_every", "1", "--save_model", "--run_name", "paper", "--no_cuda",
                      "--precision", "fp32", cwd=cwd)
    assert result.returncode == 0, result.stderr
    return cwd


def test_a_preset_run_stores_its_network_and_inference_rebuilds_it(paper_preset_run, tmp_path):
    config = json.load(open(paper_preset_run / "models" / "paper" / "config.json"))
    assert config["model"]["architecture"] == "ddpm" and config["model"]["dropout"] == 0.1
    assert config["weight_decay"] == 0 and config["sampling"]["sampler"] == "ddpm"
    result = run_main("--inference", "--model_path", paper_preset_run / "models" / "paper" / "ckpt.pt",
                      "--denoising_strip", "--save_dir", tmp_path, "--precision", "fp32", cwd=paper_preset_run)
    assert result.returncode == 0, result.stderr
    assert "denoising strip (8 samples, x̂_0 at 10 of 10 steps, ddpm" in result.stdout
    assert (tmp_path / "denoising_strip_paper.png").stat().st_size > 0 and not (tmp_path / "samples_paper.png").exists()


def test_the_denoising_strip_of_a_conditional_model_takes_its_classes(trained, tmp_path):
    result = run_main("--inference", "--model_path", trained / "models" / "cond" / "ckpt.pt", "--denoising_strip",
                      "--conditional", "--sample_classes", "1,2", "--num_samples", "4", "--sampler", "ddim",
                      "--sampling_steps", "4", "--save_dir", tmp_path, "--precision", "fp32", cwd=trained)
    assert result.returncode == 0, result.stderr
    assert "denoising strip (4 samples, x̂_0 at 4 of 4 steps, ddim" in result.stdout


@pytest.mark.parametrize("argv,message", [
    (["--preset", "ddpm_cifar10", "--inference", "--model_path", "x.pt"], "--preset sets up a new training run"),
    (["--preset", "ddpm_cifar10", "--resume", "auto"], "--preset sets up a new training run"),
    (["--preset", "nonsense"], "invalid choice"),
    (["--denoising_strip"], "--denoising_strip goes with --inference"),
    (["--dropout", "1"], "--dropout must be in [0, 1)"),
    (["--dim", "24", "--groups", "16"], "--dim must be a multiple of --groups 16"),
    (["--attn_resolutions", "5", "--epochs", "1"], "--attn_resolutions 5: no stage works at 5 pixels a side"),
])
def test_bad_network_and_preset_flags_stop_with_one_line(tiny_data, tmp_path, argv, message):
    result = run_main("--data_dir", tiny_data, *argv, "--no_cuda", cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "models").exists()
