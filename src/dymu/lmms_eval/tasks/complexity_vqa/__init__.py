"""The complexity-VQA lmms-eval task (``dymu_complexity_vqa.yaml``); hooks in
:mod:`dymu.lmms_eval.tasks.complexity_vqa.utils`."""
