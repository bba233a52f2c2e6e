"""The settings (ddpm_config), the command line made from them (ddpm_flags) and the presets (ddpm_presets)."""
import argparse
import math
import os
import subprocess
import sys

import pytest
import torch

import ddpm_config
import ddpm_flags
import ddpm_main
from conftest import ROOT
from ddpm_checkpoint import CONFIG_ENTRIES, TOOL_VERSION, config_problem
from ddpm_config import (ADJUSTABLE_SETTINGS, BY_NAME, FIXED_SETTINGS, FLAGS, MODEL_SETTINGS, RUN_SETTINGS,
                         SAMPLING_FLAGS, SETTINGS, Range, preset_flags, training_config)
from ddpm_data import CIFAR10_CLASSES
from ddpm_diffusion import SamplerSettings
from ddpm_flags import build_parser, flags_markdown
from ddpm_model import Attention, UNetConfig, build_unet
from ddpm_presets import PRESETS, preset_network
from ddpm_runtime import parameter_count
from ddpm_sample import asked_sampling, sampler_settings


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


def test_docs_flags_md_is_generated_from_the_declarations():
    with open(os.path.join(ROOT, "docs", "flags.md"), encoding="utf-8") as f:
        assert f.read() == flags_markdown(), "regenerate it: python ddpm_flags.py > docs/flags.md"


def test_every_flag_is_in_help_and_docs_and_help_fits_150_lines():
    env = {**os.environ, "COLUMNS": "80"}
    text = subprocess.run([sys.executable, os.path.join(ROOT, "ddpm_main.py"), "--help"], capture_output=True,
                          text=True, env=env, check=True).stdout
    assert len(text.splitlines()) <= 150
    docs = flags_markdown()
    for setting in FLAGS:
        assert (f"--{setting.name}" in text) != setting.hidden, setting.name
        assert f"`--{setting.name}`" in docs
    for title, _ in ddpm_flags.SECTIONS.values():
        assert f"\n{title}:" in text


def test_ranges_say_what_they_hold():
    assert [Range(1).phrase(), Range(0, open_low=True).phrase(), Range(0).phrase(), Range(0, 1).phrase(),
            Range(0, 1, open_high=True).phrase()] == ["at least 1", "greater than 0", "0 or more", "in [0, 1]",
                                                      "in [0, 1)"]
    assert Range(1).symbols() == "≥ 1" and Range(0, open_low=True).symbols() == "> 0"
    assert [Range(0, 1, open_high=True).holds(v) for v in (-0.1, 0, 0.5, 1)] == [False, True, True, False]
    assert Range(10, zero_is_off=True).holds(0) and not Range(10, zero_is_off=True).holds(5)


def test_the_checkpoint_checks_come_from_the_same_declarations():
    words = {key: CONFIG_ENTRIES[key].words() for key in ("epochs", "lr", "min_snr_gamma", "dim_mults",
                                                          "attn_resolutions", "schedule", "conditional", "p_uncond",
                                                          "data_dir")}
    assert words == {"epochs": "a whole number ≥ 1", "lr": "a number > 0", "min_snr_gamma": "none or a number > 0",
                     "dim_mults": "a list of whole numbers ≥ 1",
                     "attn_resolutions": "none or a list of whole numbers ≥ 1",
                     "schedule": "one of linear, cosine, sigmoid", "conditional": "true or false",
                     "p_uncond": "a number in [0, 1]", "data_dir": "a folder"}
    holds = {key: value.holds for key, value in CONFIG_ENTRIES.items()}
    assert holds["epochs"](3) and not holds["epochs"](0) and not holds["epochs"](2.5) and not holds["epochs"](True)
    assert holds["lr"](1e-3) and not holds["lr"](float("nan")) and not holds["lr"]("0.1")
    assert holds["min_snr_gamma"](None) and not holds["lr"](None)
    assert holds["dim_mults"]([1, 2]) and not holds["dim_mults"]([]) and not holds["dim_mults"]([1, 0])
    sampling = CONFIG_ENTRIES["sampling"]  # the sampler settings by their flags' declarations, and nothing else
    assert sampling.fields["guidance_scale"] == BY_NAME["guidance_scale"].value
    assert sampling.problem({"guidance_scale": "3"}, "s") == "s.guidance_scale is '3', not a number ≥ 0"
    assert sampling.problem({"steps": 2.5}, "s") == "s.steps is 2.5, not none or a whole number ≥ 1"
    assert sampling.problem({"order": 2}, "s").startswith("s holds order, not one of sampler, steps, ")
    assert sampling.problem({"guidance_interval": [0.5, math.inf], "steps": None}, "s") is None


def test_every_stored_default_and_preset_value_passes_its_own_check():
    parser = build_parser()
    defaults = vars(parser.parse_args([]))
    for setting in SETTINGS:
        if setting.stored in ("fixed", "adjustable") or setting.name == "world_size":
            value = defaults.get(setting.name, setting.default)
            assert setting.value.holds(value), (setting.name, value)
    for name, (_, flags) in PRESETS.items():
        for key, value in flags.items():
            setting = BY_NAME[key]  # a preset names declared settings only
            if setting.stored in ("fixed", "adjustable"):
                assert setting.value.holds(value), (name, key, value)
            elif setting.check is not None:
                assert all(map(setting.check.holds, value if isinstance(value, list) else [value])), (name, key)
            if setting.choices:
                assert value in setting.choices, (name, key)


def test_resume_kinds_and_sampling_fields_follow_the_declarations():
    assert set(MODEL_SETTINGS) <= set(FIXED_SETTINGS) and "norm_eps" in MODEL_SETTINGS
    assert ADJUSTABLE_SETTINGS == ("lr", "lr_decay", "warmup_steps", "weight_decay", "epochs", "time_budget_min",
                                   "precision")
    assert RUN_SETTINGS == ("data_dir", "run_name", "world_size")
    assert set(SAMPLING_FLAGS.values()) == set(SamplerSettings.__dataclass_fields__)
    assert SAMPLING_FLAGS["sampling_steps"] == "steps"


def test_a_new_setting_is_one_declaration(monkeypatch):
    """What the contributing notes show: a Setting added to SETTINGS is a flag with its range and its row in the docs,
    and the check of its stored value (the resume kinds are derived from SETTINGS the same way, at import)."""
    new = ddpm_config.Setting("ema_warmup", "training", "EMA warm-up steps", 0, int, check=Range(0),
                              stored=ddpm_config.FIXED, metavar="N")
    settings = (*SETTINGS, new)
    monkeypatch.setattr(ddpm_flags, "FLAGS", tuple(s for s in settings if s.flag))  # what ddpm_config derives
    parser = build_parser()
    assert parser.parse_args(["--ema_warmup", "7"]).ema_warmup == 7
    with pytest.raises(ddpm_flags.UserError, match="--ema_warmup must be 0 or more, got -1"):
        ddpm_flags.check_numbers(parser.parse_args(["--ema_warmup", "-1"]))
    assert "`--ema_warmup` | `0` | 0 or more | kept (fixed) | EMA warm-up steps." in flags_markdown()
    assert new.value.words() == "a whole number ≥ 0" and not new.value.holds(-1)


def test_a_config_entry_of_the_wrong_type_is_named():
    config = {"model": {"dim": 8, "dim_mults": [1, 2]}, "timesteps": 10, "schedule": "cosine", "image_size": 16}
    assert config_problem(config) is None
    assert config_problem({**config, "timesteps": "10"}) == \
        "the config's timesteps is '10', not a whole number in [1, 100000]"
    assert config_problem({**config, "ema_decay": 1.0}) == "the config's ema_decay is 1.0, not a number in [0, 1)"
    assert config_problem({**config, "model": {"dim": 8, "dim_mults": [1, 2], "norm_eps": 0}}) == \
        "the config's model.norm_eps is 0, not a number in (0, 1]"


def test_float_list_and_int_list_refuse_what_they_cannot_read():
    with pytest.raises(argparse.ArgumentTypeError):
        ddpm_config.int_list("1,x")
    with pytest.raises(argparse.ArgumentTypeError):
        ddpm_config.int_list(",")
    with pytest.raises(argparse.ArgumentTypeError):
        ddpm_config.float_list(",")
    assert ddpm_config.float_list("0, 1.5") == [0.0, 1.5]


@pytest.mark.parametrize("text,interval", [("0.28,2.9", (0.28, 2.9)), ("1,inf", (1.0, math.inf)),
                                           ("all", (0.0, math.inf))])
def test_flag_values(text, interval):
    assert ddpm_config.noise_interval(text) == interval


CIFAR10 = {"dataset": "cifar10", "classes": CIFAR10_CLASSES, "channels": 3, "data_size": [32, 32], "num_train": 45000,
           "num_val": 5000, "num_test": 10000}
PAPER_PARAMETERS = 35_746_307  # Ho et al.'s CIFAR-10 model in its published PyTorch port
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
