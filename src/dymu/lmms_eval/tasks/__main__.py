"""``python -m dymu.lmms_eval.tasks``: print the ``--include_path`` for dymu's lmms-eval tasks."""

from dymu.lmms_eval.tasks import include_path

print(include_path())
