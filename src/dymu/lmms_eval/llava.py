"""``--model dymu_llava``: LLaVA-1.5 with DyMU as an lmms-eval backend.

``--model_args`` (comma-separated ``key=value``; lists in brackets):

=====================  ======================================================================================
``pretrained``         llava-hf or original LLaVA-1.5 folder, or a hub name in the local Hugging Face cache
``thresholds``         DyMU name (``ViT-L-14-336-tome-72out``), ``.safetensors`` / authors' ``.pth`` file, or
                       ``[t0,t1,...]`` (one per tower block); default: the checkpoint's ``dymu`` config block
``vtu``                ``fast`` (default) / ``exact`` / ``off``
``threshold_offset``   added to every threshold (> 0 keeps more tokens)
``method``             ``dymu`` (default), or a baseline of :mod:`dymu.baselines` keeping exactly ``token_budget``
                       tokens per image: ``tome`` (fixed-count ToMe), ``prune`` (CLS-attention pruning),
                       ``random`` (random dropping)
``token_budget``       target mean visual tokens per image; the offset is calibrated once on
                       ``calibration_images`` (default 32) images: those of ``budget_images`` (a JSON image list,
                       dymu's threshold-finding format) or else the first documents of the first task evaluated
                       (a baseline ``method``: its fixed count, no calibration)
``token_order``        DToMe token order: ``single`` (default: each image merged as the authors' code merges a
                       lone image, so any batch size gives the batch-size-1 results), ``authors`` (their code's
                       batch-dependent behaviour), ``batch``, ``raster``
``dymu``               ``false``: the stock model (the "full" baseline) even if the checkpoint asks for DyMU
``vision_tower``       where an original checkpoint's CLIP tower is loaded from
``batch_size``         prompts per forward pass (images with different token counts batch together)
``device``, ``dtype``  ``cuda`` / ``cpu`` / ``cuda:1``; ``float16`` (default on GPU), ``bfloat16``, ``float32``
                       (default on CPU), ``auto``
``max_new_tokens``     default when a task sets none (1024, as lmms-eval's llava_hf)
``prompt_suffix``      appended to every request's text (``\n`` written as backslash-n is a newline); default: the
                       checkpoint's own (``prompt_suffix`` in its ``dymu`` config block, e.g. the small VLM's ""),
                       else nothing (the tasks carry their own instructions)
``tokens_path``        where to write the visual token record (default: next to lmms-eval's results file)
``loglikelihood_output``  ``logprob`` (default: the summed log-probability, lmms-eval's documented contract) or
                       ``loss`` (its negation, what lmms-eval's ``multiple_choice`` scoring — an argmin — expects)
=====================  ======================================================================================

Every request's visual token counts (per image) are recorded; at the end of the run (``clean``) they are gathered
over processes and written as ``<date>_dymu_tokens.json`` next to lmms-eval's ``<date>_results.json`` (mean ± std
overall and per task, and each sample's counts; :mod:`dymu.lmms_eval.token_record` says how it finds that file),
and the summary goes into the results file's ``throughput`` section (``avg_dymu_visual_tokens_mean`` /
``avg_dymu_visual_tokens_std`` / ``avg_dymu_images``). Each logged sample also carries
``token_counts.input_tokens``: the tokens its prompt put into the language model.

The pieces: :mod:`~dymu.lmms_eval.arguments` (model args → typed settings), :mod:`~dymu.lmms_eval.requests`
(visuals, generation settings, batches), :mod:`~dymu.lmms_eval.token_record`; this module is the backend class.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from loguru import logger as eval_logger
from PIL import Image
from tqdm import tqdm

import dymu
from dymu import evaluation
from dymu.data import read_image_list
from dymu.evaluation import Prompt
from dymu.lmms_eval.arguments import DTYPES, loud_failure, parse_model_args  # noqa: F401  (DTYPES: importable here)
from dymu.lmms_eval.requests import (
    LoglikelihoodPair,
    batches,
    first_images,
    flatten_visuals,
    generation_settings,
    same_generation_settings,
)
from dymu.lmms_eval.token_record import TokenRecord, lmms_eval_command, started, write_next_to_results_at_exit, write_record
from dymu.vlm import load_llava
from dymu.vlm.base import calibrate_token_budget, dymu_vtu_mode, vlm_state
from dymu.vlm.llava import full_image_tokens
from dymu.vlm.loading import is_onevision, read_config

NAME = "dymu_llava"
MAX_ROUNDS = 32  # generate_until_multi_round: a task that never signals the end is stopped here
_flatten = flatten_visuals  # its name here before dymu.lmms_eval.requests held it


class DyMULlava(lmms):
    """LLaVA-1.5 + DyMU for lmms-eval's simple (``doc_to_visual``) tasks; see the module docstring."""

    is_simple = True
    backend_name = NAME  # the --model name, in messages and the token record
    accepted_args = (
        "pretrained, method, thresholds, vtu, threshold_offset, token_budget, budget_images, calibration_images, "
        "token_order, dymu, vision_tower, batch_size, device, dtype, max_new_tokens, tokens_path, loglikelihood_output, "
        "prompt_suffix"
    )
    budget_unit = "per image"  # what token_budget counts

    @loud_failure
    def __init__(self, **model_args: Any) -> None:
        super().__init__()
        self._started = started()
        args = parse_model_args(self.backend_name, self.accepted_args, model_args)
        given = args.given
        self.batch_size_per_gpu = args.batch_size
        self._rank, self._world_size = args.launch.rank, args.launch.world_size
        self._device = args.device
        self.settings = args.record()
        try:
            model, processor = self._load(args.path, **args.load_kwargs())
        except (FileNotFoundError, ValueError, KeyError) as err:
            raise ValueError(f"{self.backend_name}: cannot load {given.pretrained} with thresholds={given.thresholds}: {err}") from err
        try:
            self.settings["token_order"] = evaluation.set_token_order(model, given.token_order)
        except ValueError as err:
            raise ValueError(f"{self.backend_name}: token_order={given.token_order!r}: {err}") from None
        self._model = model.to(self._device).eval()
        self.processor = processor
        self.processor.tokenizer.padding_side = "left"
        evaluation.ensure_chat_template(self.processor)
        self.max_new_tokens = int(given.max_new_tokens)
        self.prompt_suffix = evaluation.choose_prompt_suffix(model, args.prompt_suffix, "")
        self.settings["prompt_suffix"] = self.prompt_suffix
        self.loglikelihood_output = given.loglikelihood_output
        self.tokens_path = args.tokens_path
        self.merging = dymu_vtu_mode(model) is not None and self._merging_on()
        self.settings["vtu"] = dymu_vtu_mode(model)
        self.settings["merging"] = self.merging
        self._token_budget = args.token_budget
        self._calibration_images = int(given.calibration_images)
        self._budget_done = args.token_budget is None or given.method != "dymu"
        if not self._budget_done and given.budget_images:
            images = read_image_list(given.budget_images, max_images=self._calibration_images)
            self._calibrate([images.image_dir / p for p in images.paths])
        self._records = TokenRecord()
        self._gen_time = 0.0
        self._gen_tokens = 0
        self._gen_requests = 0
        eval_logger.info(f"{self.backend_name}: {args.path} on {self._device} ({self.settings})")

    # ------------------------------------------------------------------------------------------ properties
    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def _load(self, path: Path, **kwargs: Any) -> tuple[Any, Any]:
        """The model and processor (``kwargs``: :func:`dymu.vlm.load_llava`'s)."""
        if is_onevision(read_config(path)):
            raise ValueError(f"{path} is a LLaVA-OneVision checkpoint: use --model dymu_llava_onevision")
        return load_llava(path, **kwargs)

    def _merging_on(self) -> bool:
        if vlm_state(self._model).method != "dymu":  # a baseline always reduces the tokens
            return True
        return dymu.get_state(self._model.model.vision_tower).mode == "infer"

    # ------------------------------------------------------------------------------------------ helpers
    def _calibrate_offset(self, images: list[Any], target: float) -> float:
        return calibrate_token_budget(self._model, self.processor, images, target)

    def _calibrate(self, images: list[Any]) -> None:
        if not images:
            raise ValueError(f"{self.backend_name}: token_budget needs images to calibrate on; none were found")
        offset = self._calibrate_offset(images, float(self._token_budget))
        self.settings["threshold_offset"] = offset
        eval_logger.info(
            f"{self.backend_name}: threshold offset {offset:+.4f} for {self._token_budget:g} visual tokens {self.budget_unit} "
            f"({len(images)} images)"
        )
        self._budget_done = True

    def _calibrate_on_tasks(self, requests: list[Instance]) -> None:
        """Calibrate the budget on the first documents of the first request's task (the same on every rank)."""
        args = requests[0].args
        doc_to_visual, task, split = args[2], args[-2], args[-1]
        self._calibrate(first_images(self.task_dict[task][split], doc_to_visual, self._calibration_images))

    def _visuals(self, doc_to_visual, task: str, split: str, doc_id: Any) -> list[Any]:
        visuals = flatten_visuals(doc_to_visual(self.task_dict[task][split][doc_id]))
        for v in visuals:
            if not isinstance(v, Image.Image):
                raise ValueError(self._not_an_image(v, task, doc_id))
        return visuals

    def _not_an_image(self, visual: Any, task: str, doc_id: Any) -> str:
        return f"{self.backend_name} evaluates images only; task {task!r} document {doc_id} gave a {type(visual).__name__} visual"

    def _generation_settings(self, gen_kwargs: dict) -> dict[str, Any]:
        return generation_settings(gen_kwargs, self.max_new_tokens, self.backend_name)

    def _generate(self, prompts: list[Prompt], settings: dict[str, Any]) -> list[evaluation.Generation]:
        start = time.perf_counter()
        gens = evaluation.generate(self._model, self.processor, prompts, **settings)
        self._gen_time += time.perf_counter() - start
        self._gen_tokens += sum(g.output_tokens for g in gens)
        self._gen_requests += len(gens)
        return gens

    def _loglikelihoods(self, prompts: list[Prompt], continuations: list[str]) -> list[evaluation.LogLikelihood]:
        return evaluation.loglikelihood(self._model, self.processor, prompts, continuations)

    # ------------------------------------------------------------------------------------------ lmms API
    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        if not requests:
            return []
        if not self._budget_done:
            self._calibrate_on_tasks(requests)
        results: list[GenerationResult | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc=f"{self.backend_name} generate")
        for batch in batches(requests, self.batch_size_per_gpu, key=same_generation_settings):
            args = [requests[i].args for i in batch]
            settings = self._generation_settings(args[0][1])
            prompts = [Prompt(str(a[0]) + self.prompt_suffix, self._visuals(a[2], a[4], a[5], a[3])) for a in args]
            for i, a, g in zip(batch, args, self._generate(prompts, settings)):
                self._records.add(a[4], a[5], a[3], g.visual_tokens)
                results[i] = GenerationResult(g.text, TokenCounts(input_tokens=g.input_tokens, output_tokens=g.output_tokens))
                self.cache_hook.add_partial("generate_until", (a[0], a[1]), g.text)
            bar.update(len(batch))
        bar.close()
        return results  # type: ignore[return-value]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Per request ``(sum of log p(continuation | context, images), is_greedy)`` (``loss``: the sum negated)."""
        if not requests:
            return []
        if not self._budget_done:
            self._calibrate_on_tasks(requests)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        sign = -1.0 if self.loglikelihood_output == "loss" else 1.0
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc=f"{self.backend_name} loglikelihood")
        for batch in batches(requests, self.batch_size_per_gpu):
            prompts, continuations, args = [], [], []
            for i in batch:
                context, target, doc_to_visual, doc_id, task, split = requests[i].args
                doc = self.task_dict[task][split][doc_id]
                continuation = target if isinstance(target, str) else target(doc)
                if isinstance(continuation, (list, tuple)):
                    raise ValueError(f"{self.backend_name}: task {task!r} gave several continuations for one loglikelihood request")
                visuals = self._visuals(doc_to_visual, task, split, doc_id)
                prompts.append(Prompt(str(context) + self.prompt_suffix, visuals))
                continuations.append(str(continuation))
                args.append((task, split, doc_id))
            for i, (task, split, doc_id), ll in zip(batch, args, self._loglikelihoods(prompts, continuations)):
                self._records.add(task, split, doc_id, ll.visual_tokens)
                results[i] = LoglikelihoodPair(sign * ll.logprob, ll.is_greedy)
                self.cache_hook.add_partial("loglikelihood", requests[i].args[:2], tuple(results[i]))
            bar.update(len(batch))
        bar.close()
        return results  # type: ignore[return-value]

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """Multi-round tasks: round 0 answers the context; round ``k`` asks the task's ``doc_to_text`` with the
        previous answers for the next visuals and context, until it signals the end. Each round is one turn."""
        if not requests:
            return []
        if not self._budget_done:
            self._calibrate_on_tasks(requests)
        results = []
        for req in tqdm(requests, disable=self.rank != 0, desc=f"{self.backend_name} multi-round"):
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = req.args
            doc = self.task_dict[task][split][doc_id]
            settings = self._generation_settings(gen_kwargs)
            visuals, rounds, info, counts = self._visuals(doc_to_visual, task, split, doc_id), [], None, []
            for round_idx in range(MAX_ROUNDS + 1):
                if round_idx == MAX_ROUNDS:
                    raise RuntimeError(f"{self.backend_name}: task {task!r} document {doc_id} did not end after {MAX_ROUNDS} rounds")
                if round_idx > 0:
                    visuals, context, terminal, previous, info = doc_to_text(
                        doc, previous_output=list(rounds), round_idx=round_idx, previous_round_info=info
                    )
                    rounds = list(previous) if previous is not None else rounds
                    if terminal:
                        break
                    visuals = flatten_visuals(visuals)
                gen = self._generate([Prompt(str(context) + self.prompt_suffix, visuals)], settings)[0]
                counts += gen.visual_tokens
                rounds.append(gen.text)
            self._records.add(task, split, doc_id, counts)
            results.append(list(rounds))
        return results

    # ------------------------------------------------------------------------------------------ token record
    def token_record(self) -> dict[str, Any]:
        """Visual token statistics of every request seen (this process), overall and per task, with samples."""
        return self._records.summary(self.backend_name, self.settings, self._full_tokens_per_image())

    def _full_tokens_per_image(self) -> int | None:
        """The stock model's visual tokens per image (the same for every LLaVA-1.5 image)."""
        return full_image_tokens(self._model, processor=self.processor) if hasattr(self, "_model") else None

    def write_token_record(self, path: str | Path) -> Path:
        return write_record(path, self._final_record)

    def _finish(self) -> None:
        """Gather the token record over processes, log it, write it next to the results, add it to them."""
        self._final_record = self._records.gathered().summary(
            self.backend_name, self.settings, self._full_tokens_per_image()
        )
        if self._rank != 0:
            return
        overall = self._final_record["overall"]
        eval_logger.info(f"{self.backend_name}: {evaluation.format_stats(overall)}")
        command = lmms_eval_command()
        if self.tokens_path is not None:
            try:
                eval_logger.info(f"{self.backend_name}: visual token record written to {self.write_token_record(self.tokens_path)}")
            except OSError as err:
                eval_logger.error(f"{self.backend_name}: cannot write the visual token record to {self.tokens_path}: {err}")
        elif command is not None:  # lmms-eval writes its results after this call: the record follows them
            write_next_to_results_at_exit(self._final_record, command, self._started)
        extra = {"dymu_images": overall["images"]}
        if overall["images"]:
            extra.update(dymu_visual_tokens_mean=overall["mean"], dymu_visual_tokens_std=overall["std"])
        speed = self._gen_tokens / self._gen_time if self._gen_time > 0 else 0.0
        log_metrics(self._gen_time, self._gen_tokens, speed, additional_metrics=extra)

    def clean(self) -> None:
        # lmms-eval calls this once, on every process, after the last request and before it scores and saves
        try:
            self._finish()
        finally:
            super().clean()
