"""The checkpoint format (ddpm_checkpoint): the config each holds, what a resume keeps, round trips, exports."""
import os

import pytest
import torch

import ddpm_flags
from ddpm_checkpoint import TrainingState, build_checkpoint, export_for_inference, load_checkpoint, restore_training
from ddpm_config import (ADJUSTABLE_SETTINGS, DERIVED_KEYS, FIXED_SETTINGS, MODEL_SETTINGS, RUN_SETTINGS,
                         SAMPLING_SETTINGS, resolved_settings, resume_changes, saved_sampler_settings, stored_settings,
                         training_config)
from ddpm_data import CIFAR10_CLASSES, data_conflicts, trained_data
from ddpm_diffusion import SamplerSettings
from ddpm_helpers import UserError
from ddpm_model import UNet
from ddpm_sample import asked_sampling, sampler_settings

FACTS = {"dataset": "folder", "classes": ["a", "b", "c"], "channels": 3, "data_size": [16, 16], "num_train": 27,
         "num_val": 3, "num_test": 10}

# two command lines that differ in every setting a config holds
FLAGS_A = ["--conditional", "--timesteps", "10", "--schedule", "linear", "--loss_type", "l1", "--prediction", "v",
           "--min_snr_gamma", "5", "--dim", "8", "--dim_mults", "1,2", "--lr", "0.002", "--lr_decay", "cosine",
           "--warmup_steps", "3", "--batch_size", "8", "--p_uncond", "0.2", "--ema_decay", "0.99", "--seed", "7",
           "--epochs", "2", "--run_name", "a", "--data_dir", "data_a", "--time_budget_min", "3",
           "--sampler", "ddim", "--sampling_steps", "4", "--eta", "0.5", "--guidance_scale", "2", "--grad_accum", "2",
           "--precision", "fp32", "--architecture", "ddpm", "--num_res_blocks", "1", "--attn_resolutions", "8",
           "--dropout", "0.1", "--resblock", "add", "--groups", "4", "--norm_eps", "1e-6", "--weight_decay", "0"]
FLAGS_B = ["--timesteps", "20", "--schedule", "sigmoid", "--loss_type", "huber", "--dim", "16", "--dim_mults", "1",
           "--lr", "0.001", "--lr_decay", "none", "--warmup_steps", "5", "--batch_size", "4", "--p_uncond", "0.3",
           "--ema_decay", "0.9", "--seed", "8", "--epochs", "5", "--run_name", "b", "--data_dir", "data_b",
           "--time_budget_min", "4", "--precision", "bf16", "--weight_decay", "0.02"]


def flags(argv, world_size, saved_sampling=None):
    args = ddpm_flags.build_parser().parse_args(argv)
    sampling = sampler_settings(asked_sampling(args), saved_sampling, args.timesteps)
    return {**vars(args), "world_size": world_size, "sampling": sampling}


def given(argv):
    parser = ddpm_flags.build_parser()
    return ddpm_flags.flags_given(parser, parser.parse_args(argv), argv)


def test_every_config_key_is_of_exactly_one_kind():
    kinds = [set(FIXED_SETTINGS), set(ADJUSTABLE_SETTINGS), set(RUN_SETTINGS), set(SAMPLING_SETTINGS),
             set(DERIVED_KEYS)]
    assert sum(len(k) for k in kinds) == len(set.union(*kinds))  # disjoint
    config = training_config(flags(FLAGS_A, 1), FACTS)
    assert set(config) == set.union(*kinds) - set(MODEL_SETTINGS)  # a new key must be declared
    assert set(MODEL_SETTINGS) <= set(config["model"])  # the network's settings: stored once, in its entry


def test_the_config_holds_what_the_data_is_and_older_checkpoints_are_taken_as_square_colour_images():
    config = training_config(flags(FLAGS_A + ["--attn_resolutions", "7"], 1),  # 14 halves to 7
                             {**FACTS, "channels": 1, "data_size": [14, 14]})
    assert config["model"]["channels"] == 1 and config["channels"] == 1
    assert config["data_size"] == [14, 14] and config["image_size"] == 14  # --dim_mults 1,2: 14 halves once
    three_stages = training_config(flags(FLAGS_A + ["--dim_mults", "1,2,2"], 1), {**FACTS, "data_size": [14, 14]})
    assert three_stages["image_size"] == 16  # 14 halves twice only once padded to 16
    assert trained_data(config) == {"dataset": "folder", "classes": ["a", "b", "c"], "channels": 1,
                                    "data_size": [14, 14]}
    older = {key: value for key, value in config.items() if key not in ("dataset", "channels", "data_size")}
    older["model"] = {**config["model"], "channels": 3}
    assert trained_data({**older, "classes": CIFAR10_CLASSES, "image_size": 32}) == {
        "dataset": "cifar10", "classes": CIFAR10_CLASSES, "channels": 3, "data_size": [32, 32]}
    assert trained_data(older)["dataset"] == "folder"
    assert data_conflicts(config, trained_data(config)) == {}
    assert data_conflicts(config, {**FACTS, "channels": 3, "data_size": [14, 14]}) == {"channels": (1, 3)}


def test_flags_given_are_told_from_defaults():
    assert given(["--lr", "0.003", "--conditional", "--dim_mults", "1,2"]) == {"lr", "conditional", "dim_mults"}
    assert given([]) == set()


def test_resumed_config_takes_fixed_settings_from_the_checkpoint_and_adjustable_ones_from_flags_given():
    saved = training_config(flags(FLAGS_A, 1), FACTS)
    fresh = training_config(flags(FLAGS_B, 2), FACTS)
    # the fixed settings of FLAGS_B not given (given, they are refused: the next test), the others given
    resumed = training_config(flags(FLAGS_B, 2), FACTS, saved_config=saved,
                              given=given(FLAGS_B) - set(FIXED_SETTINGS))
    bare = training_config(flags([], 2), FACTS, saved_config=saved, given=set())
    saved, fresh, resumed, bare = map(stored_settings, (saved, fresh, resumed, bare))
    for key in FIXED_SETTINGS:
        assert saved[key] != fresh[key], f"FLAGS_B must change {key} for this test to mean anything"
        assert resumed[key] == saved[key] == bare[key], key
    for key in ADJUSTABLE_SETTINGS:
        assert saved[key] != fresh[key] and resumed[key] == fresh[key], key  # given: the command line's
        assert bare[key] == saved[key], key                                  # not given: the checkpoint's
    for key in RUN_SETTINGS:
        assert saved[key] != fresh[key] and resumed[key] == fresh[key], key
    assert resumed["model"] == saved["model"]  # derived from the checkpoint's dim, dim_mults, conditional
    assert resumed["global_batch_size"] == 8 * 2 * 2  # the checkpoint's batch and accumulation on this run's ranks


def test_fixed_settings_given_with_other_values_are_conflicts_and_adjustable_changes_are_listed():
    saved = training_config(flags(FLAGS_A, 1), FACTS)
    argv = ["--dim", "8", "--dim_mults", "1,2,4", "--timesteps", "20", "--lr", "0.001", "--epochs", "9",
            "--precision", "fp32"]
    with pytest.raises(UserError, match=r"--resume: --timesteps 20, --dim_mults 1,2,4 differ from the run being "
                                        r"resumed \(timesteps 10, dim_mults 1,2\)"):
        resolved_settings(flags(argv, 1), saved, given(argv))
    argv = ["--dim", "8", "--lr", "0.001", "--epochs", "9", "--precision", "fp32"]  # a fixed one given as it was
    resumed = training_config(flags(argv, 1), FACTS, saved_config=saved, given=given(argv))
    assert resume_changes(saved, resumed) == {"lr": (0.002, 0.001), "epochs": (2, 9),
                                              "sampling": (saved["sampling"], resumed["sampling"])}
    in_bf16 = argv + ["--precision", "bf16"]  # precision may change on resume
    in_bf16 = training_config(flags(in_bf16, 1), FACTS, saved_config=saved, given=given(in_bf16))
    assert resume_changes(saved, in_bf16)["precision"] == ("fp32", "bf16")


def test_sampling_settings_come_from_the_flags_given_else_the_checkpoint():
    saved = saved_sampler_settings(training_config(flags(FLAGS_A, 1), FACTS))
    assert saved == SamplerSettings("ddim", steps=4, eta=0.5, guidance_scale=2.0)
    assert flags(FLAGS_B, 1, saved)["sampling"] == saved  # FLAGS_B names no sampling flag
    assert flags([*FLAGS_B, "--sampling_steps", "6"], 1, saved)["sampling"] == SamplerSettings(
        "ddim", steps=6, eta=0.5, guidance_scale=2.0)
    # another sampler starts from its own defaults; the guidance scale stays the checkpoint's
    assert flags([*FLAGS_B, "--sampler", "dpm++2m"], 1, saved)["sampling"] == SamplerSettings(
        "dpm++2m", steps=20, guidance_scale=2.0)
    assert flags(FLAGS_B, 1)["sampling"] == SamplerSettings("dpm++2m", steps=20)  # no checkpoint: defaults, T = 20


def test_old_checkpoint_without_a_setting_falls_back_to_the_flag():
    saved = training_config(flags(FLAGS_A, 1), FACTS)
    del saved["min_snr_gamma"]
    assert training_config(flags(FLAGS_B, 1), FACTS, saved_config=saved)["min_snr_gamma"] is None


def test_checkpoint_round_trip_restores_weights_optimizer_rng_and_state():
    torch.manual_seed(0)
    model, ema = UNet(dim=8, dim_mults=(1,)), UNet(dim=8, dim_mults=(1,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 8, 8), torch.tensor([1, 2])).sum().backward()
    optimizer.step()
    state = TrainingState(epoch=3, step=40, batch_in_epoch=2, epoch_loss_sum=0.5, best_val=0.25, skipped_steps=6,
                          budget_spent=True)
    state.record_evaluation(3, 0.3, 0.25, 0.27)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)  # fp16's loss scale, as training left it
    ckpt = build_checkpoint({"k": 1}, model, ema, optimizer, state, use_cuda=False, scaler=scaler)
    assert set(ckpt) == {"format", "version", "config", "versions", "model", "ema", "optimizer", "rng", "grad_scaler",
                         "epoch", "step", "batch_in_epoch", "epoch_loss_sum", "best_val", "skipped_steps", "history",
                         "timing", "budget_spent"}
    expected_draw = torch.rand(3)

    torch.manual_seed(1)
    model2, ema2 = UNet(dim=8, dim_mults=(1,)), UNet(dim=8, dim_mults=(1,))
    optimizer2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    scaler2 = torch.amp.GradScaler("cpu")
    restored = restore_training(ckpt, model2, ema2, optimizer2, use_cuda=False, scaler=scaler2)
    assert restored == state and scaler2.get_scale() == 2.0 ** 10
    assert restore_training(ckpt, model2, ema2, optimizer2, use_cuda=False) == state  # now in bf16 or fp32: no scaler
    assert torch.equal(torch.rand(3), expected_draw)  # the RNG continues where the checkpoint was taken
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    assert optimizer2.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]


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
