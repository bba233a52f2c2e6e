"""Shared pieces (ddpm_helpers): run names and the paths built from them."""
import os

import pytest

from ddpm_helpers import MAX_RUN_NAME, NAME_MAX, OUTPUT_NAMES, RunFiles, UserError, sanitized_run_name


def test_every_path_is_built_inside_its_folder_and_the_longest_name_fits():
    files = RunFiles("m", "o", "x" * MAX_RUN_NAME)
    assert os.path.dirname(files.ckpt_dir) == "m"
    for kind in OUTPUT_NAMES:
        path = files.output(kind, epoch=999_999_999)
        assert os.path.dirname(path) == "o"
        assert len(os.path.basename(path) + f".tmp{2 ** 22}") <= NAME_MAX
    assert max(len(os.path.basename(files.output(kind, epoch=999_999_999)) + f".tmp{2 ** 22}")
               for kind in OUTPUT_NAMES) == NAME_MAX
    with pytest.raises(UserError, match="at most 217"):
        RunFiles("m", "o", "x" * (MAX_RUN_NAME + 1))
    assert [sanitized_run_name(n) for n in ("../../x y", "..", "", None, "ok-1.2")] == ["x_y", "DDPM", "DDPM", "DDPM",
                                                                                       "ok-1.2"]
