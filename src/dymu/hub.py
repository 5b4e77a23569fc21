"""Hugging Face hub names, resolved as ``from_pretrained`` resolves them (the hub cache, ``HF_HUB_OFFLINE``),
with one clear error when a repository cannot be had: which repository, and how to point to a local copy instead.

* :func:`is_hub_name` — ``org/name`` that is not a local path;
* :func:`hub_file` — one file of a repository (cached by huggingface_hub), e.g. a VLM's ``config.json``;
* :func:`explain` — turns the ``OSError`` of a ``from_pretrained(hub name)`` into that error;
* :func:`find_hub_file` — the first of several candidate files that exists (threshold checkpoints: the layout of
  the authors' repository is configurable, see :mod:`dymu.encoders.names`).

huggingface_hub is imported lazily: the CLI builds its parsers without it.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_name(name: object) -> bool:
    """``org/name`` (a hub repository id) that is not an existing local path."""
    text = str(name)
    return bool(_REPO_ID.match(text)) and not text.startswith(".") and not Path(text).exists()


def offline() -> bool:
    return bool(constants.HF_HUB_OFFLINE)


def cache_dir() -> str:
    return str(constants.HF_HUB_CACHE)


def unavailable(repo: str, what: str, local_hint: str, detail: str = "") -> FileNotFoundError:
    """The error for a hub repository (or one of its files) that cannot be had here."""
    detail = f" ({detail})" if detail else ""
    if offline():
        why = f"HF_HUB_OFFLINE is set and it is not in the Hugging Face cache {cache_dir()}{detail}"
        fix = f"download it where there is internet (`hf download {repo}`, same HF_HOME) and rerun,"
    else:
        why = f"it could not be fetched{detail}"
        fix = "check the name and the connection,"
    return FileNotFoundError(f"{what}: hub repository {repo!r} is not available: {why}; {fix} {local_hint}".rstrip())


def hub_file(repo: str, filename: str, *, what: str, local_hint: str) -> Path:
    """``filename`` of hub repository ``repo`` (from the cache, else downloaded); :func:`unavailable` if it cannot be."""
    try:
        return Path(hf_hub_download(repo, filename))
    except (OSError, ValueError) as err:  # offline, no connection, unknown repository or file: one message
        raise unavailable(repo, what, local_hint, _short(err, filename)) from None


@contextlib.contextmanager
def explain(name: object, *, what: str, local_hint: str) -> Iterator[None]:
    """Re-raise an ``OSError`` from loading hub name ``name`` (``from_pretrained``) as :func:`unavailable`."""
    try:
        yield
    except OSError as err:
        if not is_hub_name(name):
            raise
        raise unavailable(str(name), what, local_hint, _short(err)) from None


def find_hub_file(repo: str, filenames: Sequence[str], *, what: str, local_hint: str) -> Path | None:
    """The first of ``filenames`` that repository ``repo`` holds: cached files first (no network), then, unless
    offline, downloaded. None if the repository holds none of them; :func:`unavailable` if it cannot be asked."""
    for filename in filenames:
        cached = try_to_load_from_cache(repo, filename)
        if isinstance(cached, str):
            return Path(cached)
    tried = ", ".join(filenames)
    if offline():
        raise unavailable(repo, what, local_hint, f"looked for {tried}")
    for filename in filenames:
        try:
            return Path(hf_hub_download(repo, filename))
        except LocalEntryNotFoundError as err:  # no connection: the other names would fail the same way
            raise unavailable(repo, what, local_hint, _short(err, filename)) from None
        except EntryNotFoundError:
            continue  # the repository has no such file: try the next layout
        except (OSError, ValueError) as err:  # unknown repository, gated, HTTP errors (HfHubHTTPError)
            raise unavailable(repo, what, local_hint, _short(err, filename)) from None
    return None


def _short(err: Exception, filename: str = "") -> str:
    if offline() and isinstance(err, LocalEntryNotFoundError):
        return ""  # "cannot find the requested files in the local cache": the message says so already
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    where = f"{filename}: " if filename else ""
    return f"{where}{type(err).__name__}: {first}"[:300]
