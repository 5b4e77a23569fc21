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
overall and per task, and each sample's counts), and the summary goes into the results file's ``throughput``
section (``avg_dymu_visual_tokens_mean`` / ``avg_dymu_visual_tokens_std`` / ``avg_dymu_images``). Each logged sample
also carries ``token_counts.input_tokens``: the tokens its prompt put into the language model.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from loguru import logger as eval_logger
from tqdm import tqdm

from dymu import evaluation
from dymu.evaluation import Prompt
from dymu.vlm.base import dymu_vtu_mode
from dymu.vtu import VTU_MODES

NAME = "dymu_llava"
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
MAX_ROUNDS = 32  # generate_until_multi_round: a task that never signals the end is stopped here


class LoglikelihoodPair(tuple, GenerationResult):
    """``(logprob, is_greedy)``, as lmms-eval's ``loglikelihood`` contract asks.

    lmms-eval 0.7.3's evaluator passes every model output through ``unwrap_generation_output``, which turns
    anything but a ``str`` / ``GenerationResult`` into its ``str()`` — a plain tuple would reach the task's
    ``process_results`` as the text ``"(-3.2, False)"``. This pair is both: a tuple for callers, and a
    ``GenerationResult`` whose ``text`` is the plain tuple for the evaluator.
    """

    def __new__(cls, logprob: float, is_greedy: bool):
        return tuple.__new__(cls, (float(logprob), bool(is_greedy)))

    def __init__(self, logprob: float, is_greedy: bool) -> None:
        self.text = (float(logprob), bool(is_greedy))
        self.token_counts = None


def parse_thresholds(value: Any, name: str = NAME) -> Any:
    """``None``, a list of floats (from ``[0.1,0.2]``), or a DyMU name / checkpoint path (checked to exist)."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    text = str(value).strip()
    if text.startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{name}: thresholds={text!r} is not a list of numbers: {err}") from None
        if not isinstance(values, list) or not all(isinstance(v, (int, float)) for v in values):
            raise ValueError(f"{name}: thresholds={text!r} is not a list of numbers")
        return [float(v) for v in values]
    from dymu.encoders import resolve_thresholds_path

    try:  # now, relative to the folder lmms-eval was started in (the error names the absolute path tried)
        return str(resolve_thresholds_path(text).absolute())
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{name}: {err}") from None


def loud_failure(init: Callable[..., None]) -> Callable[..., None]:
    """Make a failed construction impossible to miss: lmms-eval 0.7.3 catches it, logs one line among many and
    exits with status 0 (``--verbosity DEBUG``: re-raised, status 1). So print it framed on stderr too, once."""

    @functools.wraps(init)
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            init(self, *args, **kwargs)
        except Exception as err:
            if not getattr(err, "_dymu_reported", False):
                name = self.backend_name
                message = str(err) if str(err).startswith(name) else f"{name}: {err}"
                rule = "=" * 100
                print(
                    f"\n{rule}\n{name}: THE MODEL COULD NOT BE BUILT - nothing is evaluated, no results are written\n"
                    f"{type(err).__name__}: {message}\n(lmms-eval logs this and still exits with status 0; with "
                    f"--verbosity DEBUG it exits with status 1)\n{rule}",
                    file=sys.stderr,
                    flush=True,
                )
                try:
                    err._dymu_reported = True  # type: ignore[attr-defined]
                except AttributeError:
                    pass
            raise

    return wrapped


def _flatten(visuals: Any) -> list[Any]:
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        return [visuals]
    out = []
    for v in visuals:
        out.extend(_flatten(v))
    return out


def _running_results_file() -> Path | None:
    """``<output_path>/<model>/<date>_dymu_tokens.json`` of the ``simple_evaluate`` call that runs this model.

    lmms-eval hands models no output path; its ``simple_evaluate`` frame holds the ``evaluation_tracker`` and the
    ``datetime_str`` that name the results file (``<output_path>/<model>/<date>_results.json``).
    """
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "simple_evaluate" and frame.f_globals.get("__name__") == "lmms_eval.evaluator":
            tracker = frame.f_locals.get("evaluation_tracker")
            date = frame.f_locals.get("datetime_str")
            output = getattr(tracker, "output_path", None)
            name = getattr(getattr(tracker, "general_config_tracker", None), "model_name_sanitized", None)
            if output and date and name:
                return Path(output) / name / f"{str(date).replace(':', '-')}_dymu_tokens.json"
            return None
        frame = frame.f_back
    return None


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
    def __init__(
        self,
        pretrained: str | None = None,
        method: str = "dymu",
        thresholds: Any = None,
        vtu: str | None = None,
        threshold_offset: float | None = None,
        token_budget: float | None = None,
        budget_images: str | None = None,
        calibration_images: int = 32,
        token_order: str | None = None,
        dymu: bool | None = None,
        vision_tower: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        device: str | None = None,
        dtype: str | None = None,
        max_new_tokens: int = 1024,
        tokens_path: str | None = None,
        loglikelihood_output: str = "logprob",
        prompt_suffix: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(
                f"{self.backend_name}: unknown model_args {sorted(kwargs)}; accepted: {self.accepted_args}"
            )
        if vtu is not None and vtu not in VTU_MODES:
            raise ValueError(f"{self.backend_name}: vtu={vtu!r}; expected fast, exact or off")
        if loglikelihood_output not in ("logprob", "loss"):
            raise ValueError(f"{self.backend_name}: loglikelihood_output={loglikelihood_output!r}; expected logprob or loss")
        from dymu.baselines import METHODS

        if method not in METHODS:
            raise ValueError(f"{self.backend_name}: method={method!r}; expected {', '.join(METHODS)}")
        baseline = {}
        if method != "dymu":
            if token_budget is None or float(token_budget) != int(token_budget) or int(token_budget) < 1:
                raise ValueError(f"{self.backend_name}: method={method} needs token_budget=K, a positive whole "
                                 f"number of tokens, got {token_budget!r}")
            token_budget = int(token_budget)
            baseline = {"method": method, "token_budget": token_budget}
        if token_budget is not None and threshold_offset is not None:
            raise ValueError(f"{self.backend_name}: give token_budget or threshold_offset, not both (the budget sets the offset)")
        if isinstance(prompt_suffix, bool):  # lmms-eval reads "true"/"false" as booleans
            raise ValueError(f"{self.backend_name}: prompt_suffix={prompt_suffix!r}; expected the text to append")
        try:
            self.batch_size_per_gpu = int(batch_size)
        except (TypeError, ValueError):
            raise ValueError(f"{self.backend_name}: batch_size={batch_size!r}; expected a positive integer ('auto' is not supported)") from None
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"{self.backend_name}: batch_size must be >= 1, got {batch_size}")

        # processes: accelerate launch / torchrun set these; lmms-eval shards the requests by RANK itself
        self._world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self._rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = str(device) if device else ("cuda" if torch.cuda.is_available() else "cpu")
        if self._world_size > 1 and device == "cuda":
            device = f"cuda:{local_rank}"
        self._device = torch.device(device)
        if dtype in (None, ""):
            torch_dtype: Any = torch.float16 if self._device.type == "cuda" else torch.float32
        elif str(dtype) == "auto":
            torch_dtype = "auto"
        elif str(dtype) in DTYPES:
            torch_dtype = DTYPES[str(dtype)]
        else:
            raise ValueError(f"{self.backend_name}: dtype={dtype!r}; expected float16, bfloat16, float32 or auto")

        try:
            path = evaluation.resolve_pretrained(pretrained)
        except (FileNotFoundError, ValueError) as err:
            raise type(err)(f"{self.backend_name}: {err}") from None
        chosen = parse_thresholds(thresholds, self.backend_name)
        self.settings = {
            "pretrained": str(pretrained),
            "thresholds": chosen,
            "vtu": vtu,
            "threshold_offset": threshold_offset,
            "token_budget": token_budget,
            "method": method,
            "dymu": dymu,
            "dtype": str(dtype or torch_dtype).replace("torch.", ""),
            "batch_size": self.batch_size_per_gpu,
        }
        try:
            model, processor = self._load(
                path,
                thresholds=chosen,
                vtu=vtu,
                threshold_offset=threshold_offset,
                vision_tower=vision_tower,
                torch_dtype=torch_dtype,
                dymu=dymu,
                **baseline,
            )
        except (FileNotFoundError, ValueError, KeyError) as err:
            raise ValueError(f"{self.backend_name}: cannot load {pretrained} with thresholds={thresholds}: {err}") from err
        try:
            self.settings["token_order"] = evaluation.set_token_order(model, token_order)
        except ValueError as err:
            raise ValueError(f"{self.backend_name}: token_order={token_order!r}: {err}") from None
        self._model = model.to(self._device).eval()
        self.processor = processor
        self.processor.tokenizer.padding_side = "left"
        evaluation.ensure_chat_template(self.processor)
        self.max_new_tokens = int(max_new_tokens)
        given = None if prompt_suffix is None else str(prompt_suffix).replace("\\n", "\n")  # lmms-eval parses 1 as int
        self.prompt_suffix = evaluation.choose_prompt_suffix(model, given, "")
        self.settings["prompt_suffix"] = self.prompt_suffix
        self.loglikelihood_output = loglikelihood_output
        self.tokens_path = Path(tokens_path).absolute() if tokens_path else None
        self.merging = dymu_vtu_mode(model) is not None and self._merging_on()
        self.settings["vtu"] = dymu_vtu_mode(model)
        self.settings["merging"] = self.merging
        self._token_budget = token_budget
        self._calibration_images = int(calibration_images)
        self._budget_done = token_budget is None or method != "dymu"
        if not self._budget_done and budget_images:
            from dymu.data import read_image_list

            images = read_image_list(budget_images, max_images=self._calibration_images)
            self._calibrate([images.image_dir / p for p in images.paths])
        # per task: (split, doc_id) -> visual tokens of the request's images
        self._records: dict[str, dict[tuple[str, Any], list[int]]] = {}
        self._gen_time = 0.0
        self._gen_tokens = 0
        self._gen_requests = 0
        eval_logger.info(f"{self.backend_name}: {path} on {self._device} ({self.settings})")

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
        from dymu.vlm import load_llava
        from dymu.vlm.loading import is_onevision, read_config

        if is_onevision(read_config(path)):
            raise ValueError(f"{path} is a LLaVA-OneVision checkpoint: use --model dymu_llava_onevision")
        return load_llava(path, **kwargs)

    def _merging_on(self) -> bool:
        import dymu
        from dymu.vlm.base import vlm_state

        if vlm_state(self._model).method != "dymu":  # a baseline always reduces the tokens
            return True
        return dymu.get_state(self._model.model.vision_tower).mode == "infer"

    # ------------------------------------------------------------------------------------------ helpers
    def _calibrate_offset(self, images: list[Any], target: float) -> float:
        from dymu.vlm.base import calibrate_token_budget

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
        docs = self.task_dict[task][split]
        images: list[Any] = []
        for i in range(len(docs)):
            images.extend(_flatten(doc_to_visual(docs[i])))
            if len(images) >= self._calibration_images:
                break
        self._calibrate(images[: self._calibration_images])

    def _visuals(self, doc_to_visual, task: str, split: str, doc_id: Any) -> list[Any]:
        from PIL import Image

        visuals = _flatten(doc_to_visual(self.task_dict[task][split][doc_id]))
        for v in visuals:
            if not isinstance(v, Image.Image):
                raise ValueError(f"{self.backend_name} evaluates images only; task {task!r} document {doc_id} gave a {type(v).__name__} visual")
        return visuals

    def _record(self, task: str, split: str, doc_id: Any, counts: list[int]) -> None:
        self._records.setdefault(task, {})[(str(split), doc_id)] = list(counts)

    def _batches(self, requests: list[Instance], key) -> list[list[int]]:
        """Request indices in batches of ``batch_size``: grouped by ``key`` (e.g. generation settings), longest
        context first within a group."""
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(key(r.args), []).append(i)
        batches = []
        for idx in groups.values():
            idx.sort(key=lambda i: -len(requests[i].args[0]))
            batches += [idx[s : s + self.batch_size_per_gpu] for s in range(0, len(idx), self.batch_size_per_gpu)]
        return batches

    def _generation_settings(self, gen_kwargs: dict) -> dict[str, Any]:
        gk = dict(gen_kwargs or {})
        until = gk.get("until") or []
        if isinstance(until, str):
            until = [until]
        elif not isinstance(until, (list, tuple)):
            raise ValueError(f"{self.backend_name}: gen_kwargs['until'] must be a string or a list, got {type(until).__name__}")
        temperature = float(gk.get("temperature") or 0.0)
        do_sample = bool(gk["do_sample"]) if "do_sample" in gk else temperature > 0
        if temperature <= 0:
            do_sample = False
        return {
            "until": list(until),
            "max_new_tokens": int(gk.get("max_new_tokens") or self.max_new_tokens),
            "do_sample": do_sample,
            "temperature": temperature if do_sample else None,
            "top_p": gk.get("top_p") if do_sample else None,
            "num_beams": int(gk.get("num_beams") or 1),
        }

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
        for batch in self._batches(requests, key=lambda a: json.dumps(a[1], sort_keys=True, default=str)):
            args = [requests[i].args for i in batch]
            settings = self._generation_settings(args[0][1])
            prompts = [Prompt(str(a[0]) + self.prompt_suffix, self._visuals(a[2], a[4], a[5], a[3])) for a in args]
            for i, a, g in zip(batch, args, self._generate(prompts, settings)):
                self._record(a[4], a[5], a[3], g.visual_tokens)
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
        for batch in self._batches(requests, key=lambda a: ""):
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
                self._record(task, split, doc_id, ll.visual_tokens)
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
                    visuals = _flatten(visuals)
                gen = self._generate([Prompt(str(context) + self.prompt_suffix, visuals)], settings)[0]
                counts += gen.visual_tokens
                rounds.append(gen.text)
            self._record(task, split, doc_id, counts)
            results.append(list(rounds))
        return results

    # ------------------------------------------------------------------------------------------ token record
    def token_record(self) -> dict[str, Any]:
        """Visual token statistics of every request seen (this process), overall and per task, with samples."""
        return self._record_of(self._records)

    def _full_tokens_per_image(self) -> int | None:
        """The stock model's visual tokens per image (the same for every LLaVA-1.5 image)."""
        from dymu.vlm.llava import full_image_tokens

        return full_image_tokens(self._model) if hasattr(self, "_model") else None

    def _record_of(self, records: dict[str, dict[tuple[str, Any], list[int]]]) -> dict[str, Any]:
        tasks, everything = {}, []
        for task in sorted(records):
            samples = sorted(records[task].items(), key=lambda kv: (kv[0][0], str(type(kv[0][1])), kv[0][1]))
            counts = [c for _, cs in samples for c in cs]
            everything += counts
            tasks[task] = {
                **evaluation.token_stats(counts),
                "samples": [{"split": s, "doc_id": d, "visual_tokens": cs} for (s, d), cs in samples],
            }
        return {
            "model": self.backend_name,
            "settings": self.settings,
            "full_tokens_per_image": self._full_tokens_per_image(),
            "overall": evaluation.token_stats(everything),
            "tasks": tasks,
        }

    def _gathered_records(self) -> dict[str, dict[tuple[str, Any], list[int]]]:
        import torch.distributed as dist

        if self._world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
            return self._records
        parts: list[Any] = [None] * self._world_size
        dist.all_gather_object(parts, self._records)
        merged: dict[str, dict[tuple[str, Any], list[int]]] = {}
        for part in parts:
            for task, samples in (part or {}).items():
                merged.setdefault(task, {}).update(samples)
        return merged

    def write_token_record(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self._final_record, indent=1, default=str))
        return path

    def _finish(self) -> None:
        """Gather the token record over processes, log it, write it next to the results, add it to them."""
        self._final_record = self._record_of(self._gathered_records())
        if self._rank != 0:
            return
        overall = self._final_record["overall"]
        eval_logger.info(f"{self.backend_name}: {evaluation.format_stats(overall)}")
        target = self.tokens_path or _running_results_file()
        if target is not None:
            try:
                eval_logger.info(f"{self.backend_name}: visual token record written to {self.write_token_record(target)}")
            except OSError as err:
                eval_logger.error(f"{self.backend_name}: cannot write the visual token record to {target}: {err}")
        extra = {"dymu_images": overall["images"]}
        if overall["images"]:
            extra.update(dymu_visual_tokens_mean=overall["mean"], dymu_visual_tokens_std=overall["std"])
        from lmms_eval.models.model_utils.gen_metrics import log_metrics

        speed = self._gen_tokens / self._gen_time if self._gen_time > 0 else 0.0
        log_metrics(self._gen_time, self._gen_tokens, speed, additional_metrics=extra)

    def clean(self) -> None:
        # lmms-eval calls this once, on every process, after the last request and before it scores and saves
        try:
            self._finish()
        finally:
            super().clean()
