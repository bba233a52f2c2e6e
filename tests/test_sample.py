"""Sampling a trained model (ddpm_sample and the jobs of --inference): the resolver of sampler settings, batched
generation, samples, sweeps, strips and the bound through the CLI, the shipped model."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm_flags
import ddpm_main
from conftest import SHIPPED, TINY_MODEL, ClassShift, card_holding, run_cli, run_main, save_edited, tiny_unet
from ddpm_checkpoint import export_for_inference, load_checkpoint
from ddpm_config import build_diffusion
from ddpm_diffusion import Diffusion, SamplerSettings, cosine_beta_schedule
from ddpm_model import UNet, UNetConfig
from ddpm_runtime import Denoiser, choose_precision
from ddpm_sample import asked_sampling, describe_sampling, generate, guidance_sweep, sampler_settings, spread


def test_conditional_inference_writes_grid_and_pngs(trained):
    result = run_main("--inference", "--conditional", "--model_path", "models/cond/ckpt.pt", "--num_samples", "6",
                     "--guidance_scale", "5.0", "--sample_classes", "2,7", "--run_name", "inf", "--no_cuda",
                     cwd=trained)
    assert result.returncode == 0, result.stderr
    pngs = sorted(os.listdir(trained / "outputs" / "samples_inf"))
    assert pngs == [f"{i:05d}_{c}_class{c}.png" for i, c in enumerate([2, 7, 2, 7, 2, 7])]
    assert Image.open(trained / "outputs" / "samples_inf" / pngs[0]).size == (16, 16)
    assert Image.open(trained / "outputs" / "samples_inf.png").size == (2 * 18 + 2, 3 * 18 + 2)
    assert np.load(trained / "outputs" / "samples_inf.npz")["images"].shape == (6, 16, 16, 3)


def test_conditional_checkpoint_without_flag_samples_unconditionally(trained):
    result = run_main("--inference", "--model_path", "models/cond/ckpt.pt", "--num_samples", "4", "--run_name",
                     "nullinf", "--no_cuda", cwd=trained)
    assert result.returncode == 0, result.stderr
    assert "unconditional" in result.stderr
    assert len(os.listdir(trained / "outputs" / "samples_nullinf")) == 4


def test_unconditional_inference(trained):
    result = run_main("--inference", "--model_path", "models/uncond/ckpt.pt", "--num_samples", "5", "--run_name",
                     "uinf", "--no_cuda", cwd=trained)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(trained / "outputs" / "samples_uinf")) == [f"{i:05d}.png" for i in range(5)]


def test_checkpoints_carry_the_settings_they_sample_with(tiny_data, tmp_path, monkeypatch, capsys):
    """Training stores its sampling flags, the export keeps them, inference uses them unless a flag says otherwise,
    and a checkpoint without any samples with DPM-Solver++(2M) at min(25, T) steps."""
    monkeypatch.chdir(tmp_path)
    ddpm_main.main(["--data_dir", tiny_data, "--conditional", "--epochs", "1", "--save_model", "--run_name", "s",
                    "--sampler", "ddim", "--sampling_steps", "3", "--guidance_scale", "2", "--quiet", *TINY_MODEL])
    ckpt = load_checkpoint("models/s/ckpt.pt")
    assert ckpt["config"]["sampling"] == {"sampler": "ddim", "steps": 3, "eta": 0.0, "guidance_scale": 2.0,
                                          "spacing": "lambda", "guidance_interval": None, "variance": "posterior",
                                          "timesteps": None}
    export_for_inference(ckpt, "exported.pt")
    assert load_checkpoint("exported.pt")["config"]["sampling"] == ckpt["config"]["sampling"]

    def sampled_with(*flags, model="exported.pt"):
        ddpm_main.main(["--inference", "--conditional", "--model_path", model, "--num_samples", "2", "--no_cuda",
                        *flags])
        return next(line for line in capsys.readouterr().out.splitlines() if line.startswith("sampling on "))

    assert sampled_with().endswith(": ddim, 3 steps, eta 0.0, guidance 2.0")
    assert sampled_with("--sampling_steps", "5").endswith(": ddim, 5 steps, eta 0.0, guidance 2.0")
    assert sampled_with("--sampler", "ddpm").endswith(": ddpm, 10 steps, guidance 2.0")
    assert sampled_with("--sampler", "dpm++2m", "--spacing", "time").endswith(
        ": dpm++2m, 10 steps (time spacing), guidance 2.0")
    del ckpt["config"]["sampling"]  # as written before checkpoints carried sampling settings
    save_edited(ckpt, "old.pt")
    assert sampled_with(model="old.pt").endswith(": dpm++2m, 10 steps (lambda spacing), guidance 3.0")


@pytest.mark.parametrize("flags,precision", [([], None), (["--no_bf16"], "fp32"), (["--precision", "fp32"], "fp32"),
                                             (["--precision", "bf16"], "bf16")])
def test_inference_samples_in_bf16_where_that_is_fast_unless_told_not_to(flags, precision, tmp_path, monkeypatch,
                                                                          capsys):
    monkeypatch.chdir(tmp_path)
    ddpm_main.main(["--inference", "--conditional", "--model_path", SHIPPED, "--num_samples", "1", "--sampling_steps",
                    "1", "--no_cuda", "--run_name", "p", *flags])
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("sampling on "))
    expected = precision or choose_precision("auto", torch.device("cpu"))[0]
    starts = {"bf16": "sampling on cpu in bf16 autocast (", "fp32": "sampling on cpu in float32 ("}
    assert line.startswith(starts[expected])


def test_banners_say_what_the_command_does(trained, tmp_path):
    """No guidance words where nothing is guided, no sampling words for the bound."""
    models = trained / "models"
    uncond = run_main("--inference", "--model_path", models / "uncond" / "ckpt.pt", "--num_samples", "2",
                     "--sampling_steps", "2", "--no_cuda", cwd=tmp_path)
    assert "sampling on cpu" in uncond.stdout and "guidance" not in uncond.stdout + uncond.stderr
    strip = run_main("--inference", "--model_path", models / "cond" / "ckpt.pt", "--denoising_strip",
                    "--num_samples", "2", "--sampling_steps", "2", "--no_cuda", cwd=tmp_path)
    assert "sampling with its unconditional model" in strip.stderr and "guidance" not in strip.stdout
    nll = run_main("--inference", "--model_path", models / "cond" / "ckpt.pt", "--eval_nll", "2", "--no_cuda",
                  cwd=tmp_path)
    assert nll.returncode == 0, nll.stderr
    assert nll.stdout.startswith("computing the bound on cpu") and "all 10 steps of p_θ, σ_t² posterior" in nll.stdout
    assert "sampl" not in nll.stdout + nll.stderr and "computing the bound with its unconditional model" in nll.stderr


def test_outputs_are_named_after_the_model_path_in_grids_of_whole_rows(trained, tmp_path):
    (tmp_path / "my_run").mkdir()
    ckpt = (trained / "models" / "cond" / "ckpt.pt").read_bytes()
    (tmp_path / "my_run" / "ckpt.pt").write_bytes(ckpt)
    (tmp_path / "ho2020.pt").write_bytes(ckpt)
    assert run_main("--inference", "--conditional", "--model_path", "my_run/ckpt.pt", "--sampling_steps", "2",
                    "--no_cuda", cwd=tmp_path).returncode == 0
    assert np.load(tmp_path / "outputs" / "samples_my_run.npz")["images"].shape[0] == 80  # 8 rows of 10 classes
    assert run_main("--inference", "--model_path", "ho2020.pt", "--sampling_steps", "2", "--no_cuda",
                    cwd=tmp_path).returncode == 0
    assert np.load(tmp_path / "outputs" / "samples_ho2020.npz")["images"].shape[0] == 64  # 8 × 8


def test_sampler_settings_describe_themselves_as_metrics_record_them():
    assert describe_sampling(SamplerSettings()) == "dpm++2m, default steps (lambda spacing), guidance 3.0"
    assert describe_sampling(SamplerSettings(spacing="time").for_timesteps(100)) == \
        "dpm++2m, 25 steps (time spacing), guidance 3.0"
    assert describe_sampling(SamplerSettings("ddpm").for_timesteps(100)) == "ddpm, 100 steps, guidance 3.0"
    assert describe_sampling(SamplerSettings("ddim", steps=25, eta=0.5, guidance_scale=1.5)) == \
        "ddim, 25 steps, eta 0.5, guidance 1.5"


def test_generate_in_batches_from_a_seed_leaves_the_callers_rng_alone(diffusion):
    model, labels = ClassShift(), torch.tensor([0, 1, 2, 3, 4])
    settings = SamplerSettings("ddim", steps=5, eta=0.5, guidance_scale=2.0)
    torch.manual_seed(0)
    caller_state = torch.get_rng_state()
    images = generate(diffusion, model, settings, 5, 8, 3, labels, batch_size=2, seed=7)
    assert torch.equal(torch.get_rng_state(), caller_state)
    torch.manual_seed(7)  # the same draws, batch by batch: 2 + 2 + 1
    expected = torch.cat([diffusion.sample(model, (len(part), 3, 8, 8), settings, part) for part in labels.split(2)])
    assert images.shape == (5, 3, 8, 8) and torch.equal(images, expected)


def test_guidance_sweep_rows_are_generate_at_each_scale_from_one_seed(diffusion):
    model, classes = ClassShift(), [1, 6]
    settings = SamplerSettings("ddim", steps=4, eta=1.0)
    rows = guidance_sweep(diffusion, model, settings, [0.0, 2.0], classes, 8, 3, seed=5).view(2, 2, 3, 8, 8)
    for row, w in zip(rows, (0.0, 2.0)):
        expected = generate(diffusion, model, SamplerSettings("ddim", steps=4, eta=1.0, guidance_scale=w), 2, 8, 3,
                            torch.tensor(classes), seed=5)
        assert torch.equal(row, expected)


def test_sampling_out_of_memory_halves_the_batch_and_says_so_once(monkeypatch, capsys):
    """A device that holds 2 images: 5 asked for 8 at a time are tried at 5, then 2, 2 and 1 — all 5 come back."""
    tried = []
    monkeypatch.setattr(Diffusion, "sample", card_holding(2, tried))
    model = tiny_unet().eval()
    images = generate(Diffusion(10, cosine_beta_schedule), Denoiser(model), SamplerSettings("ddim", steps=2), 5, 16,
                      class_labels=torch.arange(5), batch_size=8)
    assert images.shape == (5, 3, 16, 16) and tried == [5, 2, 2, 1]
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: out of memory sampling 5 images at a time; going on with 2 (halved again if need be; "
                   "a smaller --sample_batch avoids the retry)"]
    monkeypatch.setattr(Diffusion, "sample", card_holding(0, tried))
    with pytest.raises(torch.OutOfMemoryError):  # not even one image fits: the error stands
        generate(Diffusion(10, cosine_beta_schedule), Denoiser(model), SamplerSettings("ddim", steps=2), 1, 16)


def test_the_checkpoint_carries_the_interval_and_inference_can_change_it(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ddpm_main.main(["--data_dir", tiny_data, "--conditional", "--epochs", "1", "--save_model", "--run_name", "g",
                    "--guidance_scale", "2", "--guidance_interval", "0.5,20", "--quiet", *TINY_MODEL])
    assert load_checkpoint("models/g/ckpt.pt")["config"]["sampling"]["guidance_interval"] == (0.5, 20.0)

    def sampled_with(*flags):
        ddpm_main.main(["--inference", "--conditional", "--model_path", "models/g/ckpt.pt", "--num_samples", "2",
                        "--no_cuda", *flags])
        return next(line for line in capsys.readouterr().out.splitlines() if line.startswith("sampling on "))

    assert sampled_with().endswith(": dpm++2m, 10 steps (lambda spacing), guidance 2.0 for σ in (0.5, 20]")
    assert sampled_with("--sampler", "ddim").endswith(": ddim, 10 steps, eta 0.0, guidance 2.0 for σ in (0.5, 20]")
    assert sampled_with("--guidance_interval", "0.1,inf").endswith("guidance 2.0 for σ in (0.1, inf]")
    assert sampled_with("--guidance_interval", "all").endswith(": dpm++2m, 10 steps (lambda spacing), guidance 2.0")
    ddpm_main.main(["--inference", "--model_path", "models/g/ckpt.pt", "--guidance_sweep", "1,3", "--no_cuda",
                    "--quiet", "--run_name", "sweep"])
    assert (tmp_path / "outputs" / "guidance_sweep_sweep.png").stat().st_size > 0


def test_the_sampler_settings_carry_the_variance_and_say_it():
    settings = SamplerSettings("ddpm", variance="beta")
    assert describe_sampling(settings, guided=False) == "ddpm, default steps, σ_t² = β_t"
    assert describe_sampling(SamplerSettings("ddpm"), guided=False) == "ddpm, default steps"
    assert SamplerSettings(**{k: v for k, v in settings.__dict__.items() if k != "variance"}).variance == "posterior"
    with pytest.raises(ValueError, match="unknown variance 'large'"):
        SamplerSettings("ddpm", variance="large")


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


def test_inference_names_outputs_after_the_checkpoint_run(trained):
    result = run_main("--inference", "--model_path", "models/uncond/ckpt.pt", "--num_samples", "2", "--sampler",
                     "ddim", "--sampling_steps", "2", "--no_cuda", cwd=trained)
    assert result.returncode == 0, result.stderr
    assert (trained / "outputs" / "samples_uncond.png").is_file()


def test_the_denoising_strip_of_a_conditional_model_takes_its_classes(trained, tmp_path):
    result = run_main("--inference", "--model_path", trained / "models" / "cond" / "ckpt.pt", "--denoising_strip",
                      "--conditional", "--sample_classes", "1,2", "--num_samples", "4", "--sampler", "ddim",
                      "--sampling_steps", "4", "--save_dir", tmp_path, "--precision", "fp32", cwd=trained)
    assert result.returncode == 0, result.stderr
    assert "denoising strip (4 samples, x̂_0 at 4 of 4 steps, ddim" in result.stdout


def test_inference_uses_ema_weights(trained, tmp_path):
    ckpt = torch.load(trained / "models" / "cond" / "ckpt.pt", weights_only=True)
    assert ckpt["ema"].keys() == ckpt["model"].keys()
    ckpt["model"] = {k: torch.full_like(v, float("nan")) for k, v in ckpt["model"].items()}
    save_edited(ckpt, tmp_path / "nan_raw_weights.pt")
    result = run_main("--inference", "--conditional", "--model_path", tmp_path / "nan_raw_weights.pt",
                     "--num_samples", "3", "--sampler", "ddim", "--sampling_steps", "3", "--no_cuda", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    samples = np.load(tmp_path / "outputs" / "samples_nan_raw_weights.npz")["images"]  # named after the file
    assert samples.std() > 0  # NaN weights would give 0s


def test_ddim_with_guidance_from_the_cli(trained):
    result = run_main("--inference", "--conditional", "--model_path", "models/cond/ckpt.pt", "--num_samples", "4",
                     "--sampler", "ddim", "--sampling_steps", "4", "--eta", "0.5", "--guidance_scale", "4",
                     "--run_name", "ddim", "--no_cuda", cwd=trained)
    assert result.returncode == 0, result.stderr
    assert len(os.listdir(trained / "outputs" / "samples_ddim")) == 4
    too_many = run_main("--inference", "--model_path", "models/cond/ckpt.pt", "--sampler", "ddim",
                       "--sampling_steps", "11", "--no_cuda", cwd=trained)
    assert too_many.returncode == 2 and "more than the model's T = 10" in too_many.stderr


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
    assert ": dpm++2m, 8 steps at t = 999, 976, 889, 662, 337, 105, 26, 0, guidance 3.0 for σ in (0.28, 2.9]" \
        in result.stdout  # the steps --fit_steps 8 fitted to it
    images = np.load(tmp_path / "outputs" / "samples_shipped.npz")["images"]
    assert images.shape == (10, 32, 32, 3) and images.dtype == np.uint8
    assert images.reshape(10, -1).std(axis=1).min() > 5  # real pictures, not flat or blank tiles
    names = sorted(os.listdir(tmp_path / "outputs" / "samples_shipped"))
    assert names[0] == "00000_airplane.png" and names[9] == "00009_truck.png"
    assert (tmp_path / "outputs" / "samples_shipped.png").is_file()
