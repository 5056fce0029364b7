"""Record site activations per concept, batch by batch, inside nnsight traces.

Each batch's reduction to Welford partials happens *inside* the trace (``batch_partials``), so only
O(concepts x d_model) numbers leave it -- the same code is what ships to NDIF for a remote model. The forward
pass stops right after the site (``tracer.stop()``): the layers above it are never computed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save_file

from .batching import Progress, batches, tokenize
from .concepts import concept_labels
from .errors import NsLensError
from .files import atomic_path
from .models import Site, model_id, read_site, tokenizer_fingerprint
from .remote import job_backend, poll_job, trace_args, with_retries
from .stats import ConceptStats, batch_partials

# Progress, batches and tokenize live in nslens.batching; they stay importable from here as before
__all__ = ["POSITIONS", "Progress", "RecordResult", "batches", "bytes_per_batch", "record",
           "sample_per_concept", "tokenize"]

#: non-blocking remote jobs a recording keeps submitted ahead of the one it waits for
JOBS_IN_FLIGHT = 4

logger = logging.getLogger(__name__)

POSITIONS = ("last", "all")


@dataclass
class RecordResult:
    """Streaming statistics, plus the raw vectors when asked for (``[n, d]`` float32) with their labels and their
    indices into the recorded prompts (``sample_index``, ascending)."""

    stats: ConceptStats
    samples: np.ndarray | None = None
    sample_labels: np.ndarray | None = None
    sample_index: np.ndarray | None = None

    def save_samples(self, path: str | Path) -> Path:
        """Raw vectors and their labels as ``.safetensors`` (written to a temp file, then renamed)."""
        if self.samples is None or self.sample_labels is None:
            raise NsLensError("no raw samples were kept: record with keep_samples=True")
        with atomic_path(path) as tmp:
            index = self.sample_index if self.sample_index is not None else np.arange(len(self.samples))
            save_file({"samples": self.samples, "labels": self.sample_labels, "index": index.astype(np.int64)}, tmp,
                      metadata={"label_names": json.dumps(self.stats.label_names), "format": "nslens.samples/1"})
        return Path(path)


def sample_per_concept(labels: np.ndarray, max_samples: int, seed: int = 0) -> np.ndarray:
    """Indices (ascending) of at most ``max_samples`` samples, balanced across concepts: every concept gets an
    equal share (a concept with fewer samples gives its unused share to the others), drawn at random (seeded)
    within the concept. Class-grouped datasets (DBPedia-14 on the Hub is stored by class) keep every class."""
    labels = np.asarray(labels)
    if max_samples < 1:
        raise NsLensError(f"max_samples must be >= 1, got {max_samples}")
    if len(labels) <= max_samples:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    groups = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
    quota, left = {}, max_samples
    for n_left, (c, idx) in enumerate(sorted(groups.items(), key=lambda kv: len(kv[1]))):
        quota[c] = min(len(idx), left // (len(groups) - n_left))
        left -= quota[c]
    return np.sort(np.concatenate([rng.choice(idx, quota[c], replace=False) for c, idx in groups.items()]))


def record(
    model: Any,
    site: Site,
    prompts: Sequence[str],
    labels: Sequence[int] | np.ndarray,
    label_names: Sequence[str],
    *,
    batch_size: int = 16,
    position: str = "last",
    keep_samples: bool = False,
    max_samples: int = 50_000,
    sample_seed: int = 0,
    remote: bool | str = False,
    progress: Progress | None = None,
    meta: dict[str, Any] | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 10,
    keep_checkpoint: bool = False,
) -> RecordResult:
    """Per-concept statistics of the site's activations over ``prompts``.

    ``position="last"`` reads each prompt's last token (the paper's protocol: the position that predicts the
    label); ``"all"`` reads every real (non-padding) token, each labelled with its prompt's concept.
    ``keep_samples`` also returns the raw last-token vectors (for the probe ranking and the analyses), at most
    ``max_samples`` of them, a balanced seeded sample of every concept (``sample_per_concept``; statistics always
    use every sample); only the kept rows leave the trace. It is only allowed with ``position="last"``.
    ``RecordResult.save_samples`` keeps them on disk. ``checkpoint`` saves the partial statistics every
    ``checkpoint_every`` batches and resumes from them; the file is removed at the end unless ``keep_checkpoint``
    (then the caller removes it once the result is safely written).
    """
    if position not in POSITIONS:
        raise NsLensError(f"unknown position {position!r}; choose one of {', '.join(POSITIONS)}")
    labels = concept_labels(labels, len(label_names))
    if len(prompts) != len(labels):
        raise NsLensError(f"{len(prompts)} prompts but {len(labels)} labels")
    if len(prompts) == 0:
        raise NsLensError("nothing to record: the dataset is empty")
    if keep_samples and position != "last":
        raise NsLensError("keep_samples needs position='last'")
    c = len(label_names)
    stats = ConceptStats.empty(c, site.d_model, list(label_names), meta={
        "model_id": model_id(model), **site.describe(), "position": position,
        **({"tokenizer": tokenizer_fingerprint(model.tokenizer)} if getattr(model, "tokenizer", None) else {}),
        **(meta or {})})
    kept: list[np.ndarray] = []
    keep_idx = sample_per_concept(labels, max_samples, sample_seed) if keep_samples else np.zeros(0, np.int64)
    keep_mask = np.zeros(len(labels), dtype=bool)
    keep_mask[keep_idx] = True
    parts = batches(len(prompts), batch_size)
    start, fingerprint, jobs = 0, "", {}
    if checkpoint is not None:
        if keep_samples:
            raise NsLensError("checkpointed recording keeps no raw samples; drop keep_samples or checkpoint")
        fingerprint = _fingerprint(prompts, labels, site, model_id(model), position, batch_size)
        start, jobs = _resume(Path(checkpoint), fingerprint, stats)
    def inputs(i: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor | None]:
        sl = parts[i]
        rows = torch.as_tensor(np.flatnonzero(keep_mask[sl])) if keep_samples else None
        return tokenize(model, prompts[sl]), torch.as_tensor(labels[sl]), rows

    def submit(i: int) -> str:
        """Real remote runs: the batch as a non-blocking job (its id goes into the checkpoint before it is
        waited for, so a restarted client polls it instead of submitting it again)."""
        enc, lab, rows = inputs(i)
        backend = job_backend(model)
        with_retries(lambda: _record_batch(model, site, enc, lab, c, position, rows, {"backend": backend}),
                     what=f"record batch {i} (submit)")
        return str(backend.job_id)

    for i, sl in enumerate(parts):
        if i < start:
            continue
        if remote is True:
            for j in range(i, min(i + JOBS_IN_FLIGHT, len(parts))):
                if j not in jobs:
                    jobs[j] = submit(j)
                    if checkpoint is not None:
                        _save_checkpoint(Path(checkpoint), fingerprint, stats, i, jobs)
            def again(i: int = i) -> str:
                jobs[i] = submit(i)
                if checkpoint is not None:
                    _save_checkpoint(Path(checkpoint), fingerprint, stats, i, jobs)
                return jobs[i]

            part = poll_job(model, jobs[i], what=f"record batch {i}", resubmit=again)["part"]
            del jobs[i]
        else:
            enc, lab, rows = inputs(i)
            part = _record_batch(model, site, enc, lab, c, position, rows, trace_args(model, remote))
        if not bool(part["finite"]):
            raise NsLensError(f"non-finite activations (NaN/inf) at {site.path} in batch {i} "
                             f"(samples {sl.start}..{sl.stop - 1}); check the model's dtype and inputs")
        stats.update(part)
        if keep_samples:
            kept.append(part["x"].float().numpy())
        if checkpoint is not None and ((i + 1) % checkpoint_every == 0 or i + 1 == len(parts)):
            _save_checkpoint(Path(checkpoint), fingerprint, stats, i + 1, jobs)
        if progress is not None:
            progress("record", i + 1, len(parts))
    if checkpoint is not None and Path(checkpoint).exists() and not keep_checkpoint:
        Path(checkpoint).unlink()  # the caller that writes the result elsewhere keeps it until that write succeeded
    stats.meta["n_samples"] = int(len(prompts))
    if not keep_samples:
        return RecordResult(stats)
    return RecordResult(stats, np.concatenate(kept), labels[keep_idx].copy(), keep_idx)


def _record_batch(model: Any, site: Site, enc: dict[str, torch.Tensor], lab: torch.Tensor, c: int,
                  position: str, rows: torch.Tensor | None, trace_kwargs: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """One batch's partials (``part``, the one value that leaves the trace). With a non-blocking backend in
    ``trace_kwargs`` the trace only submits the job and this returns None; the result is fetched by name."""
    part = None  # stays None when the trace only submitted a job
    with torch.no_grad():
        with model.trace(enc, **trace_kwargs) as tracer:
            h = read_site(model, site)
            if position == "last":
                x = h[:, -1, :]
                part = batch_partials(x, lab, c)
                if rows is not None:  # only the kept rows leave the trace
                    part["x"] = x[rows.to(x.device)].detach().cpu()
            else:
                w = enc["attention_mask"].reshape(-1)
                x = h.reshape(-1, h.shape[-1])
                part = batch_partials(x, lab.repeat_interleave(h.shape[1]), c, weights=w)
            part = part.save()
            tracer.stop()
    return part


def _fingerprint(prompts: Sequence[str], labels: np.ndarray, site: Site, mid: str, position: str,
                 batch_size: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([mid, site.describe(), position, batch_size, len(prompts)]).encode())
    for p in prompts:
        h.update(p.encode() + b"\0")
    h.update(np.asarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()


def _save_checkpoint(path: Path, fingerprint: str, stats: ConceptStats, done: int, jobs: dict[int, str]) -> None:
    """The partial statistics in the ``ConceptStats`` file format, tagged with the run's fingerprint and the ids of
    remote jobs submitted but not yet merged (batch index -> job id)."""
    ConceptStats(stats.count, stats.mean, stats.m2, stats.abs_sum, stats.label_names,
                 {"checkpoint": {"fingerprint": fingerprint, "batches_done": done,
                                 "jobs": {str(k): v for k, v in sorted(jobs.items())}}}).save(path)


def _resume(path: Path, fingerprint: str, stats: ConceptStats) -> tuple[int, dict[int, str]]:
    """Load a checkpoint into ``stats``; returns the number of batches already done (0 without a file) and the
    pending remote jobs."""
    if not path.exists():
        return 0, {}
    saved = ConceptStats.load(path)
    tag = saved.meta.get("checkpoint")
    if not isinstance(tag, dict):
        raise NsLensError(f"{path} is not an nslens record checkpoint")
    if tag.get("fingerprint") != fingerprint:
        raise NsLensError(f"record checkpoint {path} was written for another run (model, site, prompts, labels or "
                         "batch size differ); delete it or choose another checkpoint file")
    stats.count, stats.mean, stats.m2, stats.abs_sum = saved.count, saved.mean, saved.m2, saved.abs_sum
    done = int(tag["batches_done"])
    jobs = {int(k): str(v) for k, v in tag.get("jobs", {}).items() if int(k) >= done}
    logger.info("resuming recording from %s after %d batches (%d remote jobs pending)", path, done, len(jobs))
    return done, jobs


def bytes_per_batch(n_concepts: int, d_model: int) -> int:
    """What one recorded batch sends back (float64 partials), independent of batch size and sequence length."""
    return int(8 * (n_concepts * (1 + 3 * d_model)) + 1)
