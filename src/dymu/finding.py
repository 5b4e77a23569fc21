"""Threshold finding over an image dataset (the library side of ``dymu thresholds``).

For every global batch the patched encoder runs in finding mode: per layer the batch's ``B * r_l`` most similar
pairs merge and the layer's threshold is the best score that did not; the per-layer thresholds are averaged over
batches (cumulative mean, :class:`~dymu.thresholds.RunningThresholds`).

Batches (see :mod:`dymu.data`): global batch ``i`` is entries ``[i*B, (i+1)*B)`` of the image list; unreadable
images are dropped from their own batch only and reported.

Several processes (``torchrun``; gloo on CPU, nccl on GPU): each rank loads a contiguous slice of every global
batch, and the per-layer selection is made over the scores of all ranks together
(:func:`select_top_across_processes`: the A-token scores of all ranks are gathered in rank order and the global
top ``B_total * r`` merges), so N processes produce the same thresholds as one
process with the same global batch size on the same images (up to float rounding). The original authors instead
averaged per-process thresholds of per-process batches; with equal shards this differs only by sampling noise.

Resuming: after every finished batch, rank 0 atomically writes ``<output>.resume.pt`` with the running
thresholds, batches done, images seen and the skipped list. A killed run started again with the same settings
continues from the next batch — nothing lost, nothing counted twice. Different settings (encoder, merge counts,
batch size, image list, model dtype, device type, preprocessing) are refused. The resume file is removed once the
checkpoint is written, and when no image at all could be read (nothing to resume: a rerun after fixing the images starts
over). Images skipped in batches already done stay skipped when resuming; :attr:`FindingResult.readable_now`
lists those that load now (start over to include them).
"""

from __future__ import annotations

import functools
import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from dymu.data import ImageList, ImageListDataset, Transform, batches, describe_preprocess, load_image
from dymu.distributed import all_gather_2d, all_gather_objects, all_reduce_sum, rank_and_world
from dymu.distributed import init_distributed  # noqa: F401  (importable from here, where it lived before)
from dymu.encoders.base import DToMeState
from dymu.encoders.encoding import patch_size
from dymu.encoders.patching import patch, unpatch
from dymu.merge import TokenOrder, select_top
from dymu.output_lock import output_lock
from dymu.thresholds import RunningThresholds, ThresholdCheckpoint, save_thresholds

RESUME_FORMAT = "dymu-finding-resume/1"


@dataclass
class FindingSettings:
    """What must not change between a run and its resumption."""

    encoder: str
    num_layers: int
    merge_counts: list[int]
    schedule: str
    batch_size: int
    num_images: int
    images: str  # fingerprint of the image dir + list
    model: str  # what was loaded (informational; compared too)
    dtype: str | None = None  # model dtype ("float32"): another precision finds other thresholds
    device: str | None = None  # device type ("cpu", "cuda"), not the index: torchrun ranks differ in it
    token_order: str = "authors"  # raster finds other thresholds than the authors' order
    preprocess: str | None = None  # how images are resized (dymu.data.describe_preprocess): other pixels, other
    # thresholds; None: a transform dymu cannot describe (not compared)


@dataclass
class FindingResult:
    checkpoint: ThresholdCheckpoint
    batches_done: int
    num_batches: int
    images_seen: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)
    resumed_from: int = 0  # batches already done when this run started
    output: Path | None = None  # written checkpoint (None while unfinished)
    readable_now: list[str] = field(default_factory=list)  # skipped in resumed batches, readable now (--restart)

    @property
    def finished(self) -> bool:
        return self.batches_done >= self.num_batches


def resume_path(output: str | Path) -> Path:
    """Where the resume state of a run writing ``output`` lives."""
    output = Path(output)
    return output.with_name(output.name + ".resume.pt")


dist_info = rank_and_world  # its name here before dymu.distributed held it (kept importable)


def _one_run_per_output(find: Callable[..., FindingResult]) -> Callable[..., FindingResult]:
    """Hold :func:`dymu.output_lock.output_lock` on ``output`` (rank 0, which writes it) for the whole run: a second
    run on the same output is refused instead of sharing its resume state."""

    @functools.wraps(find)
    def locked(*args, **kwargs) -> FindingResult:
        output = kwargs.get("output")
        with output_lock(output) if output is not None and rank_and_world()[0] == 0 else nullcontext():
            return find(*args, **kwargs)

    return locked


@_one_run_per_output
def find_thresholds(
    model: nn.Module,
    images: ImageList,
    transform: Transform,
    *,
    merge_counts: list[int],
    schedule: str = "constant",
    batch_size: int = 32,
    output: str | Path | None = None,
    resume: bool = True,
    overwrite: bool = False,
    num_workers: int = 0,
    progress: bool = True,
    max_batches: int | None = None,
    on_batch: Callable[[int, RunningThresholds], None] | None = None,
    model_source: str = "",
    token_order: TokenOrder = "authors",
) -> FindingResult:
    """Find per-layer thresholds of the encoder in ``model`` on ``images`` (see module doc).

    ``merge_counts`` — per-layer merges per image (:func:`dymu.merge_schedule`); ``output`` — checkpoint to write
    (with resume state next to it; None keeps everything in memory); ``resume=False`` discards a resume file;
    ``max_batches`` stops once that many global batches are done in total (the run can be resumed later);
    ``on_batch(batch_number, running)`` is called after each batch is saved; ``token_order`` — the token order
    after a merge (:mod:`dymu.merge`; ``"authors"``, ``"batch"`` and ``"single"`` all find the authors' thresholds,
    ``"raster"`` other ones), recorded in the checkpoint.
    """
    rank, world = rank_and_world()
    output = Path(output) if output is not None else None
    state_path = resume_path(output) if output is not None else None
    dataset = ImageListDataset(images, transform)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    num_batches = -(-len(images) // batch_size)

    state = patch(model, merge_counts=merge_counts, token_order=token_order)
    try:
        if world > 1:  # the per-layer selection over every process's images: thresholds equal one process's
            state.find_selection = select_top_across_processes
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        settings = FindingSettings(
            encoder=state.encoder,
            num_layers=state.num_layers,
            merge_counts=list(merge_counts),
            schedule=schedule,
            batch_size=batch_size,
            num_images=len(images),
            images=images.fingerprint(),
            model=model_source,
            dtype=str(dtype).removeprefix("torch."),
            device=device.type,
            token_order="raster" if token_order == "raster" else "authors",
            preprocess=describe_preprocess(transform),
        )
        sizes: set[tuple[int, int]] = set()  # (height, width) of the batches: recorded when there is one
        # the selection makes every process's thresholds the same: nothing left to average over processes
        running = RunningThresholds(state.num_layers, average_over_processes=False)
        done, seen, skipped = 0, 0, []
        readable_now: list[str] = []
        if state_path is not None and state_path.exists() and resume:
            done, seen, skipped = _load_resume(state_path, settings, running, sizes)
            readable_now = _readable_now(images, skipped)
        elif output is not None:
            if output.exists() and not overwrite:
                raise ValueError(f"{output} exists; pass overwrite=True (--overwrite) to replace it")
            if state_path.exists() and rank == 0:
                state_path.unlink()  # resume=False: start over
        resumed_from = done

        bar = tqdm(total=num_batches, initial=done, disable=not progress or rank != 0, unit="batch", desc="thresholds")
        stream = batches(dataset, batch_size, rank=rank, world_size=world, first=done, num_workers=num_workers)
        try:
            for batch in stream:
                if max_batches is not None and batch.number >= max_batches:
                    break
                n_local = len(batch.indices)
                n_global = all_reduce_sum(n_local, device)
                failed = [item for part in all_gather_objects(batch.failed) for item in part]
                if n_global > 0:
                    if n_local > 0:
                        if batch.pixel_values.dim() == 4:  # [B, 3, H, W]; packed patches (Qwen) have no size
                            sizes.add((int(batch.pixel_values.shape[-2]), int(batch.pixel_values.shape[-1])))
                        with torch.no_grad():
                            state.forward(batch.pixel_values.to(device=device, dtype=dtype))
                        found = state.run.found_thresholds
                    else:  # this rank's slice is empty: still take part in the per-layer selection
                        found = find_without_images(state, device)
                    running.update(found)
                done, seen = batch.number + 1, seen + n_global
                skipped += [(images.paths[i], reason) for i, reason in failed]
                if state_path is not None and rank == 0:
                    _save_resume(state_path, settings, running, done, seen, skipped, sizes)
                bar.update(1)
                bar.set_postfix(images=seen, skipped=len(skipped))
                if on_batch is not None:
                    on_batch(batch.number, running)
        finally:
            stream.close()  # stops the loading workers now (Ctrl-C included), not when garbage-collected
            bar.close()
    finally:
        unpatch(model)

    ckpt = ThresholdCheckpoint(
        thresholds=running.mean.float(),
        encoder=state.encoder,
        schedule=schedule,
        r_total=sum(merge_counts),
        merge_counts=list(merge_counts),
        images_seen=seen,
        token_order=token_order,
        input_size=next(iter(sizes)) if len(sizes) == 1 else None,  # one size: what decides the token grid
        patch_size=patch_size(model) if len(sizes) == 1 else None,
        preprocess=settings.preprocess,
    )
    result = FindingResult(ckpt, done, num_batches, seen, skipped, resumed_from)
    result.readable_now = readable_now
    if result.finished and seen == 0:
        if state_path is not None and state_path.exists() and rank == 0:
            state_path.unlink()  # nothing learned: a rerun after the images are fixed must not resume this
        raise ValueError(
            f"no image could be read ({len(skipped)} skipped, e.g. {skipped[0][0]}: {skipped[0][1]}) under "
            f"{images.image_dir}; fix the images (or --image-dir) and run again"
        )
    if result.finished and output is not None:
        if rank == 0:
            save_thresholds(output, ckpt)
            if state_path.exists():
                state_path.unlink()
        result.output = output
    return result


# ---------------------------------------------------------------- the per-layer selection across processes
def select_top_across_processes(scores: Tensor, r: int) -> tuple[Tensor, float]:
    """:func:`dymu.merge.select_top` over the concatenation (in rank order) of every process's ``scores``.

    Every process must call this for every layer of every batch, also with an empty ``[0, 0]`` tensor when it
    holds no image of the batch. Returns this process's merge flags and the (identical) global threshold.
    Without an initialised process group it is :func:`select_top`.
    """
    parts = all_gather_2d(scores)
    if len(parts) == 1:
        return select_top(scores, r)
    width = max(p.shape[1] for p in parts)
    # rows in rank order = image order of the global batch; -inf pads never merge and never set the threshold
    merge, found = select_top(torch.cat([F.pad(p, (0, width - p.shape[1]), value=-torch.inf) for p in parts]), r)
    start = sum(p.shape[0] for p in parts[: rank_and_world()[0]])
    return merge[start : start + scores.shape[0], : scores.shape[1]], found


def find_without_images(state: DToMeState, device: torch.device | str = "cpu") -> list[float]:
    """Take part in a synchronised finding batch while holding no image (all skipped or a short last batch)."""
    if state.mode != "find" or state.merge_counts is None:
        raise ValueError("find_without_images needs a state in 'find' mode")
    empty = torch.empty(0, 0, device=device)
    return [select_top_across_processes(empty, r)[1] for r in state.merge_counts]


def _readable_now(images: ImageList, skipped, limit: int = 1000) -> list[str]:
    """The images skipped in already-done batches that load now (checks the first ``limit``): a resumed run keeps
    them skipped, which the report says (``--restart`` includes them)."""
    found = []
    for path, _reason in skipped[:limit]:
        try:
            load_image(images.image_dir / path)
        except (OSError, ValueError):
            continue
        found.append(path)
    return found


def _save_resume(
    path: Path, settings: FindingSettings, running: RunningThresholds, done: int, seen: int, skipped, sizes: set
) -> None:
    blob = {
        "format": RESUME_FORMAT,
        "settings": asdict(settings),
        "running": running.state_dict(),
        "batches_done": done,
        "images_seen": seen,
        "skipped": [list(s) for s in skipped],
        "input_sizes": sorted(list(s) for s in sizes),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)  # atomic: a kill leaves the previous batch's state, never half a file


def _load_resume(
    path: Path, settings: FindingSettings, running: RunningThresholds, sizes: set
) -> tuple[int, int, list]:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot read resume state {path}: {err}; delete it (or pass --restart) to start over") from err
    if not isinstance(blob, dict) or blob.get("format") != RESUME_FORMAT:
        raise ValueError(f"{path} is not a dymu resume file; delete it (or pass --restart) to start over")
    if int(blob.get("images_seen", 0)) == 0:
        return 0, 0, []  # nothing learned yet (every image failed so far): start over
    stored = blob["settings"]
    unrecorded = {"dtype", "device", "preprocess"}  # resume files written before these were recorded: not compared
    differ = [
        f"{k}: {stored.get(k)!r} then, {v!r} now"
        for k, v in asdict(settings).items()
        if stored.get(k) != v and not (k in unrecorded and k not in stored)
        and not (k == "preprocess" and None in (stored.get(k), v))  # a transform dymu cannot describe: unknown
    ]
    if differ:
        raise ValueError(
            f"refusing to resume from {path}: settings differ ({'; '.join(differ)}); "
            "use the same settings, or pass --restart to start over"
        )
    running.load_state_dict(blob["running"])
    sizes.update(tuple(s) for s in blob.get("input_sizes", []))  # older resume files: the remaining batches say
    return int(blob["batches_done"]), int(blob["images_seen"]), [tuple(s) for s in blob["skipped"]]
