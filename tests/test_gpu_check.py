"""bench/gpu_check.py --smoke: the GPU check's whole sequence on the CPU, with what each part must leave behind."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_main

SHARED = os.environ.get("DDPM_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))
SHARED_NET = os.path.join(SHARED, "fid", "inception-2015-12-05-fp16.pt.xz")
SHARED_WEIGHTS = os.path.join(SHARED, "fid", "inception-2015-12-05-torch-fidelity-fp16w.pth")
RESULT_FILES = ["1_speed.json", "1_speed.txt", "2_cli.json", "2_cli.txt", "3_cifar10_cond_speedrun.pt",
                "3_samples.png", "3_speedrun.json", "3_speedrun.txt"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out, work = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("work")
    result = subprocess.run([sys.executable, "-u", os.path.join(ROOT, "bench", "gpu_check.py"), "--smoke",
                             "--out", str(out), "--work", str(work)], capture_output=True, text=True, timeout=300)
    return result, out, work


def test_smoke_runs_every_part_and_leaves_the_eight_files(smoke):
    result, out, _ = smoke
    assert result.returncode == 0, result.stdout + result.stderr
    for part in ("1 speed: {'status': 0", "2 cli: {'status': 0", "3 speedrun: {'status': 0"):
        assert part in result.stdout
    assert sorted(os.listdir(out)) == RESULT_FILES  # the device tool brings back eight files at most


def test_speed_part_times_each_precision_training_and_sampling(smoke):
    speed = json.loads((smoke[1] / "1_speed.json").read_text())
    assert speed["train"][0]["pipeline"] == "seed-style" and speed["train"][0]["img_s"] > 0
    fast = [row for row in speed["train"] if row["pipeline"] == "fast"]
    assert {row["precision"] for row in fast} == {"bf16", "fp16", "fp32"} and all(row["img_s"] > 0 for row in fast)
    assert all("warmup_s" in row for row in fast)  # compilation, where it happens, is timed apart
    assert set(speed["sampling"]["seconds"]) == {"bf16", "fp16", "fp32"}
    assert all(s > 0 for by_count in speed["sampling"]["seconds"].values() for s in by_count.values())
    assert speed["speedup_default_vs_seed"] > 0 and "| fast |" in (smoke[1] / "1_speed.txt").read_text()


def test_cli_part_trains_then_samples_with_each_sampler(smoke):
    cli = json.loads((smoke[1] / "2_cli.json").read_text())
    assert [c["name"] for c in cli["commands"]] == ["train", "dpm++2m", "ddim", "ddpm"]
    assert all(c["status"] == 0 for c in cli["commands"]) and len(cli["sampling_s"]) == 3
    assert cli["train_metrics"]["stopped_by_time_budget"] and cli["train_metrics"]["steps"] > 0


def test_speedrun_part_reads_the_referees_fid_and_exports_a_bf16_model_that_samples(smoke, tmp_path):
    _, out, _ = smoke
    summary = json.loads((out / "3_speedrun.json").read_text())
    assert summary["steps"] >= 1 and summary["time_s"]["train_s"] > 0 and summary["num_fid"] == 10
    if summary["referee_fid"] is not None:  # the referee is beside this checkout (../shared): the real network
        assert summary["referee_fid"] == pytest.approx(summary["project_fid"], rel=0.01)
        assert summary["fid_protocol"]["samples"] == 10 and summary["inception_score"] is None  # no classifier
    shipped = torch.load(out / "3_cifar10_cond_speedrun.pt", weights_only=True)
    assert set(shipped) >= {"format", "config", "ema"} and "optimizer" not in shipped and "model" not in shipped
    assert all(v.dtype == torch.bfloat16 for v in shipped["ema"].values())
    sampled = run_main("--inference", "--conditional", "--model_path", out / "3_cifar10_cond_speedrun.pt",
                       "--num_samples", "10", "--sampler", "ddim", "--sampling_steps", "2", "--no_cuda", cwd=tmp_path)
    assert sampled.returncode == 0, sampled.stderr


@pytest.mark.skipif(not all(map(os.path.isfile, (SHARED_NET, SHARED_WEIGHTS))),
                    reason="../shared's referee network and torch-fidelity copy are not beside this checkout")
def test_the_weights_made_from_the_referee_network_equal_the_torch_fidelity_copy(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from referee_inception import convert
    made = torch.load(convert(SHARED_NET, str(tmp_path / "made.pth")), weights_only=True)
    copy = torch.load(SHARED_WEIGHTS, weights_only=True)
    assert list(made) == list(copy)
    for name, tensor in copy.items():
        assert made[name].dtype == tensor.dtype and torch.equal(made[name].nan_to_num(), tensor.nan_to_num()), name
