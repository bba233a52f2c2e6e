"""The code blocks of the README and docs/ marked as runnable run as shown, from the repository's root."""
import glob
import re

from conftest import ROOT

MARK = "<!-- runs as shown: tests/test_readme.py -->"


def marked_blocks():
    """(file, code) of every marked block in README.md and docs/*.md."""
    blocks = []
    for path in [f"{ROOT}/README.md", *sorted(glob.glob(f"{ROOT}/docs/*.md"))]:
        text = open(path, encoding="utf-8").read()
        blocks += [(path, code) for code in re.findall(re.escape(MARK) + r"\n```python\n(.*?)```", text, flags=re.S)]
    return blocks


def test_the_marked_python_blocks_of_the_readme_and_docs_run_as_shown(monkeypatch):
    blocks = marked_blocks()
    assert blocks, f"no block is marked {MARK}"
    monkeypatch.chdir(ROOT)
    for path, block in blocks:
        exec(compile(block, path, "exec"), {})  # in this process: the seconds of importing torch again saved
