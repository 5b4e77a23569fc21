"""The easy-VQA lmms-eval tasks (``easy_vqa.yaml``, ``easy_vqa_full.yaml``); subset rule and hooks in
:mod:`dymu.lmms_eval.tasks.easy_vqa.utils`."""
