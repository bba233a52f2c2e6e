"""Bad flags and flags that do not go together: one line, exit status 2, nothing written."""
import os
import time

import pytest
import torch
from PIL import Image

import ddpm_main
import ddpm_train
from conftest import SHIPPED, TINY_MODEL, make_image_folder, one_line_error, run_in_process, run_main, tree

BAD_ARGUMENTS = [
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--batch_size", "0"], "--batch_size must be at least 1"),
    (["--timesteps", "-3"], "--timesteps must be in [1, 100000]"),
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
    (["--sampler", "ddpm", "--sampling_steps", "10"],
     "--sampling_steps applies to --sampler dpm++2m, dpm++3m and ddim"),
    (["--sampler", "ddim", "--spacing", "time"],
     "--spacing applies to --sampler dpm++2m and dpm++3m (the sampler here is ddim"),
    (["--inference", "--model_path", SHIPPED, "--sampling_timesteps", "990,500,0"],
     "--sampling_timesteps: the first timestep must be T − 1 = 999 (where x_T is), got 990"),
    (["--inference", "--model_path", SHIPPED, "--sampling_timesteps", "999,500,500,0"],
     "--sampling_timesteps: timesteps must be whole numbers ≥ 0, strictly decreasing, got [999, 500, 500, 0]"),
    (["--inference", "--model_path", SHIPPED, "--sampler", "ddim", "--sampling_timesteps", "999,0"],
     "--sampling_timesteps applies to --sampler dpm++2m and dpm++3m (the sampler here is ddim)"),
    (["--sampling_timesteps", "99,0", "--spacing", "time"], "--sampling_timesteps and --spacing cannot go together"),
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
     "--sampling_steps applies to --sampler dpm++2m, dpm++3m and ddim"),
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
    (["--timesteps", "2000000000"], "--timesteps must be in [1, 100000], got 2000000000"),
    (["--inference", "--model_path", SHIPPED, "--num_samples", "1000000000000"],
     "this would need at least 12.3 PB of memory (12.3 PB to hold 1,000,000,000,000 images) and this machine has "),
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


def test_conditional_flag_on_unconditional_checkpoint(trained, capsys, monkeypatch):
    monkeypatch.chdir(trained)
    before = sorted(os.listdir(trained / "outputs"))
    code, err = run_in_process(["--inference", "--conditional", "--model_path", "models/uncond/ckpt.pt",
                                "--run_name", "never", "--no_cuda"], capsys)
    assert code == 2 and "unconditional model" in err
    assert sorted(os.listdir(trained / "outputs")) == before


def digits(n):
    return "9" * n


FLAG_SIZES = [
    (["--num_res_blocks", "1000000000"], "--num_res_blocks must be in [1, 64], got 1000000000"),
    (["--min_snr_gamma", "1e300", "--epochs", "1"], None),  # a γ past float32's range clamps nothing: it trains
    (["--inference", "--conditional", "--model_path", SHIPPED, "--sample_classes", "\u0663"],
     "--sample_classes: '\u0663' is neither a class index 0-9 nor a class name"),
    (["--inference", "--conditional", "--model_path", SHIPPED, "--sample_classes", digits(5000)],
     "--sample_classes: '99999999999999999999999999999999999999999999999999999999999"),
    (["--epoch", "1"], "unrecognized arguments: --epoch 1"),
    (["--model_path", "x.pt"], "--model_path does nothing in training (it is for --inference and --export_diffusers)"),
    (["--inference", "--model_path", SHIPPED, "--lr", "0.1"], "--lr does nothing in --inference (it is for training)"),
    (["--fid_inception", "x.pth"], "--fid_inception goes with --eval_fid; give it too"),
    (["--save_dir", ""], "--save_dir is empty: name a folder"),
    (["--models_dir", ""], "--models_dir is empty: name a folder"),
    (["--inference", "--model_path", SHIPPED, "--fid_ref_stats", "", "--eval_fid", "10"],
     "--fid_ref_stats is empty: name a file"),
]


@pytest.mark.parametrize("argv,message", FLAG_SIZES, ids=[" ".join(a)[:40] for a, _ in FLAG_SIZES])
def test_flags_are_bounded_before_anything_is_built(argv, message, tiny_data, tmp_path):
    start = time.perf_counter()
    result = run_main("--data_dir", tiny_data, *TINY_MODEL, *argv, "--quiet", cwd=tmp_path) \
        if "--inference" not in argv else run_main(*argv, "--no_cuda", "--quiet", cwd=tmp_path)
    if message is None:
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
        return
    line = one_line_error(result)
    assert message in line, line
    assert time.perf_counter() - start < 30 and tree(tmp_path) == {}


BAD_EDITS = [
    (["--inpaint", "centre", "--images", "10"], "--inpaint: test index 10 is past the test split's 10 images (0-9)"),
    (["--inpaint", "circle"], "--inpaint 'circle' does not exist; --inpaint: RePaint a region: centre, left, strokes "
                              "or a PNG"),
    (["--inpaint", "small.png"], "--inpaint: the mask 'small.png' is 8×8 pixels; it must be the model's image size, "
                                 "16×16"),
    (["--inpaint", "black.png"], "the mask 'black.png' is all black: nothing to fill"),
    (["--inpaint", "notes.png"], "--inpaint: cannot read the mask 'notes.png'"),
    (["--invert", "--images", "missing.png"], "--images 'missing.png' does not exist"),
    (["--invert", "--images", "small.png"], "--invert: 'small.png' is 8×8 pixels; this model's images are 16×16"),
    (["--invert", "--images", "0,,1"], "argument --images: '0,,1' has an empty item"),
    (["--invert", "--conditional", "--images", "black16.png"],
     "--invert with --conditional: black16.png has no class; give the classes with --sample_classes"),
    (["--interpolate", "3"], "--interpolate: takes two ends, A,B (test indices, image files or seed:N), got 1"),
    (["--invert", "--sampler", "ddpm"], "--sampler does nothing in --invert, which always runs its own sampler"),
    (["--inpaint", "centre", "--eta", "0.5"], "--eta does nothing in --inpaint, which always runs its own sampler"),
    (["--invert", "--inpaint", "centre"], "--inpaint and --invert are separate jobs at --inference"),
    (["--jump_length", "3"], "--jump_length does nothing in --inference (it is for --inpaint)"),
    (["--invert", "--frames", "3"], "--frames does nothing in --invert (it is for --interpolate)"),
    (["--images", "0"], "--images does nothing in --inference (it is for --inpaint and --invert)"),
    (["--interpolate", "0,1", "--num_samples", "3"], "--interpolate and --num_samples cannot go together"),
    (["--invert", "--sampling_steps", "11"], "--sampling_steps 11 is more than the model's T = 10"),
]


@pytest.mark.parametrize("argv,message", BAD_EDITS, ids=[" ".join(a)[:40] for a, _ in BAD_EDITS])
def test_bad_editing_input_is_one_line(argv, message, trained, tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "small.png")
    Image.new("L", (16, 16)).save(tmp_path / "black.png")
    Image.new("RGB", (16, 16)).save(tmp_path / "black16.png")
    (tmp_path / "notes.png").write_text("not an image")
    before = tree(tmp_path)
    result = run_main("--inference", "--model_path", trained / "models" / "cond" / "ckpt.pt", "--no_cuda", *argv,
                      cwd=tmp_path)
    line = one_line_error(result)
    assert message in line, line
    assert tree(tmp_path) == before


def test_editing_flags_go_with_inference(tiny_data, tmp_path):
    line = one_line_error(run_main("--data_dir", tiny_data, "--invert", cwd=tmp_path))
    assert "--invert goes with --inference" in line and tree(tmp_path) == {}


@pytest.mark.parametrize("text", ["2.9,0.28", "-1,2", "1", "a,b", "1,1", "inf,inf", "nan,1", "1,2,3", ""])
def test_bad_flag_values_exit_2_with_one_line(text, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        ddpm_main.main([f"--guidance_interval={text}", "--data_dir", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "--guidance_interval: expected LO,HI with 0 ≤ LO < HI (HI may be inf), or all" in err
    assert list(tmp_path.iterdir()) == []


HOSTILE_NAMES = ["/tmp/ddpm_hostile_absolute", "../../elsewhere", "a/b", "a\\b", ".", "..", "", "ünïcödé", "x" * 300,
                 "tab\tname", "nul\x00name", "two words"]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_a_run_name_that_is_not_a_name_is_refused_and_nothing_is_written_anywhere(name, tiny_data, trained, tmp_path):
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    (sandbox / "models").mkdir()
    before = tree(tmp_path), tree(trained)
    for argv in (["--data_dir", tiny_data, "--epochs", "1", *TINY_MODEL],
                 ["--data_dir", tiny_data, "--resume", "auto"],
                 ["--inference", "--model_path", str(trained / "models" / "uncond" / "ckpt.pt"), "--no_cuda"]):
        result = run_main(*argv, "--run_name", name, cwd=sandbox)
        assert f"--run_name {name!r} " in one_line_error(result)
        assert "it names files, not a place" in result.stderr
    assert (tree(tmp_path), tree(trained)) == before
    assert not os.path.exists("/tmp/ddpm_hostile_absolute")


@pytest.mark.parametrize("argv, message", [
    (["--import_weights", "x", "--inference"], "--inference and --import_weights are separate jobs"),
    (["--export_diffusers", "out"], "--export_diffusers needs --model_path (a checkpoint written by training"),
    (["--import_weights", "x", "--preset", "ddpm_cifar10"], "--preset does nothing in --import_weights"),
    (["--variance", "beta"], "--variance applies to --sampler ddpm (the sampler here is dpm++2m"),
])
def test_foreign_weight_flags_that_do_not_go_together(argv, message, tmp_path):
    torch.save({}, tmp_path / "m.pt")
    result = run_main(*argv, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr


@pytest.mark.parametrize("argv,message", [
    (["--eval_nll", "2", "--denoising_strip"], "separate jobs at --inference"),
    (["--nll_variance", "beta"], "--nll_variance does nothing in --inference (it is for training and --eval_nll)"),
    (["--eval_nll", "-1"], "--eval_nll must be 0 (off) or an image count"),
])
def test_nll_flags_that_do_not_go_together_stop_with_one_line(trained, argv, message):
    result = run_main("--inference", "--model_path", trained / "models" / "uncond" / "ckpt.pt", *argv, cwd=trained)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


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


@pytest.mark.parametrize("argv,message", [
    (["--inference", "--model_path", "x.pt", "--tensorboard", "tb"], "--tensorboard does nothing in --inference"),
    (["--tensorboard", "tb"], "--tensorboard needs the tensorboard package"),
])
def test_tensorboard_flag_errors(argv, message, tmp_path, monkeypatch, capsys):
    real_find_spec = ddpm_train.importlib.util.find_spec
    monkeypatch.setattr(ddpm_train.importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real_find_spec(name, *a))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        ddpm_main.main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
