"""House rules on the code's shape (issue 30): one job per file, so no module under src/dymu grows past 400 lines,
and scripts stay argument parsing and tables over library calls (about 200 lines at most)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_LIMIT = 400
SCRIPT_LIMIT = 220


def _too_long(paths: list[Path], limit: int) -> list[str]:
    return [f"{p.relative_to(REPO)}: {n} lines" for p in paths if (n := len(p.read_text().splitlines())) > limit]


def test_no_module_under_src_dymu_exceeds_400_lines():
    modules = sorted((REPO / "src" / "dymu").rglob("*.py"))
    assert len(modules) > 50  # the package is there
    assert not _too_long(modules, MODULE_LIMIT), "split by job: " + ", ".join(_too_long(modules, MODULE_LIMIT))


@pytest.mark.parametrize("folder", ["eval_scripts", "bench"])
def test_scripts_stay_thin(folder):
    scripts = sorted((REPO / folder).glob("*.py"))
    assert scripts
    assert not _too_long(scripts, SCRIPT_LIMIT), "move logic into the library: " + ", ".join(
        _too_long(scripts, SCRIPT_LIMIT))
