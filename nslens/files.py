"""Writing artifacts so that nothing is ever half-written: a temporary file beside the target, renamed into place
only when complete. Shared by every module that writes (statistics, masks, samples, tables, caches, runs)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import NsLensError

__all__ = ["OUTPUT_EXTENSIONS", "atomic_path", "file_lock", "is_leftover", "nslens_home", "output_stem", "read_json",
           "slug", "write_text"]


def slug(name: str) -> str:
    """A file-name-safe form of a concept name (``he/his`` -> ``he_his``; ``?`` -> ``concept``): file names carry an
    index prefix, so slugs need not be unique."""
    return "".join(ch if ch.isalnum() else "_" for ch in name).strip("_").lower() or "concept"


#: the extensions of nslens's ``<stem>.<ext>`` outputs (tables, check sheets)
OUTPUT_EXTENSIONS = (".md", ".csv", ".json", ".jsonl")


def output_stem(path: str | Path) -> Path:
    """The stem that ``<stem>.md``, ``.json``, ... are written under: ``path`` less one of ``OUTPUT_EXTENSIONS``
    (``table.md`` -> ``table``), any other name whole (``run.v2`` stays ``run.v2``: dropping its last dot-part
    wrote ``run.v1`` and ``run.v2`` to the same files)."""
    p = Path(path)
    return p.with_suffix("") if p.suffix.lower() in OUTPUT_EXTENSIONS else p


def nslens_home() -> Path:
    """Where nslens caches what it builds or measures once (the embedded model, task files, clean results,
    general-text means): ``$NSLENS_HOME``, default ``~/.cache/nslens``."""
    return Path(os.environ.get("NSLENS_HOME", Path.home() / ".cache" / "nslens"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[str]:
    """Yield a temporary file name next to ``path``; rename it into place only if the block succeeds. The file
    gets the permissions an ordinary ``open`` would give it (0666 less the umask), not mkstemp's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def is_leftover(path: str | Path) -> bool:
    """Whether ``path`` is a temporary file ``atomic_path`` made (``.<name>.<random>.tmp``) that a killed writer
    left behind: not a user's file, so it does not make a directory non-empty."""
    name = Path(path).name
    return name.startswith(".") and name.endswith(".tmp")


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """An exclusive advisory lock (``flock``, POSIX) on ``path`` held for the block: processes building the same
    cache (the embedded model, a GGUF conversion) wait here, and the one that waited finds the finished build."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
    return Path(path)


def read_json(path: str | Path, build: Callable[[str], Any] | None = None) -> Any:
    """A JSON file nslens wrote (a run's summary or config, a table), parsed by ``build`` (a ``from_json``) or
    as a JSON object. A truncated, edited or foreign file is one line naming it: it was an internal error deep in
    the decoder or a constructor. A missing file stays the operating system's error."""
    path = Path(path)
    try:
        text = path.read_text()
        value = build(text) if build is not None else json.loads(text)
    except NsLensError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # JSONDecodeError and UnicodeDecodeError too
        raise NsLensError(f"{path} is damaged or not what nslens wrote there ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:120]}); write it again") from e
    if build is None and not isinstance(value, dict):
        raise NsLensError(f"{path} holds a JSON {type(value).__name__}, not the object nslens writes there")
    return value
