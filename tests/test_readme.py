"""Every ```python block of README.md runs as written, in a fresh namespace and a scratch directory.

A block that cannot run here (it needs an engine's launcher or a GPU) is marked in the README by an
HTML comment on the line just above it, ``<!-- snippet: skip <reason> -->``; the reason is required and
becomes the skip message.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)
_SKIP = re.compile(r"<!--\s*snippet:\s*skip\s+(\S.*?)\s*-->\s*$")


def snippets() -> list[tuple[int, str, str | None]]:
    """(line number, code, skip reason or None) for each python block."""
    text = README.read_text()
    out = []
    for m in _BLOCK.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        above = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = _SKIP.search(above)
        out.append((line, m.group(1), skip.group(1) if skip else None))
    return out


def test_readme_has_python_snippets():
    assert any(skip is None for _, _, skip in snippets())  # the suite below must not be vacuous


@pytest.mark.parametrize("line,code,skip", [pytest.param(*s, id=f"README.md:{s[0]}") for s in snippets()])
def test_snippet_runs(line, code, skip, tmp_path, monkeypatch):
    if skip:
        pytest.skip(skip)
    monkeypatch.chdir(tmp_path)  # snippets may write files (checkpoints)
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
