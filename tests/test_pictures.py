"""Pictures and reproducibility: guidance sweep, forward-process strip, same seed → same samples."""
import dataclasses

import numpy as np
import torch
from PIL import Image

import ddpm_flags
import ddpm_main
from conftest import run_main
from ddpm_checkpoint import load_checkpoint
from ddpm_config import build_diffusion
from ddpm_model import UNet, UNetConfig
from ddpm_sample import asked_sampling, guidance_sweep, sampler_settings


def test_forward_process_strip_and_loss_curves(trained):
    strip = Image.open(trained / "outputs" / "forward_process_cond.png")
    assert strip.size == (10 * 18 + 2, 18 + 2)  # ten 16-px images, t = 0 … T−1
    pixels = np.asarray(strip.convert("RGB"), dtype=float)
    first, last = pixels[2:18, 2:18], pixels[2:18, -18:-2]
    assert first.std() != last.std()  # t = 0 is the image, t = T−1 is noise
    assert Image.open(trained / "outputs" / "loss_curves_cond.png").size[0] > 300


def test_guidance_sweep_rows_share_noise(trained, monkeypatch):
    monkeypatch.chdir(trained)
    args = ddpm_flags.build_parser().parse_args(
        ["--inference", "--model_path", "models/cond/ckpt.pt", "--guidance_sweep", "0,1,1,4", "--no_cuda"])
    ckpt = load_checkpoint(args.model_path)
    model = UNet(UNetConfig.from_dict(ckpt["config"]["model"]))
    model.load_state_dict(ckpt["ema"])
    diffusion = build_diffusion(ckpt["config"], torch.device("cpu"))
    settings = sampler_settings(asked_sampling(args), None, diffusion.timesteps)
    images = guidance_sweep(diffusion, model, settings, args.guidance_sweep, [3, 5, 8], image_size=16, channels=3,
                            seed=args.seed)
    rows = images.view(4, 3, *images.shape[1:])
    assert torch.equal(rows[1], rows[2])                 # same w, same noise: identical rows
    assert not torch.equal(rows[0], rows[1])             # only w differs between rows
    torch.manual_seed(args.seed)
    unconditional = diffusion.sample(model, (3, 3, 16, 16), dataclasses.replace(settings, guidance_scale=1.0),
                                     torch.tensor([10, 10, 10]))
    assert torch.allclose(rows[0], unconditional, atol=1e-5)  # w = 0 is the unconditional model


def test_guidance_sweep_cli_writes_labelled_grid(trained):
    result = run_main("--inference", "--model_path", "models/cond/ckpt.pt", "--guidance_sweep", "0,1,3,5,7",
                     "--run_name", "sweep", "--no_cuda", cwd=trained)
    assert result.returncode == 0, result.stderr
    assert Image.open(trained / "outputs" / "guidance_sweep_sweep.png").size[0] > 10 * 18
    bad = run_main("--inference", "--model_path", "models/uncond/ckpt.pt", "--guidance_sweep", "0,3",
                  "--run_name", "nosweep", "--no_cuda", cwd=trained)
    assert bad.returncode == 2 and "needs a conditional model" in bad.stderr


def test_same_seed_same_samples_on_cpu(trained, monkeypatch, capsys):
    monkeypatch.chdir(trained)
    outputs = {}
    for run, seed in (("a", 3), ("b", 3), ("c", 4)):
        ddpm_main.main(["--inference", "--conditional", "--model_path", "models/cond/ckpt.pt", "--num_samples",
                        "4", "--seed", str(seed), "--run_name", f"seed_{run}", "--no_cuda", "--quiet"])
        outputs[run] = np.load(trained / "outputs" / f"samples_seed_{run}.npz")["images"]
    assert capsys.readouterr().out == ""  # --quiet
    assert np.array_equal(outputs["a"], outputs["b"])
    assert not np.array_equal(outputs["a"], outputs["c"])


def test_individual_pngs_replace_an_earlier_larger_batch(tmp_path):
    from ddpm_pictures import save_individual_pngs
    (tmp_path / "notes.txt").write_text("kept")
    save_individual_pngs(torch.zeros(3, 3, 4, 4), str(tmp_path))
    save_individual_pngs(torch.zeros(2, 3, 4, 4), str(tmp_path), torch.tensor([0, 1]), ["cat", "dog"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000_cat.png", "00001_dog.png", "notes.txt"]


def test_inference_names_outputs_after_the_checkpoint_run(trained):
    result = run_main("--inference", "--model_path", "models/uncond/ckpt.pt", "--num_samples", "2", "--sampler",
                     "ddim", "--sampling_steps", "2", "--no_cuda", cwd=trained)
    assert result.returncode == 0, result.stderr
    assert (trained / "outputs" / "samples_uncond.png").is_file()
