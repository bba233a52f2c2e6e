"""Foreign weights: Ho et al.'s network imported from diffusers' UNet2DModel (new and old attention names) and from
pesser/pytorch_diffusion's state dict, exported back to a diffusers DDPMPipeline, fetched by name (here from a file://
URL), refused when damaged or foreign; GroupNorm's ε and float64; the ancestral sampler's σ_t² = β_t."""
import hashlib
import json
import math
import os
import re
import socket

import pytest
import torch
from diffusers import DDPMPipeline, UNet2DModel
from safetensors.torch import load_file

import ddpm_interop
from conftest import GOOGLE_CONFIG, SMALL_CONFIG, random_unet, run_main
from ddpm_checkpoint import load_checkpoint, load_sampling_model
from ddpm_download import RemoteFile
from ddpm_interop import import_weights, read_foreign
from ddpm_model import DDPMUNet, UNetConfig, build_unet
from ddpm_presets import preset_network

TIMESTEPS = torch.tensor([0, 1, 500, 999])


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def eps_of(net, x, t, diffusers=False):
    with torch.no_grad():
        return net(x, t).sample if diffusers else net(x, t)


def imported_network(path):
    imported = import_weights(read_foreign(str(path)))
    net = DDPMUNet(imported.network).eval()
    net.load_state_dict(imported.weights)
    return net, imported


@pytest.fixture(scope="module")
def google_folder(tmp_path_factory):
    """(folder, UNet2DModel) of a random UNet2DModel of google/ddpm-cifar10-32's configuration, saved by diffusers."""
    folder = tmp_path_factory.mktemp("hub") / "ddpm-cifar10-32"
    unet = random_unet(GOOGLE_CONFIG)
    unet.save_pretrained(folder)
    return folder, unet


def test_the_google_configuration_imports_to_the_eps_diffusers_computes(google_folder):
    folder, unet = google_folder
    net, imported = imported_network(folder)
    assert imported.network == preset_network("ddpm_cifar10") and net.config.norm_eps == 1e-6
    assert sum(p.numel() for p in net.parameters()) == 35_746_307
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert relative_error(eps_of(net, x, TIMESTEPS), eps_of(unet, x, TIMESTEPS, diffusers=True)) <= 1e-5
    assert (imported.timesteps, imported.schedule, imported.prediction, imported.variance) == (1000, "linear", "eps",
                                                                                               "beta")


def old_attention_names(tensors):
    """diffusers' names before 0.14: query, key, value and proj_attn for to_q, to_k, to_v and to_out.0."""
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    return {re.sub(r"\.(to_q|to_k|to_v|to_out\.0)\.", lambda m: f".{renames[m.group(1)]}.", name): t
            for name, t in tensors.items()}


def test_a_bin_file_with_the_old_attention_names_imports_the_same(small_folder, tmp_path):
    folder, unet = small_folder
    old = tmp_path / "old"
    old.mkdir()
    tensors = old_attention_names(load_file(folder / "diffusion_pytorch_model.safetensors"))
    assert any(".query." in name for name in tensors) and not any(".to_q." in name for name in tensors)
    torch.save(tensors, old / "diffusion_pytorch_model.bin")
    (old / "config.json").write_text(json.dumps(SMALL_CONFIG))
    net, _ = imported_network(old / "diffusion_pytorch_model.bin")  # the file itself, its config.json beside it
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert relative_error(eps_of(net, x, TIMESTEPS), eps_of(unet, x, TIMESTEPS, diffusers=True)) <= 1e-5


def pesser_state_dict(diffusers_tensors, levels=4):
    """pesser/pytorch_diffusion's names for a diffusers UNet2DModel's tensors: the key map of pesser's
    model.py (temb.dense, down.i.block.j, down.i.attn.j with q/k/v/proj_out 1 × 1 convolutions, mid.block_1, up.i with
    i the level, so up_blocks.k is up.(levels − 1 − k), norm_out), written here independently of ddpm_interop."""
    out = {}
    for name, t in diffusers_tensors.items():
        new = name.replace("time_embedding.linear_1", "temb.dense.0").replace("time_embedding.linear_2", "temb.dense.1")
        new = re.sub(r"^down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", new)
        new = re.sub(r"^down_blocks\.(\d+)\.attentions\.", r"down.\1.attn.", new)
        new = re.sub(r"^down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", new)
        new = re.sub(r"^up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{levels - 1 - int(m.group(1))}.block.", new)
        new = re.sub(r"^up_blocks\.(\d+)\.attentions\.", lambda m: f"up.{levels - 1 - int(m.group(1))}.attn.", new)
        new = re.sub(r"^up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{levels - 1 - int(m.group(1))}.upsample.",
                     new)
        new = new.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
        new = new.replace("mid_block.attentions.0", "mid.attn_1").replace("conv_norm_out", "norm_out")
        new = new.replace("time_emb_proj", "temb_proj").replace("conv_shortcut", "nin_shortcut")
        new = new.replace("group_norm", "norm").replace("to_q", "q").replace("to_k", "k").replace("to_v", "v")
        new = new.replace("to_out.0", "proj_out")
        is_attention_linear = re.search(r"attn.*\.(q|k|v|proj_out)\.weight$", new)
        out[new] = t[:, :, None, None].clone() if is_attention_linear else t.clone()
    return out


@pytest.fixture(scope="module")
def pesser_file(google_folder, tmp_path_factory):
    folder, _ = google_folder
    path = tmp_path_factory.mktemp("pesser") / "model-790000.ckpt"
    torch.save(pesser_state_dict(load_file(folder / "diffusion_pytorch_model.safetensors")), path)
    return path


def test_a_pesser_state_dict_imports_to_the_same_network(google_folder, pesser_file):
    from_diffusers = import_weights(read_foreign(str(google_folder[0])))
    from_pesser = import_weights(read_foreign(str(pesser_file)))
    assert from_pesser.network == from_diffusers.network
    assert from_pesser.weights.keys() == from_diffusers.weights.keys()
    assert all(torch.equal(from_pesser.weights[k], from_diffusers.weights[k]) for k in from_pesser.weights)
    assert from_pesser.variance == "beta" and from_pesser.timesteps == 1000


def test_import_then_export_round_trips_through_the_cli(small_folder, tmp_path):
    folder, unet = small_folder
    result = run_main("--import_weights", folder, "--run_name", "small", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    ckpt_path = tmp_path / "models" / "small" / "ckpt.pt"
    assert "into models/small/ckpt.pt; it samples with ddpm, 1000 steps, σ_t² = β_t" in result.stderr
    ckpt, net = load_sampling_model(str(ckpt_path))
    config = ckpt["config"]
    assert config["sampling"]["sampler"] == "ddpm" and config["sampling"]["variance"] == "beta"
    assert config["model"]["norm_eps"] == 1e-6 and config["timesteps"] == 1000 and config["dataset"] == "cifar10"
    assert json.loads((tmp_path / "models" / "small" / "config.json").read_text())["model"]["groups"] == 8
    assert ckpt["imported_from"]["sha256"] == hashlib.sha256(
        (folder / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()
    result = run_main("--model_path", ckpt_path, "--export_diffusers", "exported", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "exported")) == ["config.json", "diffusion_pytorch_model.safetensors",
                                                         "model_index.json", "scheduler_config.json"]
    exported = UNet2DModel.from_pretrained(tmp_path / "exported").eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    assert relative_error(eps_of(exported, x, TIMESTEPS, diffusers=True), eps_of(net.eval(), x, TIMESTEPS)) <= 1e-5
    pipeline = DDPMPipeline.from_pretrained(tmp_path / "exported")
    assert pipeline.scheduler.config.variance_type == "fixed_large" and pipeline.scheduler.config.beta_end == 0.02
    images = pipeline(batch_size=1, num_inference_steps=2, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 32, 32, 3)


def test_sampling_flags_given_at_import_are_stored(small_folder, tmp_path):
    result = run_main("--import_weights", small_folder[0], "--run_name", "fast", "--sampler", "dpm++2m",
                      "--sampling_steps", "15", "--quiet", cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == ""
    sampling = load_checkpoint(str(tmp_path / "models" / "fast" / "ckpt.pt"))["config"]["sampling"]
    assert (sampling["sampler"], sampling["steps"], sampling["variance"]) == ("dpm++2m", 15, "beta")


def test_a_scheduler_config_sets_the_diffusion(small_folder, tmp_path):
    folder = tmp_path / "pipeline"
    (folder / "unet").mkdir(parents=True)
    (folder / "scheduler").mkdir()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        (folder / "unet" / name).write_bytes((small_folder[0] / name).read_bytes())
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"num_train_timesteps": 500, "beta_schedule": "squaredcos_cap_v2", "variance_type": "fixed_small",
         "prediction_type": "v_prediction"}))
    imported = import_weights(read_foreign(str(folder)))
    assert (imported.timesteps, imported.schedule, imported.variance, imported.prediction) == (500, "cosine",
                                                                                               "posterior", "v")


def test_export_refuses_the_compact_network_in_one_line(tmp_path):
    shipped = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models",
                           "cifar10_cond_speedrun", "ckpt.pt")
    result = run_main("--model_path", shipped, "--export_diffusers", "out", cwd=tmp_path)
    assert result.returncode == 2 and not (tmp_path / "out").exists()
    assert result.stderr.count("\n") == 1 and "is the compact U-Net, which has no diffusers twin" in result.stderr


def test_fetch_by_name_downloads_once_checks_the_md5_and_imports(pesser_file, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    md5 = hashlib.md5(pesser_file.read_bytes()).hexdigest()
    monkeypatch.setitem(ddpm_interop.PUBLISHED, "ho2020-ema", RemoteFile(
        pesser_file.as_uri(), md5, pesser_file.stat().st_size, "the test's weights", "--import_weights", "md5",
        "ho2020-ema.ckpt"))
    result = run_main("--import_weights", "ho2020-ema", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / "ho2020-ema.ckpt"
    assert cached.read_bytes() == pesser_file.read_bytes()
    assert "fetching the test's weights" in result.stderr and "into models/ho2020-ema/ckpt.pt" in result.stderr
    again = run_main("--import_weights", "ho2020-ema", "--run_name", "again", cwd=tmp_path)
    assert again.returncode == 0 and "fetching" not in again.stderr  # from the cache, checked by its MD5


def test_fetch_by_name_offline_or_with_other_bytes_is_one_line(pesser_file, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/?dl=1"
    monkeypatch.setitem(ddpm_interop.PUBLISHED, "ho2020-ema", RemoteFile(
        closed, "0" * 32, 10, "Ho et al.'s weights", "--import_weights", "md5", "ho2020-ema.ckpt"))
    result = run_main("--import_weights", "ho2020-ema", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert f"could not fetch Ho et al.'s weights from {closed}" in result.stderr
    assert "download it by hand and pass it with --import_weights PATH" in result.stderr
    monkeypatch.setitem(ddpm_interop.PUBLISHED, "ho2020-ema", RemoteFile(
        pesser_file.as_uri(), "0" * 32, 10, "Ho et al.'s weights", "--import_weights", "md5", "ho2020-ema.ckpt"))
    result = run_main("--import_weights", "ho2020-ema", cwd=tmp_path)
    assert result.returncode == 2 and "is not the expected one (MD5 " in result.stderr
    assert not os.listdir(tmp_path / "torch_home" / "hub" / "checkpoints") and not (tmp_path / "models").exists()


def test_the_hub_folder_by_name_says_how_to_fetch_it_by_hand(tmp_path):
    result = run_main("--import_weights", "ho2020-hub", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "huggingface-cli download google/ddpm-cifar10-32" in result.stderr


def test_group_norm_eps_is_a_stored_setting_older_configs_keep_1e_5():
    assert UNetConfig.from_dict({"dim": 8, "dim_mults": [1, 2]}).norm_eps == 1e-5  # a config written before it
    eps = {m.eps for m in build_unet(UNetConfig(dim=8, dim_mults=(1, 2))).modules()
           if isinstance(m, torch.nn.GroupNorm)}
    assert eps == {1e-5}
    paper = {m.eps for m in DDPMUNet(preset_network("ddpm_cifar10")).modules() if isinstance(m, torch.nn.GroupNorm)}
    assert paper == {1e-6}


@pytest.mark.parametrize("architecture", ["compact", "ddpm"])
def test_the_network_runs_in_the_dtype_of_its_input_float64_included(architecture):
    torch.manual_seed(0)
    net = build_unet(UNetConfig(dim=16, dim_mults=(1, 2), architecture=architecture, groups=8, image_size=16,
                                resblock="add" if architecture == "ddpm" else "film")).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 999])
    with torch.no_grad():
        single, double = net(x, t), net.double()(x.double(), t)
        emb = net.time_mlp[0](t.double())
    assert double.dtype == torch.float64 and emb.dtype == torch.float64
    half = 8  # dim / 2: sin ‖ cos of t · 10000^(−i/(half − 1))
    expected = [math.sin(999 * 10000 ** (-i / (half - 1))) for i in range(half)]
    assert emb[1, :half].tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert relative_error(single.double(), double) <= 1e-5
