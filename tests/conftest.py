"""Test-wide settings: the suite never asks the authors' hub repository for thresholds (a missing DyMU name must
fail here, not download); tests that exercise the hub lookup set ``DYMU_HUB_REPO`` themselves."""

import os

os.environ.setdefault("DYMU_HUB_REPO", "")  # at import: subprocesses started by tests inherit it
