"""The lm-eval adapter: lm-eval's ``HFLM`` whose forward passes run *through nnsight traces* with an intervention
at the site (all positions), and a context that keeps lm-eval quiet while nslens reports progress itself.

HFLM calls the raw HF module, where an nnsight ``edit()`` would be silently ignored, so ``NsLensLM`` answers
lm-eval's requests inside ``model.trace`` (``nslens.loglik.LoglikSweep``: the log-likelihoods are computed in the
trace, two numbers per request leave it). lm-eval right-pads and sends no attention mask: the model is causal, so
padding at the end never reaches the positions whose logits lm-eval reads, with or without an edit (padding
columns are edited too, harmlessly). An edit of the last position alone (``positions="last"``) goes to each row's
own last token, not to the batch's last column, which is padding in every shorter row. The numbers are lm-eval's
own.

lm-eval is an optional extra (``pip install 'nslens[eval]'``), imported only when an adapter is built or a
quiet run starts.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from .errors import NsLensError
from .generate import traced_generate
from .intervene import Intervention, apply_in_trace
from .lmtasks import require_lm_eval
from .loglik import LoglikSweep
from .models import Site
from .remote import trace_args

__all__ = ["NsLensLM", "quiet_lm_eval", "traced_logits"]


def _lm_class() -> type:
    require_lm_eval()
    return _built_lm_class()


@functools.cache
def _built_lm_class() -> type:
    """The adapter class, defined and registered with lm-eval once per process (a class per call would register a
    new target under the same name every time)."""
    # optional extra [eval]: imported when the first adapter is built
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.utils import Collator
    from lm_eval.models.utils_hf import pad_and_concat, stop_sequences_criteria
    from lm_eval.utils import get_rolling_token_windows

    class NsLensLM(HFLM):
        """lm-eval's HFLM whose log-likelihoods are computed inside nnsight traces, under interventions.

        Requests are ordered, grouped, truncated, padded and batched exactly as HFLM does it; each batch then runs
        through ``LoglikSweep``, which computes the continuation log-likelihoods and greedy flags in the trace
        (two numbers per request leave it). With ``sweep``/``index`` several evaluations share one sweep: the
        first evaluation computes every intervention's answers, the others read theirs.
        """

        def __init__(self, model: Any, site: Site | None = None,
                     interventions: Intervention | Sequence[Intervention] | None = None,
                     remote: bool | str = False, batch_size: int = 8, *, sweep: LoglikSweep | None = None,
                     index: int = 0, softmax_dtype: Any = "float32", **kwargs: Any) -> None:
            if not hasattr(model, "_module") or getattr(model, "tokenizer", None) is None:  # an AttributeError
                raise NsLensError(f"NsLensLM takes a model loaded with nslens.load_model, got {type(model).__name__}")
            if interventions is not None and site is None:
                raise NsLensError("an intervention needs its site")
            hf = model._module
            device = str(next(hf.parameters()).device) if any(True for _ in hf.parameters()) else "cpu"
            super().__init__(pretrained=hf, tokenizer=model.tokenizer, batch_size=batch_size, device=device,
                             softmax_dtype=softmax_dtype, **kwargs)
            if self._device.type == "meta":  # a remote (NDIF) model has no local weights: inputs stay on the CPU
                self._device = torch.device("cpu")
            if sweep is None:
                sweep = LoglikSweep(model, site, [interventions], remote=remote)
            elif not 0 <= index < len(sweep.interventions):
                raise NsLensError(f"index {index} outside the sweep's {len(sweep.interventions)} interventions")
            self.nn_model, self.sweep, self.index = model, sweep, index
            self.site, self.interventions, self.remote = sweep.site, sweep.interventions[index], sweep.remote
            self.progress: Callable[[int, int], None] | None = None  # (requests answered, requests expected)
            self._done = self._expected = 0
            self._rolling = False  # inside loglikelihood_rolling: the windows' is-greedy flags are discarded

        def _expect(self, n: int) -> None:
            self._expected += n
            if self.progress is not None:
                self.progress(self._done, self._expected)

        def _advance(self, n: int) -> None:
            self._done += n
            if self.progress is not None:
                self.progress(self._done, self._expected)

        def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None,
                        labels: torch.Tensor | None = None) -> torch.Tensor:
            """Full logits through a trace (only lm-eval's batch-size detection still asks for them)."""
            return traced_logits(self.nn_model, self.site, self.interventions, inps, self.remote)

        def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str],
                            **generation_kwargs: Any) -> torch.Tensor:
            """lm-eval's generative requests (``generate_until``): HFLM's own generation settings, run through one
            ``model.generate`` trace with the intervention at every forward of the decode loop
            (``nslens.generate.traced_generate``), so every generated token comes from the edited model.

            On a real remote server lm-eval's stop-sequence criteria (lm-eval code the server lacks) are left out:
            generation then runs to ``max_length`` or the end-of-sequence token, and ``generate_until`` cuts the
            text at the first stop sequence itself, so the answers are the same."""
            generation_kwargs["temperature"] = generation_kwargs.get("temperature", 0.0)
            do_sample = generation_kwargs.get("do_sample")
            if (temp := generation_kwargs.get("temperature")) == 0.0 and do_sample is None:
                generation_kwargs["do_sample"] = do_sample = False
            if do_sample is False and temp == 0.0:
                generation_kwargs.pop("temperature", None)
            attention_mask = generation_kwargs.pop("attention_mask", None)
            enc = {"input_ids": context}
            if attention_mask is not None:
                enc["attention_mask"] = attention_mask
            kwargs = {"max_length": max_length, "pad_token_id": self.tokenizer.pad_token_id, "use_cache": True,
                      **generation_kwargs}
            if self.remote is not True:
                kwargs["stopping_criteria"] = stop_sequences_criteria(self.tokenizer, stop, context.shape[1],
                                                                      context.shape[0])
            out = traced_generate(self.nn_model, self.site, enc, self.interventions, kwargs, self.remote)
            self._advance(int(context.shape[0]))
            return out

        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
            self._expect(len(requests))
            return super().generate_until(requests, disable_tqdm=True)

        def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            self._expect(len(requests))
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
            if self.progress is not None:  # progress counts the rolling windows lm-eval will ask for
                self._expect(sum(sum(1 for _ in get_rolling_token_windows(
                    token_list=self.tok_encode(r.args[0]), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)) for r in requests))
            self._rolling = True  # HFLM sums the windows' log-likelihoods and discards their is-greedy flags
            try:
                return super().loglikelihood_rolling(requests, disable_tqdm=True)
            finally:
                self._rolling = False

        def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False,
                                  override_bs: int | None = None) -> list[tuple[float, bool | None]]:
            keys = [(tuple(r[1]), tuple(r[2])) for r in requests]
            known = self.sweep.answers
            greedy = not self._rolling  # a perplexity window's flag is never read: no argmax over the vocabulary
            if all(k in known and (not greedy or known[k][0][1] is not None) for k in keys):
                return [known[k][self.index] for k in keys]

            # ordering, one-token-continuation grouping and batching exactly as HFLM._loglikelihood_tokens
            def collate(req: tuple) -> tuple:
                toks = req[1] + req[2]
                return -len(toks), tuple(toks)

            re_ord = Collator(requests, sort_fn=collate,
                              group_by="contexts" if self.backend == "causal" and self.logits_cache else None,
                              group_fn=lambda req: req[-2] + req[-1][:-1])
            batch_size = self.batch_size if self.batch_size != "auto" else override_bs or 0
            batch_fn = (self._batch_scheduler if self.batch_size == "auto" and len(re_ord) > 0 and not override_bs
                        else None)
            placeholder = torch.empty(1, 1, 1)
            res: list[list[tuple[float, bool]]] = []
            for chunk in re_ord.get_batched(n=batch_size, batch_fn=batch_fn):
                inps, rows = [], []
                for req_str, ctx, cont in chunk:
                    if not ctx or not cont or len(cont) > self.max_length:
                        raise NsLensError(f"lm-eval request with {len(ctx)} context and {len(cont)} continuation "
                                         f"tokens (max length {self.max_length})")
                    inp = torch.tensor((ctx + cont)[-(self.max_length + 1):][:-1], dtype=torch.long,
                                       device=self.device)
                    members = [c for _, c, _ in re_ord.get_cache(req_str=req_str, cxt_toks=ctx, cont_toks=cont,
                                                                  logits=placeholder)]
                    inps.append(inp)
                    rows.append((len(inp), len(cont), members))
                batched = pad_and_concat(max(len(x) for x in inps), inps, padding_side="right")
                res.extend(self.sweep.answer(batched, rows, self.softmax_dtype, greedy))
                self._advance(sum(len(r[2]) for r in rows))
            ordered = re_ord.get_original(res)
            for k, a in zip(keys, ordered):
                if greedy or k not in known:  # never replace an answer that has its flags by one without
                    known[k] = a
            return [a[self.index] for a in ordered]

    try:
        register_model("nslens")(NsLensLM)
    except (AssertionError, ValueError) as e:  # the name holds another package's model
        raise NsLensError(f"lm-eval already has a model named 'nslens' that is not nslens's adapter: {e}") from None
    return NsLensLM


def traced_logits(model: Any, site: Site | None, interventions: Any, input_ids: torch.Tensor,
                  remote: bool | str = False) -> torch.Tensor:
    """Logits of one lm-eval batch through an nnsight trace, with the interventions applied at the site.

    Module-level (not a method) so the trace captures only the model, site, interventions and inputs: that is
    what ships to NDIF, never the lm-eval object."""
    with torch.no_grad():
        with model.trace({"input_ids": input_ids}, **trace_args(model, remote)):
            if interventions is not None:
                apply_in_trace(model, site, interventions)
            logits = model.output.logits.save()
    return logits


def NsLensLM(*args: Any, **kwargs: Any) -> Any:  # noqa: N802 - a class factory that reads like the class
    """Build the lm-eval adapter (see the module docstring); lm-eval is imported only when it is needed."""
    return _lm_class()(*args, **kwargs)


@functools.lru_cache(maxsize=8)
def _git_hash_in(cwd: str) -> str | None:
    try:
        out = subprocess.run(["git", "describe", "--always"], cwd=cwd, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):  # no git on the machine, or it hangs
        return None
    if out.returncode != 0:  # not a git checkout: lm-eval's own fallback then finds no commit either
        return None
    return out.stdout.decode().strip() or None


def _quiet_git_hash() -> str | None:
    """lm-eval's ``get_git_commit_hash`` (the working directory's commit, or None), once per directory and
    without git's stderr."""
    return _git_hash_in(os.getcwd())


@contextlib.contextmanager
def quiet_lm_eval() -> Iterator[None]:
    """Silence lm-eval while it runs under nslens's own progress: its loggers (and datasets') at ERROR, its tqdm
    bars and datasets' progress bars off.

    A side-effect table runs 2C + 1 evaluations, so two fixed costs of each are removed (results unchanged):
    ``add_env_info``, which shells out to pip for environment metadata that nslens discards (0.25 s each), and
    the compilation of every Jinja prompt template for every document (``apply_template``; compiled templates
    are cached per template string instead). The results' ``git_hash`` is asked of git once, with its stderr
    dropped: outside a git checkout each evaluation printed git's "fatal: not a git repository" to the terminal.
    Everything is restored afterwards."""
    # lm-eval is the optional extra [eval]; datasets is heavy, tqdm comes with lm-eval
    import datasets.utils.logging as ds_logging
    import lm_eval.evaluator as lm_evaluator
    import lm_eval.utils as lm_utils
    import tqdm as tqdm_mod

    compiled = functools.lru_cache(maxsize=1024)(lm_utils.env.from_string)

    def apply_template(template: str, doc: dict) -> str:
        return compiled(template).render(**doc)

    def silent_tqdm(*args: Any, **kwargs: Any) -> Any:
        kwargs["disable"] = True
        return tqdm_mod.tqdm(*args, **kwargs)

    patched = [(m, m.tqdm) for name, m in list(sys.modules.items())
               if name.startswith("lm_eval") and getattr(m, "tqdm", None) is tqdm_mod.tqdm]
    loggers = [logging.getLogger(n) for n in ("lm_eval", "datasets", "transformers", "evaluate")]
    levels = [lg.level for lg in loggers]
    bars_on = ds_logging.is_progress_bar_enabled()
    env_info, template, git_hash = lm_evaluator.add_env_info, lm_utils.apply_template, lm_evaluator.get_git_commit_hash
    try:
        lm_evaluator.add_env_info = lambda results: None
        lm_evaluator.get_git_commit_hash = _quiet_git_hash
        lm_utils.apply_template = apply_template
        for m, _ in patched:
            m.tqdm = silent_tqdm
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        if bars_on:
            ds_logging.disable_progress_bar()
        yield
    finally:
        lm_evaluator.add_env_info, lm_utils.apply_template = env_info, template
        lm_evaluator.get_git_commit_hash = git_hash
        for m, orig in patched:
            m.tqdm = orig
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)
        if bars_on:
            ds_logging.enable_progress_bar()
