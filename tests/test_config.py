"""ddpm_config: one declaration per setting, and what is derived from it (flags, checks, resume rules, docs)."""
import argparse
import math
import os
import subprocess
import sys

import pytest

import ddpm_config
import ddpm_flags
from ddpm_checkpoint import CONFIG_ENTRIES, config_problem
from ddpm_config import (ADJUSTABLE_SETTINGS, BY_NAME, FIXED_SETTINGS, FLAGS, MODEL_SETTINGS, RUN_SETTINGS, Range,
                         SAMPLING_FLAGS, SETTINGS)
from ddpm_diffusion import SamplerSettings
from ddpm_flags import build_parser, flags_markdown
from ddpm_presets import PRESETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    assert config_problem({**config, "timesteps": "10"}) == "the config's timesteps is '10', not a whole number ≥ 1"
    assert config_problem({**config, "ema_decay": 1.0}) == "the config's ema_decay is 1.0, not a number in [0, 1)"
    assert config_problem({**config, "model": {"dim": 8, "dim_mults": [1, 2], "norm_eps": 0}}) == \
        "the config's model.norm_eps is 0, not a number > 0"


def test_float_list_and_int_list_refuse_what_they_cannot_read():
    with pytest.raises(argparse.ArgumentTypeError):
        ddpm_config.int_list("1,x")
    with pytest.raises(argparse.ArgumentTypeError):
        ddpm_config.int_list(",")
    with pytest.raises(argparse.ArgumentTypeError):
        ddpm_config.float_list(",")
    assert ddpm_config.float_list("0, 1.5") == [0.0, 1.5]
