"""The command line, derived from the settings ddpm_config.py declares: the parser (a flag per Setting, grouped by
section), which flags were given, presets filled in, the checks of the numbers, the old synonyms, the sampling
settings the flags ask for, and docs/flags.md (`python ddpm_flags.py > docs/flags.md`)."""
import argparse
import dataclasses
import math

from ddpm_config import (FLAGS, JOB_WORDS, RESUME_WORDS, SAMPLING_FLAGS, SECTIONS, SYNONYMS, flag_text,
                         preset_flags)
from ddpm_diffusion import SAMPLERS, SamplerSettings
from ddpm_helpers import UserError
from ddpm_presets import PRESETS


class Command(argparse.Namespace):
    """The command line once read (ddpm_main.main: parsed, checked, synonyms resolved, torchrun's rank added): the
    flags' values by name, never changed afterwards; what a job works out from them (a run's name, say) it keeps
    itself."""

    def __init__(self, **values):
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError(f"the command line is read once: --{name} cannot change")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, the message and a pointer to --help (no usage block); exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written, each flag's default after its help (flags without one say in words), and the help
    column wide enough for the longer flags."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=26)

    def _get_help_string(self, action):
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)


USAGE = "%(prog)s [--inference --model_path CKPT | --resume PATH | --import_weights X] [flags]"


def build_parser(description=None, version=None):
    """The command line: a flag per Setting (but world_size), grouped by SECTIONS; --version says `version`."""
    parser = ArgumentParser(prog="ddpm_main.py", usage=USAGE, description=description,
                            formatter_class=HelpFormatter, allow_abbrev=False)  # --epoch is not --epochs
    if version:
        parser.add_argument("--version", action="version", version=f"%(prog)s {version}")
    groups = {key: parser.add_argument_group(title, text) for key, (title, text) in SECTIONS.items()}
    for setting in FLAGS:
        help_text = argparse.SUPPRESS if setting.hidden else setting.help.replace("%", "%%")
        if setting.parse is bool:
            groups[setting.section].add_argument(f"--{setting.name}", action="store_true", help=help_text)
            continue
        groups[setting.section].add_argument(f"--{setting.name}", type=setting.parse, default=setting.default,
                                             choices=setting.choices, metavar=setting.metavar, help=help_text)
    return parser


def flags_given(parser, args, argv):
    """The names (dests) of the flags given on the command line, as opposed to those left at their defaults: argv
    parsed again into a namespace whose every entry is already set, so that argparse fills in no default."""
    unset = object()
    given = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(args), unset)))
    return frozenset(name for name, value in vars(given).items() if value is not unset)


def parse_command_line(parser, argv):
    """argv's flags, those a --preset names (ddpm_presets) filling in the ones not given: a new training run's."""
    args = parser.parse_args(argv)
    if args.preset is not None:
        if args.inference or args.resume is not None:
            parser.error("--preset sets up a new training run; a resumed run keeps its checkpoint's settings, and "
                         "inference samples with the checkpoint's")
        parser.set_defaults(**PRESETS[args.preset][1])
        args = parser.parse_args(argv)
    return args


def check_numbers(args):
    """Every number finite and in its Setting's range (--guidance_interval, whose HI may be inf, is checked by its
    type); the U-Net's width one its GroupNorm can divide."""
    for name, value in vars(args).items():
        if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
            raise UserError(f"--{name} must be finite, got {value}")
    for setting in FLAGS:
        value = getattr(args, setting.name)
        if setting.check is None or value is None:
            continue
        if isinstance(value, list):
            if not all(map(setting.check.holds, value)):
                raise UserError(f"--{setting.name} must each be {setting.check.phrase()}, got {flag_text(value)}")
        elif not setting.check.holds(value):
            raise UserError(f"--{setting.name} must be {setting.check.phrase()}, got {value}")
    if args.dim % args.groups:
        raise UserError(f"--dim must be a multiple of --groups {args.groups} (the U-Net's GroupNorm groups), "
                        f"got {args.dim}")


def check_flags_apply(args, given, job):
    """Every flag given does something in the command's job (Setting.jobs), beside a flag it needs (Setting.needs),
    and no file or folder flag is empty."""
    for setting in FLAGS:
        if setting.name not in given:
            continue
        if job not in setting.jobs:
            uses = " and ".join(JOB_WORDS[j] for j in setting.jobs)
            raise UserError(f"--{setting.name} does nothing in {JOB_WORDS[job]} (it is for {uses}); drop it")
        if setting.needs and not given & set(setting.needs):
            others = " or ".join(f"--{name}" for name in setting.needs)
            raise UserError(f"--{setting.name} goes with {others}; give {'it' if len(setting.needs) == 1 else 'one'} "
                            "too")
        if setting.is_path and getattr(args, setting.name) == "":
            raise UserError(f"--{setting.name} is empty: name a {'folder' if 'DIR' in setting.metavar else 'file'}")


def resolve_synonyms(args, given):
    """--no_compile is --compile off and --no_bf16 is --precision fp32: the flags they stand for, as if given (a
    resume takes them over the checkpoint's); beside a contradicting --compile or --precision, an error."""
    for old, (flag, value) in SYNONYMS.items():
        if getattr(args, old):
            if flag in given and getattr(args, flag) != value:
                raise UserError(f"--{old} means --{flag} {value}, but --{flag} {getattr(args, flag)} was given too; "
                                "give one of them")
            setattr(args, flag, value)
            given = given | {flag}
    return given


def sampler_settings(args, saved, timesteps):
    """How to sample a T-step model (inference, the per-epoch grids and FID): the sampling flags given, else the
    checkpoint's settings `saved` (None: SamplerSettings' defaults). A --sampler other than the saved one starts
    from that sampler's defaults, keeping the saved guidance scale and interval and the variance. Steps are filled in
    for T."""
    base = saved or SamplerSettings()
    if args.sampler is not None and args.sampler != base.sampler:
        base = SamplerSettings(args.sampler, guidance_scale=base.guidance_scale,
                               guidance_interval=base.guidance_interval, variance=base.variance)
    given = {field: getattr(args, flag) for flag, field in SAMPLING_FLAGS.items() if getattr(args, flag) is not None}
    settings = dataclasses.replace(base, **given)
    kind = SAMPLERS[settings.sampler]
    if kind.every_step and args.sampling_steps is not None:
        takers = " and ".join(name for name, other in SAMPLERS.items() if not other.every_step)
        raise UserError(f"--sampling_steps applies to --sampler {takers} ({settings.sampler} always runs all T steps)")
    for option in ("spacing", "eta", "variance"):  # what only some samplers take; a preset's value is no mistake
        if getattr(args, option) is not None and option not in kind.options and option in args.given:
            takers = " and ".join(name for name, other in SAMPLERS.items() if option in other.options)
            raise UserError(f"--{option} applies to --sampler {takers} (the sampler here is {settings.sampler})")
    try:
        return settings.for_timesteps(timesteps)
    except ValueError:  # steps > T (check_numbers rejects steps < 1)
        raise UserError(f"--sampling_steps {settings.steps} is more than the model's T = {timesteps}") from None


def flags_markdown():
    """docs/flags.md: every flag by section, with its default, what it may be and what a resume does with it, then
    the presets' flags."""
    lines = ["# Flags", "", "Generated from `ddpm_config.SETTINGS` by `python ddpm_flags.py > docs/flags.md` "
             "(tests/test_config.py keeps it in sync). *On --resume*: **kept** settings are what the run trains and "
             "cannot change; the others may be given anew.", ""]
    for key, (title, text) in SECTIONS.items():
        lines += [f"## {title[0].upper()}{title[1:]}", ""] + ([text, ""] if text else [])
        lines += ["| flag | default | may be | on --resume | meaning |", "|---|---|---|---|---|"]
        for s in (s for s in FLAGS if s.section == key):
            default = "" if s.default is None or s.default is False else f"`{flag_text(s.default)}`"
            may = (", ".join(s.choices) if s.choices else s.check.phrase() if s.check else
                   "a switch" if s.parse is bool else "")
            meaning = f"{s.help}.{' ' + s.more if s.more else ''}" + (" (a synonym, hidden in --help)" if s.hidden
                                                                       else "")
            meaning += f" With {' or '.join(f'--{name}' for name in s.needs)}." if s.needs else ""
            lines.append(f"| `--{s.name}` | {default} | {may} | {RESUME_WORDS.get(s.stored, '')} | "
                         f"{meaning.replace('|', '/')} |")
        lines.append("")
    lines += ["## Presets", "", "`--preset NAME` sets these flags for a new training run; flags given beside it win.",
              ""]
    for name, (what, _) in PRESETS.items():
        lines += [f"- **{name}**: {what}. `{preset_flags(name)}`"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(flags_markdown(), end="")
