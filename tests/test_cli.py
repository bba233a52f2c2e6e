"""ddpm_main.py end to end on a tiny generated image-folder dataset, and every bad input."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm_flags
import ddpm_main
import ddpm_train_step
from conftest import MAIN, ROOT, TINY_MODEL, make_image_folder, run_main, save_edited
from ddpm_checkpoint import TOOL_VERSION, export_for_inference, load_checkpoint
from ddpm_helpers import NonFiniteError, write_json
from ddpm_runtime import choose_precision

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
    assert config["model"]["dim"] == 8 and config["model"]["dim_mults"] == [1, 2] and config["timesteps"] == 10
    assert config["schedule"] == "cosine" and config["image_size"] == 16
    assert config["num_train"] == 27 and config["num_val"] == 3 and config["num_test"] == 10
    assert {"model", "ema", "optimizer", "epoch"} <= set(ckpt)
    uncond = torch.load(trained / "models" / "uncond" / "ckpt.pt", weights_only=True)
    assert uncond["config"]["num_classes"] is None


def test_log_has_a_line_per_epoch_without_a_terminal(tiny_data, tmp_path):
    result = run_main("--data_dir", tiny_data, "--epochs", "2", "--eval_every", "2", "--run_name", "log",
                     *TINY_MODEL, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 2 and all("img/s" in line for line in lines)
    assert lines[0].startswith("epoch 1/2  train ") and "val" not in lines[0]  # not an evaluation epoch
    assert lines[1].startswith("epoch 2/2  train ") and "  val " in lines[1] and "  test " in lines[1]


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
    (["--no_cuda"], "does not exist: give an image-folder dataset (train/<class>/*.png|jpg and test/<class>/"),
    (["--lr", "0"], "--lr must be greater than 0"),
    (["--lr", "-0.1"], "--lr must be greater than 0"),
    (["--p_uncond", "1.5"], "--p_uncond must be in [0, 1]"),
    (["--p_uncond", "-0.1"], "--p_uncond must be in [0, 1]"),
    (["--epochs", "two"], "invalid int value"),
    (["--inference"], "--inference needs --model_path"),
    (["--inference", "--conditional", "--model_path", SHIPPED, "--sample_classes", "0,10"],
     "--sample_classes: '10' is neither a class index 0-9 nor a class name of this model (airplane, automobile, "),
    (["--inference", "--conditional", "--model_path", SHIPPED, "--sample_classes", "-1"], "'-1' is neither a class"),
    (["--inference", "--conditional", "--model_path", SHIPPED, "--sample_classes", "cat,kitten"],
     "'kitten' is neither a class index 0-9 nor a class name"),
    (["--inference", "--conditional", "--model_path", SHIPPED, "--sample_classes", "2.5"], "'2.5' is neither"),
    (["--inference", "--conditional", "--model_path", SHIPPED, "--sample_classes", ","],
     "argument --sample_classes: expected at least one class index or name"),
    (["--inference", "--model_path", "does/not/exist.pt"], "does not exist"),
    (["--sampler", "ddpm", "--sampling_steps", "10"], "--sampling_steps applies to --sampler dpm++2m and ddim"),
    (["--sampler", "ddim", "--spacing", "time"], "--spacing applies to --sampler dpm++2m (the sampler here is ddim"),
    (["--sampler", "ddim", "--sampling_steps", "101"], "--sampling_steps 101 is more than the model's T = 100"),
    (["--sampling_steps", "0"], "--sampling_steps must be at least 1"),
    (["--sampler", "euler"], "invalid choice: 'euler'"),
    (["--eta", "0.5"], "--eta applies to --sampler ddim (the sampler here is dpm++2m)"),
    (["--sampler", "ddim", "--eta", "2"], "--eta must be in [0, 1]"),
    (["--guidance_scale", "-1"], "--guidance_scale must be 0 or more"),
    (["--no_bf16", "--precision", "bf16"], "--no_bf16 means --precision fp32, but --precision bf16 was given too"),
    (["--no_compile", "--compile", "on"], "--no_compile means --compile off, but --compile on was given too"),
    (["--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
    (["--grad_accum", "0"], "--grad_accum must be at least 1"),
    (["--inference", "--model_path", SHIPPED, "--sampling_steps", "1001"], "1001 is more than the model's T = 1000"),
    (["--inference", "--model_path", SHIPPED, "--sampler", "ddpm", "--sampling_steps", "5"],
     "--sampling_steps applies to --sampler dpm++2m and ddim"),
    (["--lr", "inf"], "--lr must be finite, got inf"),
    (["--min_snr_gamma", "inf"], "--min_snr_gamma must be finite"),
    (["--time_budget_min", "nan"], "--time_budget_min must be finite"),
    (["--guidance_scale", "nan"], "--guidance_scale must be finite"),
    (["--inference", "--model_path", SHIPPED, "--conditional", "--guidance_scale", "inf"],
     "--guidance_scale must be finite"),
    (["--inference", "--model_path", SHIPPED, "--guidance_sweep", "0,nan"], "--guidance_sweep must be finite"),
    (["--checkpoint_minutes", "0"], "--checkpoint_minutes must be greater than 0"),
    (["--dim", "3"], "--dim must be a multiple of --groups 8 (the U-Net's GroupNorm groups), got 3"),
    (["--dim", "12"], "--dim must be a multiple of --groups 8"),
    (["--dim_mults", "1,2,2,2,2,2,2"], "--dim_mults 1,2,2,2,2,2,2 has 7 stages, which need images of at least 64 "
                                       "pixels a side; these images are 32×32, which allow at most 6 stages"),
    (["--dataset", "mnist", "--dim_mults", "1,1,1,1,1,1"], "6 stages, which need images of at least 32 pixels a side; "
                                                           "these images are 28×28, which allow at most 5 stages"),
    (["--dataset", "folder"], "nowhere' holds no train/ and test/ folders: an image-folder dataset needs both"),
    (["--dataset", "imagenet"], "argument --dataset: invalid choice: 'imagenet'"),
    (["--save_dir", "/dev/null/outputs"], "--save_dir '/dev/null/outputs' cannot be a folder: /dev/null is a file"),
    (["--models_dir", "/sys/ddpm_models"], "--models_dir '/sys/ddpm_models' is not writable"),
    (["--inference", "--model_path", SHIPPED, "--save_dir", "/sys/ddpm_outputs"],
     "--save_dir '/sys/ddpm_outputs' is not writable"),
    (["--sample_classes", "3"], "--sample_classes does nothing in training (it is for --inference)"),
    (["--seed", str(2 ** 64)], "--seed must be in -9223372036854775808 … 18446744073709551615, the random generator's "
                               "range, got 18446744073709551616"),
    (["--seed", str(-2 ** 63 - 1)], "--seed must be in -9223372036854775808 … 18446744073709551615"),
    (["--dim", "800000000"], "this would need at least 7.4e+21 B of memory (7.4e+21 B for "
                             "368,640,000,000,000,000,000 parameters while training) and this machine has "),
    (["--timesteps", "2000000000"], "this would need at least 360.1 GB of memory (360.0 GB for the noise schedule of "
                                    "T = 2,000,000,000) and this machine has "),
    (["--inference", "--model_path", SHIPPED, "--num_samples", "1000000000000"],
     "this would need at least 12.3 PB of memory (12.3 PB to hold 1,000,000,000,000 samples) and this machine has "),
    (["--inference", "--model_path", SHIPPED, "--sample_classes", "3"],
     "--sample_classes goes with --conditional or --guidance_sweep; give one too"),
    (["--time_budget_min", "0"], "--time_budget_min must be greater than 0"),
    (["--eval_fid", "5"], "--eval_fid must be 0 (off) or a sample count of at least 10 (the Inception Score's "
                          "splits), got 5"),
    (["--eval_fid", "-1"], "--eval_fid must be 0 (off)"),
    (["--fid_inception", "w.pth"], "--fid_inception goes with --eval_fid; give it too"),
    (["--fid_ref", "test", "--fid_ref_stats", "s.npz"], "--fid_ref goes with --eval_fid; give it too"),
    (["--eval_fid", "10", "--fid_ref", "test", "--fid_ref_stats", "s.npz"],
     "--fid_ref_stats and --fid_ref cannot go together: give one of them"),
    (["--eval_fid", "10", "--fid_inception", "missing.pth"], "--fid_inception 'missing.pth' does not exist"),
    (["--eval_fid", "10", "--fid_ref", "val"], "argument --fid_ref: invalid choice: 'val'"),
]


@pytest.mark.parametrize("argv,message", BAD_ARGUMENTS)
def test_bad_arguments_exit_2_with_one_line_and_write_nothing(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, err = run_in_process(argv + ["--data_dir", str(tmp_path / "nowhere")], capsys)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and ": error: " in err and "usage:" not in err
    assert os.listdir(tmp_path) == []


def test_stage_count_is_checked_against_the_images_before_anything_is_read(tmp_path, monkeypatch, capsys):
    data = make_image_folder(str(tmp_path / "d12"), per_class_train=1, num_classes=2, size=12)
    monkeypatch.chdir(tmp_path)
    code, err = run_in_process(["--data_dir", data, "--dim_mults", "1,2,2,2,2", "--no_cuda"], capsys)
    assert code == 2 and "at least 16 pixels a side; these images are 12×12, which allow at most 4 stages" in err
    assert sorted(os.listdir(tmp_path)) == ["d12"] and sorted(os.listdir(data)) == ["test", "train"]  # no cache


def test_help_shows_every_default_and_version_names_the_tool_and_torch(capsys):
    with pytest.raises(SystemExit) as exit_info:
        ddpm_main.main(["--help"])
    assert exit_info.value.code == 0
    entries = {}  # flag → its help text, whitespace normalised
    for entry in capsys.readouterr().out.split("\n  --")[1:]:
        entries[entry.split()[0]] = " ".join(entry.split())
    defaults = vars(ddpm_flags.build_parser().parse_args([]))
    shown = [name for name, value in defaults.items() if value not in (None, False)]
    assert len(shown) > 20
    for name in shown:
        assert "(default: " in entries[name], name
    assert "(default: 1,2,4)" in entries["dim_mults"] and "(default: 10)" in entries["checkpoint_minutes"]
    assert "45,000 for CIFAR-10" in entries["epochs"]
    with pytest.raises(SystemExit) as exit_info:
        ddpm_main.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip().endswith(f"{TOOL_VERSION} (ddpm-cifar10), torch {torch.__version__}")


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


def test_divergence_stops_before_anything_is_written_from_it(tiny_data, tmp_path, monkeypatch, capsys):
    """One step of lr 1e30 makes every loss after it NaN: the run stops with exit 1, writes no checkpoint, loss
    JSON or grid, and says that it has no good checkpoint."""
    monkeypatch.chdir(tmp_path)
    code, err = run_in_process(["--data_dir", tiny_data, "--epochs", "1", "--run_name", "nan", "--lr", "1e30",
                                "--warmup_steps", "0", *TINY_MODEL, "--batch_size", "32"], capsys)  # 1 step
    assert code == 1 and "Traceback" not in err
    assert "the validation loss of epoch 1 became nan; stopped, and this run wrote no checkpoint" in err
    assert sorted(os.listdir(tmp_path / "models" / "nan")) == ["config.json"]
    assert sorted(os.listdir(tmp_path / "outputs")) == ["forward_process_nan.png"]


def test_divergence_names_the_last_good_checkpoint_and_how_to_go_on_from_it(tiny_data, tmp_path, monkeypatch,
                                                                           capsys):
    monkeypatch.chdir(tmp_path)
    ddpm_main.main(["--data_dir", tiny_data, "--epochs", "1", "--run_name", "nan", "--quiet", *TINY_MODEL])
    last = tmp_path / "models" / "nan" / "last.pt"
    good = last.read_bytes()
    code, err = run_in_process(["--resume", "auto", "--run_name", "nan", "--epochs", "2", "--lr", "1e30",
                                "--warmup_steps", "0", "--log_interval", "1", "--quiet"], capsys)
    assert code == 1 and "Traceback" not in err
    assert "the training loss at epoch 2, step 6 became nan; stopped. The last good checkpoint is " \
           "models/nan/last.pt (step 4: epoch 1 done); to continue from it with a lower learning rate:" in err
    assert err.splitlines()[-1].endswith(" --run_name nan --epochs 2 --warmup_steps 0 --log_interval 1 --quiet "
                                         "--resume models/nan/last.pt --lr 1e+29")
    assert last.read_bytes() == good
    assert not list((tmp_path / "models" / "nan").glob("*.tmp*"))
    history = json.loads((tmp_path / "outputs" / "loss_history_nan.json").read_text())
    assert history["epochs"] == [1]  # nothing of epoch 2 was written


def test_samples_that_are_not_finite_are_not_written(trained, tmp_path, monkeypatch, capsys):
    ckpt = load_checkpoint(str(trained / "models" / "uncond" / "ckpt.pt"))
    ckpt["ema"]["init_conv.weight"] *= 1e37  # finite weights whose activations overflow: NaN from GroupNorm
    save_edited(ckpt, tmp_path / "overflowing.pt")
    monkeypatch.chdir(tmp_path)
    code, err = run_in_process(["--inference", "--model_path", "overflowing.pt", "--num_samples", "2", "--no_cuda"],
                               capsys)
    assert code == 1 and "the samples hold NaN or infinite values; nothing was written" in err
    assert sorted(os.listdir(tmp_path)) == ["overflowing.pt"]


def test_json_never_holds_nan(tmp_path):
    with pytest.raises(NonFiniteError):
        write_json({"loss": float("nan")}, tmp_path / "m.json")
    assert list(tmp_path.iterdir()) == []


def test_a_corrupt_image_is_named_and_nothing_is_written(tmp_path, monkeypatch, capsys):
    data = make_image_folder(str(tmp_path / "d"), per_class_train=2, num_classes=2)
    folder = tmp_path / "d" / "train" / "1_class1"
    Image.open(folder / "0001.png").save(folder / "0001.jpg", quality=75)
    (folder / "0001.png").unlink()
    (folder / "0001.jpg").write_bytes((folder / "0001.jpg").read_bytes()[:300])  # truncated, as a cut download
    monkeypatch.chdir(tmp_path)
    code, err = run_in_process(["--data_dir", data, "--no_cuda", *TINY_MODEL], capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"cannot read the image {folder / '0001.jpg'}" in err and "remove or replace it" in err
    assert sorted(os.listdir(tmp_path)) == ["d"] and sorted(os.listdir(data)) == ["test", "train"]


def test_ctrl_c_during_sampling_exits_130_with_one_line(tmp_path):
    # SIGINT at its default, as in a terminal: a suite started in the background (cmd &) passes it on ignored
    proc = subprocess.Popen([sys.executable, MAIN, "--inference", "--conditional", "--model_path", SHIPPED,
                             "--num_samples", "400", "--sample_batch", "20", "--no_cuda"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout.readline().startswith("sampling on cpu")
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)  # seconds at most; the timeout only stops a hang
    assert proc.returncode == 130
    assert err.strip().splitlines() == ["ddpm_main.py: interrupted (Ctrl-C); files already written stay, nothing is "
                                        "half-written"]
    assert os.listdir(tmp_path) == []


def test_without_a_terminal_training_logs_a_line_per_read_out_at_most_once_a_minute(tiny_data, tmp_path,
                                                                                   monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["--data_dir", tiny_data, "--epochs", "2", "--log_interval", "2", "--time_budget_min", "5", *TINY_MODEL]
    monkeypatch.setattr(ddpm_train_step, "LOG_LINE_SECONDS", math.inf)  # the minute never passes, however slow the run
    ddpm_main.main([*argv, "--run_name", "slow"])
    assert not [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    monkeypatch.setattr(ddpm_train_step, "LOG_LINE_SECONDS", 0)
    ddpm_main.main([*argv, "--run_name", "fast"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [line.split("  ")[:2] for line in lines] == [["step 2", "epoch 1"], ["step 4", "epoch 1"],
                                                         ["step 6", "epoch 2"], ["step 8", "epoch 2"]]
    assert all(re.fullmatch(r"step \d  epoch \d  loss \d\.\d{4}  lr \S+  \d+ img/s  \d\.\d min of the budget left",
                            line) for line in lines), lines


def test_checkpoints_carry_the_settings_they_sample_with(tiny_data, tmp_path, monkeypatch, capsys):
    """Training stores its sampling flags, the export keeps them, inference uses them unless a flag says otherwise,
    and a checkpoint without any samples with DPM-Solver++(2M) at min(25, T) steps."""
    monkeypatch.chdir(tmp_path)
    ddpm_main.main(["--data_dir", tiny_data, "--conditional", "--epochs", "1", "--save_model", "--run_name", "s",
                    "--sampler", "ddim", "--sampling_steps", "3", "--guidance_scale", "2", "--quiet", *TINY_MODEL])
    ckpt = load_checkpoint("models/s/ckpt.pt")
    assert ckpt["config"]["sampling"] == {"sampler": "ddim", "steps": 3, "eta": 0.0, "guidance_scale": 2.0,
                                          "spacing": "lambda", "guidance_interval": None, "variance": "posterior"}
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


def test_eval_fid_alone_writes_fids_samples_and_no_grid(trained, tmp_path, fake_inception):
    result = run_main("--inference", "--conditional", "--model_path", trained / "models" / "cond" / "ckpt.pt",
                      "--eval_fid", "10", "--fid_inception", fake_inception, "--sampling_steps", "2", "--no_cuda",
                      cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path / "outputs")) == ["fid_samples_cond.npz", "metrics_cond.json"]
