"""EMA, DDIM with guidance, the time budget, the learning-rate schedule, v-prediction and the export."""
import json
import os

import numpy as np
import pytest
import torch
from torch import nn

import ddpm_flags
from conftest import TINY_MODEL, run_main, save_edited
from ddpm_checkpoint import export_for_inference, load_checkpoint
from ddpm_train_step import learning_rate, update_ema


def test_ema_update_is_a_lerp():
    model, ema = nn.Linear(3, 2), nn.Linear(3, 2)
    before = [p.detach().clone() for p in ema.parameters()]
    update_ema(ema, model, 0.9)
    for b, e, m in zip(before, ema.parameters(), model.parameters()):
        assert torch.allclose(e, 0.9 * b + 0.1 * m)


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


def test_a_budget_spent_by_the_set_up_still_trains_a_step_and_finishes_cleanly(tiny_data, tmp_path):
    """0.03 s: the set-up alone spends it (the budget is the whole run's). One step, then the losses, the grid and
    the checkpoints; the epoch it cut short is not counted as done."""
    result = run_main("--data_dir", tiny_data, "--epochs", "500", "--time_budget_min", "0.0005", "--save_model",
                     "--run_name", "budget", *TINY_MODEL, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "time budget: training stopped at step 1: epoch 1, batch 1 of 4" in result.stdout
    metrics = json.loads((tmp_path / "outputs" / "metrics_budget.json").read_text())
    assert metrics["stopped_by_time_budget"] and metrics["steps"] == 1 and metrics["epochs_done"] == 0
    assert set(metrics["timing"]) >= {"decode_s", "compile_s", "train_s", "eval_s", "sample_s", "wall_s"}
    history = json.loads((tmp_path / "outputs" / "loss_history_budget.json").read_text())
    assert history["epochs"] == [0.25] and history["val_loss"]
    assert (tmp_path / "models" / "budget" / "ckpt.pt").is_file()
    assert (tmp_path / "outputs" / "samples_budget_epoch001.png").is_file()


def test_learning_rate_warmup_and_cosine_decay():
    flags = vars(ddpm_flags.build_parser().parse_args(["--lr", "0.01", "--warmup_steps", "10", "--lr_decay",
                                                         "cosine"]))
    assert learning_rate(flags, 0, 0.0) == pytest.approx(0.001)
    assert learning_rate(flags, 9, 0.0) == pytest.approx(0.01)
    assert learning_rate(flags, 500, 0.5) == pytest.approx(0.005)
    assert learning_rate(flags, 900, 1.0) == pytest.approx(0.0, abs=1e-12)
    flags["lr_decay"] = "none"
    assert learning_rate(flags, 900, 1.0) == pytest.approx(0.01)


def test_v_prediction_min_snr_cosine_run_end_to_end(tiny_data, tmp_path):
    result = run_main("--data_dir", tiny_data, "--conditional", "--epochs", "2", "--prediction", "v",
                     "--min_snr_gamma", "5", "--lr_decay", "cosine", "--save_model", "--run_name", "v",
                     *TINY_MODEL, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    config = torch.load(tmp_path / "models" / "v" / "ckpt.pt", weights_only=True)["config"]
    assert (config["prediction"], config["min_snr_gamma"], config["lr_decay"]) == ("v", 5.0, "cosine")
    history = json.loads((tmp_path / "outputs" / "loss_history_v.json").read_text())
    assert all(np.isfinite(history["val_loss"]))
    sampled = run_main("--inference", "--conditional", "--model_path", "models/v/ckpt.pt", "--num_samples", "3",
                      "--sampler", "ddim", "--sampling_steps", "3", "--no_cuda", cwd=tmp_path)
    assert sampled.returncode == 0, sampled.stderr


def test_export_for_inference_keeps_only_bf16_ema_weights(trained, tmp_path):
    ckpt = load_checkpoint(str(trained / "models" / "cond" / "ckpt.pt"))
    export_for_inference(ckpt, str(tmp_path / "small" / "ckpt.pt"))
    small = torch.load(tmp_path / "small" / "ckpt.pt", weights_only=True)
    assert set(small) == {"format", "version", "config", "versions", "ema", "sha256"}
    assert small["config"] == {**ckpt["config"], "data_dir": "./data"}  # no path from the training machine
    for name, weight in ckpt["ema"].items():
        assert small["ema"][name].dtype == torch.bfloat16
        assert torch.equal(small["ema"][name], weight.to(torch.bfloat16))
    assert os.path.getsize(tmp_path / "small" / "ckpt.pt") < os.path.getsize(trained / "models" / "cond" / "ckpt.pt") / 4
