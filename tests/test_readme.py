"""The README's code blocks marked as runnable run as shown, from the repository's root."""
import re

from conftest import ROOT

MARK = "<!-- runs as shown: tests/test_readme.py -->"


def marked_blocks():
    text = open(f"{ROOT}/README.md", encoding="utf-8").read()
    return re.findall(re.escape(MARK) + r"\n```python\n(.*?)```", text, flags=re.S)


def test_the_readmes_marked_python_blocks_run_as_shown(monkeypatch):
    blocks = marked_blocks()
    assert blocks, f"no block is marked {MARK}"
    monkeypatch.chdir(ROOT)
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})  # in this process: the seconds of importing torch again saved
