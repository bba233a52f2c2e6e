"""ddpm_main.py end to end on a tiny generated image-folder dataset, and every bad input."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm_main
from conftest import ROOT, TINY_MODEL, make_image_folder, run_cli
from ddpm_checkpoint import export_for_inference, load_checkpoint
from ddpm_helpers import bf16_is_fast

SHIPPED = os.path.join(ROOT, "models", "cifar10_cond_speedrun", "ckpt.pt")  # 10 classes


def test_training_writes_history_checkpoint_and_grids(trained):
    history = json.loads((trained / "outputs" / "loss_history_cond.json").read_text())
    assert set(history) == {"train_loss", "val_loss", "test_loss", "epochs"}
    assert history["epochs"] == [1]
    assert all(len(history[k]) == 1 and np.isfinite(history[k][0]) for k in history)
    grid = Image.open(trained / "outputs" / "samples_cond_epoch001.png")
    assert grid.size == (8 * 18 + 2, 10 * 18 + 2)  # one row per class, 8 columns of 16 px + 2 px padding
    assert (trained / "outputs" / "loss_curves_cond.png").is_file()
    ckpt = torch.load(trained / "models" / "cond" / "ckpt.pt", weights_only=True)
    config = ckpt["config"]
    assert config["conditional"] and config["num_classes"] == 10
    assert config["dim"] == 8 and config["dim_mults"] == [1, 2] and config["timesteps"] == 10
    assert config["schedule"] == "cosine" and config["image_size"] == 16
    assert config["num_train"] == 27 and config["num_val"] == 3 and config["num_test"] == 10
    assert {"model", "ema", "optimizer", "epoch"} <= set(ckpt)
    uncond = torch.load(trained / "models" / "uncond" / "ckpt.pt", weights_only=True)
    assert uncond["config"]["num_classes"] is None


def test_log_has_a_line_per_epoch_without_a_terminal(tiny_data, tmp_path):
    result = run_cli("--data_dir", tiny_data, "--epochs", "2", "--eval_every", "2", "--run_name", "log",
                     *TINY_MODEL, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 2 and all("img/s" in line for line in lines)
    assert lines[0].startswith("epoch 1/2  train ") and "val" not in lines[0]  # not an evaluation epoch
    assert lines[1].startswith("epoch 2/2  train ") and "  val " in lines[1] and "  test " in lines[1]


def test_conditional_inference_writes_grid_and_pngs(trained):
    result = run_cli("--inference", "--conditional", "--model_path", "models/cond/ckpt.pt", "--num_samples", "6",
                     "--guidance_scale", "5.0", "--sample_classes", "2,7", "--run_name", "inf", "--no_cuda",
                     cwd=trained)
    assert result.returncode == 0, result.stderr
    pngs = sorted(os.listdir(trained / "outputs" / "samples_inf"))
    assert pngs == [f"{i:05d}_{c}_class{c}.png" for i, c in enumerate([2, 7, 2, 7, 2, 7])]
    assert Image.open(trained / "outputs" / "samples_inf" / pngs[0]).size == (16, 16)
    assert Image.open(trained / "outputs" / "samples_inf.png").size == (2 * 18 + 2, 3 * 18 + 2)
    assert np.load(trained / "outputs" / "samples_inf.npz")["images"].shape == (6, 16, 16, 3)


def test_conditional_checkpoint_without_flag_samples_unconditionally(trained):
    result = run_cli("--inference", "--model_path", "models/cond/ckpt.pt", "--num_samples", "4", "--run_name",
                     "nullinf", "--no_cuda", cwd=trained)
    assert result.returncode == 0, result.stderr
    assert "unconditional" in result.stderr
    assert len(os.listdir(trained / "outputs" / "samples_nullinf")) == 4


def test_unconditional_inference(trained):
    result = run_cli("--inference", "--model_path", "models/uncond/ckpt.pt", "--num_samples", "5", "--run_name",
                     "uinf", "--no_cuda", cwd=trained)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(trained / "outputs" / "samples_uinf")) == [f"{i:05d}.png" for i in range(5)]


def run_in_process(argv, capsys):
    """ddpm_main.main(argv) → (exit status, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        ddpm_main.main(argv)
    return exit_info.value.code, capsys.readouterr().err


BAD_ARGUMENTS = [
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--batch_size", "0"], "--batch_size must be at least 1"),
    (["--timesteps", "-3"], "--timesteps must be at least 1"),
    (["--num_samples", "0"], "--num_samples must be at least 1"),
    (["--lr", "0"], "--lr must be greater than 0"),
    (["--lr", "-0.1"], "--lr must be greater than 0"),
    (["--p_uncond", "1.5"], "--p_uncond must be in [0, 1]"),
    (["--p_uncond", "-0.1"], "--p_uncond must be in [0, 1]"),
    (["--epochs", "two"], "invalid int value"),
    (["--inference"], "--inference needs --model_path"),
    (["--inference", "--model_path", SHIPPED, "--sample_classes", "0,10"], "class 10 is outside 0-9"),
    (["--inference", "--model_path", SHIPPED, "--sample_classes", "-1"], "class -1 is outside 0-9"),
    (["--inference", "--model_path", "x.pt", "--sample_classes", "1,cat"], "'cat' is not an integer"),
    (["--inference", "--model_path", "x.pt", "--sample_classes", "2.5"], "'2.5' is not an integer"),
    (["--inference", "--model_path", "does/not/exist.pt"], "does not exist"),
    (["--sampler", "ddpm", "--sampling_steps", "10"], "--sampling_steps applies to --sampler dpm++2m and ddim"),
    (["--sampler", "ddim", "--spacing", "time"], "--spacing applies to --sampler dpm++2m (the sampler here is ddim"),
    (["--sampler", "ddim", "--sampling_steps", "101"], "--sampling_steps 101 is more than the model's T = 100"),
    (["--sampling_steps", "0"], "--sampling_steps must be at least 1"),
    (["--sampler", "euler"], "invalid choice: 'euler'"),
    (["--eta", "0.5"], "--eta applies to --sampler ddim (the sampler here is dpm++2m)"),
    (["--sampler", "ddim", "--eta", "2"], "--eta must be in [0, 1]"),
    (["--guidance_scale", "-1"], "--guidance_scale must be 0 or more"),
    (["--no_bf16"], "--no_bf16 goes with --inference"),
    (["--inference", "--model_path", SHIPPED, "--sampling_steps", "1001"], "1001 is more than the model's T = 1000"),
    (["--inference", "--model_path", SHIPPED, "--sampler", "ddpm", "--sampling_steps", "5"],
     "--sampling_steps applies to --sampler dpm++2m and ddim"),
]


@pytest.mark.parametrize("argv,message", BAD_ARGUMENTS)
def test_bad_arguments_exit_2_and_write_nothing(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, err = run_in_process(argv + ["--data_dir", str(tmp_path / "nowhere")], capsys)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []


def write_bad_checkpoints(folder):
    (folder / "text.pt").write_text("not a checkpoint")
    torch.save({"state_dict": {"w": torch.zeros(2)}}, folder / "other_tool.pt")
    torch.save(torch.nn.Linear(2, 2), folder / "pickled_module.pt")


@pytest.mark.parametrize("name,message", [("text.pt", "not a readable checkpoint"),
                                          ("other_tool.pt", "not a checkpoint of this tool"),
                                          ("pickled_module.pt", "not a readable checkpoint")])
def test_foreign_or_corrupt_checkpoint(name, message, tmp_path, monkeypatch, capsys):
    write_bad_checkpoints(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, err = run_in_process(["--inference", "--model_path", name, "--no_cuda"], capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "outputs").exists()


def test_conditional_flag_on_unconditional_checkpoint(trained, capsys, monkeypatch):
    monkeypatch.chdir(trained)
    before = sorted(os.listdir(trained / "outputs"))
    code, err = run_in_process(["--inference", "--conditional", "--model_path", "models/uncond/ckpt.pt",
                                "--run_name", "never", "--no_cuda"], capsys)
    assert code == 2 and "unconditional model" in err
    assert sorted(os.listdir(trained / "outputs")) == before


def test_missing_dataset_without_download(tmp_path, monkeypatch, capsys):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    monkeypatch.chdir(tmp_path)
    code, err = run_in_process(["--data_dir", "absent", "--no_cuda"], capsys)
    assert code == 2
    assert "--data_dir" in err and "train/<class>" in err and "Traceback" not in err
    assert os.listdir(tmp_path) == []


def test_half_image_folder_layout_is_an_error(tmp_path, monkeypatch, capsys):
    make_image_folder(str(tmp_path / "d"), per_class_train=1, num_classes=2)
    for f in (tmp_path / "d" / "test").rglob("*.png"):
        f.unlink()
    for d in sorted((tmp_path / "d" / "test").iterdir()):
        d.rmdir()
    (tmp_path / "d" / "test").rmdir()
    monkeypatch.chdir(tmp_path)
    code, err = run_in_process(["--data_dir", "d", "--no_cuda"], capsys)
    assert code == 2 and "not test/" in err
    assert sorted(os.listdir(tmp_path)) == ["d"]


def test_nan_loss_stops_with_error_and_keeps_last_checkpoint(tiny_data, tmp_path):
    ok = run_cli("--data_dir", tiny_data, "--epochs", "1", "--run_name", "nan", *TINY_MODEL, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    last = tmp_path / "models" / "nan" / "last.pt"
    good = last.read_bytes()
    diverge = run_cli("--data_dir", tiny_data, "--epochs", "1", "--run_name", "nan", "--lr", "1e30",
                      "--warmup_steps", "0", "--log_interval", "1", *TINY_MODEL, cwd=tmp_path)
    assert diverge.returncode == 1
    assert "loss became" in diverge.stderr and "Traceback" not in diverge.stderr
    assert last.read_bytes() == good
    assert not list((tmp_path / "models" / "nan").glob("*.tmp*"))


def test_sample_classes_are_checked_against_the_checkpoints_classes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = make_image_folder(str(tmp_path / "twelve"), per_class_train=1, num_classes=12, size=8)
    ddpm_main.main(["--data_dir", data, "--conditional", "--epochs", "1", "--save_model", "--run_name", "c12",
                    "--quiet", *TINY_MODEL])
    ddpm_main.main(["--inference", "--conditional", "--model_path", "models/c12/ckpt.pt", "--num_samples", "2",
                    "--sample_classes", "10,11", "--sampler", "ddim", "--sampling_steps", "2", "--no_cuda", "--quiet"])
    classes = sorted(os.listdir(tmp_path / "twelve" / "train"))  # label order: folder names, sorted
    assert sorted(os.listdir(tmp_path / "outputs" / "samples_c12")) == [f"00000_{classes[10]}.png",
                                                                         f"00001_{classes[11]}.png"]
    code, err = run_in_process(["--inference", "--conditional", "--model_path", "models/c12/ckpt.pt",
                                "--sample_classes", "12", "--no_cuda"], capsys)
    assert code == 2 and "class 12 is outside 0-11" in err


def test_checkpoints_carry_the_settings_they_sample_with(tiny_data, tmp_path, monkeypatch, capsys):
    """Training stores its sampling flags, the export keeps them, inference uses them unless a flag says otherwise,
    and a checkpoint without any samples with DPM-Solver++(2M) at min(25, T) steps."""
    monkeypatch.chdir(tmp_path)
    ddpm_main.main(["--data_dir", tiny_data, "--conditional", "--epochs", "1", "--save_model", "--run_name", "s",
                    "--sampler", "ddim", "--sampling_steps", "3", "--guidance_scale", "2", "--quiet", *TINY_MODEL])
    ckpt = load_checkpoint("models/s/ckpt.pt")
    assert ckpt["config"]["sampling"] == {"sampler": "ddim", "steps": 3, "eta": 0.0, "guidance_scale": 2.0,
                                          "spacing": "lambda"}
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
    torch.save(ckpt, "old.pt")
    assert sampled_with(model="old.pt").endswith(": dpm++2m, 10 steps (lambda spacing), guidance 3.0")


@pytest.mark.parametrize("no_bf16", [False, True])
def test_inference_samples_in_bf16_where_that_is_fast_unless_told_not_to(no_bf16, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ddpm_main.main(["--inference", "--conditional", "--model_path", SHIPPED, "--num_samples", "1", "--sampling_steps",
                    "1", "--no_cuda", *(["--no_bf16"] if no_bf16 else [])])
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("sampling on "))
    in_bf16 = bf16_is_fast(torch.device("cpu")) and not no_bf16
    assert line.startswith("sampling on cpu in bf16: " if in_bf16 else "sampling on cpu: ")
