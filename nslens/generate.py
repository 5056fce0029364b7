"""Generation under an intervention: what the edited model *says*, beside what the clean model says.

The intervention (range masks, steering, LEACE: any ``Intervention`` or sequence of them) is applied inside one
``model.generate`` trace at every forward of the decode loop (``tracer.all()``): the prompt's forward edits every
prompt position, each later step edits the one new position, so every generated token is produced by the edited
model. That is the same edit the erasure table and the side-effect evaluation make (``positions="all"``; an
intervention limited to the last position edits each step's newest token, the prompt's last token first). The
code is tensor code inside the trace, so it runs locally, on a quantized model and on NDIF alike.

Greedy decoding by default (reproducible, and what a side-by-side comparison needs); sampling takes the usual
``temperature``/``top_p``/``top_k`` and a ``seed`` that seeds torch before each of the clean and intervened runs,
so the two differ by the intervention only (locally; a remote server draws its own random numbers).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .batching import batches, tokenize
from .errors import NsLensError, check_number
from .intervene import Intervention, apply_in_trace, check_site
from .models import Site
from .remote import maybe_retry, trace_args

__all__ = ["Continuation", "GenerationSettings", "generate", "generate_ids", "traced_generate"]


@dataclass(frozen=True)
class GenerationSettings:
    """How to decode. The defaults are greedy decoding of 32 new tokens."""

    max_new_tokens: int = 32
    do_sample: bool = False
    """Sample instead of taking the most likely token (then ``temperature``, ``top_p``, ``top_k`` apply)."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0 = no top-k cut."""
    seed: int = 0
    """Seeds torch before each sampled run (local runs only; ignored for greedy decoding)."""

    def __post_init__(self) -> None:
        if not isinstance(self.do_sample, bool):  # do_sample="no" is truthy: it sampled
            raise NsLensError(f"do_sample must be True or False, got {self.do_sample!r}")
        for name, least in (("max_new_tokens", 1), ("top_k", 0), ("seed", 0)):
            object.__setattr__(self, name, int(check_number(name, getattr(self, name), least, integer=True)))
        if not check_number("temperature", self.temperature) > 0:  # inf sampled uniformly
            raise NsLensError(f"temperature must be > 0, got {self.temperature!r}")
        if not 0 < check_number("top_p", self.top_p) <= 1:
            raise NsLensError(f"top_p must be in (0, 1], got {self.top_p!r}")

    def generate_kwargs(self, tokenizer: Any) -> dict[str, Any]:
        """The keyword arguments for transformers' ``generate`` (every one explicit, so a checkpoint's own
        ``generation_config`` cannot silently switch greedy decoding to sampling)."""
        kw: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
                              "pad_token_id": tokenizer.pad_token_id, "num_beams": 1}
        if self.do_sample:
            kw.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:  # neutral values: transformers warns when sampling settings come with greedy decoding
            kw.update(temperature=None, top_p=None, top_k=None)
        return kw


@dataclass
class Continuation:
    """One prompt's clean and intervened continuations (decoded text and the new token ids)."""

    prompt: str
    clean: str
    intervened: str
    clean_ids: list[int] = field(repr=False)
    intervened_ids: list[int] = field(repr=False)

    @property
    def changed(self) -> bool:
        return self.clean_ids != self.intervened_ids

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "changed": self.changed}


def traced_generate(model: Any, site: Site | None, enc: dict[str, torch.Tensor], interventions: Any,
                    kwargs: dict[str, Any], remote: bool | str = False) -> torch.Tensor:
    """One batch's generated ids (prompt + new tokens) with ``interventions`` at every forward of the decode loop
    (``kwargs`` go to transformers' ``generate``). Also what lm-eval's generative requests run through
    (``nslens.lmadapter``).

    The open-ended ``tracer.all()`` loop edits the prompt's forward and then each new token's; it ends when
    generation does, leaving its last request (a step after the final token) parked by design, and nothing after
    it in the same invoke runs: hence the result is read in a second invoke. (No comments inside the trace body:
    the body shipped to a server is re-read without them, and a comment line there shifts the line numbers nnsight
    uses to find the nested ``with`` blocks.)"""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*was never reached", category=UserWarning)
        with model.generate(**kwargs, **trace_args(model, remote)) as tracer:
            with tracer.invoke(enc):
                if interventions is not None:
                    for _ in tracer.all():
                        apply_in_trace(model, site, interventions)
            with tracer.invoke():
                ids = tracer.result.save()
    return ids


def generate_ids(model: Any, site: Site, prompts: Sequence[str], *,
                 interventions: Intervention | Sequence[Intervention] | None = None,
                 settings: GenerationSettings | None = None, batch_size: int = 8,
                 remote: bool | str = False) -> list[list[int]]:
    """The new token ids per prompt (after the prompt, up to and including an end-of-sequence token; padding
    after it removed), generated with ``interventions`` applied at every step (``None``: the clean model)."""
    settings = settings or GenerationSettings()
    if not isinstance(settings, GenerationSettings):
        raise NsLensError(f"settings must be a GenerationSettings, got {type(settings).__name__}")
    prompts = list(prompts)
    if not prompts:
        raise NsLensError("no prompts to generate from")
    check_site(site, interventions)
    tok = model.tokenizer
    kwargs = settings.generate_kwargs(tok)
    eos = set([tok.eos_token_id] if isinstance(tok.eos_token_id, int) else tok.eos_token_id or [])
    out: list[list[int]] = []
    for sl in batches(len(prompts), batch_size):
        enc = tokenize(model, prompts[sl])
        if settings.do_sample:
            torch.manual_seed(settings.seed + sl.start)
        ids = maybe_retry(remote, lambda enc=enc: traced_generate(model, site, enc, interventions, kwargs, remote),
                          what="generate")
        new = ids[:, enc["input_ids"].shape[1]:].tolist()
        for row in new:
            cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            out.append(row[:cut])
    return out


def generate(model: Any, site: Site, prompts: Sequence[str] | str, *,
             interventions: Intervention | Sequence[Intervention] | None,
             settings: GenerationSettings | None = None, batch_size: int = 8,
             remote: bool | str = False) -> list[Continuation]:
    """Clean and intervened continuations of each prompt, side by side (same settings and seeds for both)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    clean = generate_ids(model, site, prompts, settings=settings, batch_size=batch_size, remote=remote)
    edited = generate_ids(model, site, prompts, interventions=interventions, settings=settings,
                          batch_size=batch_size, remote=remote)
    dec = model.tokenizer.decode
    return [Continuation(p, dec(c, skip_special_tokens=True), dec(e, skip_special_tokens=True), c, e)
            for p, c, e in zip(prompts, clean, edited, strict=True)]
