"""The embedded default model: a tiny Llama trained on the synthetic task once per machine, checked, cached.

Why training runs in a child process with pinned numerics: float sums depend on the thread count (how a reduction
is split) and on the CPU's vector kernels (AVX2 vs AVX-512 change the order of additions), and 900 steps of AdamW
amplify a last-bit difference into a visibly different model. The child fixes what torch lets one fix before it is
imported: ``TRAIN_THREADS`` threads, ATen's CPU kernels and oneDNN capped at AVX2, MKL's conditional numerical
reproducibility (``MKL_CBWR=AVX2,STRICT``), a seeded generator and ``torch.use_deterministic_algorithms``. On
x86-64 machines with AVX2 the trained weights are then the same bit for bit (checked: repeated trainings and
trainings under different ambient thread counts give identical weights). What still varies: another torch build
or BLAS (a different torch version, an aarch64 machine with its own kernels) trains a different model; so
nothing in the tests may depend on one training's exact samples.

A trained model is *checked, not assumed*: the child measures its clean accuracy on held-out few-shot prompts of
its own task and on each next-token family, and a model below ``FLOORS`` is never cached; the build fails with
one line instead of a confusing "too few samples" three steps later. The measured accuracies are kept in
``nslens_embedded.json``.

``NSLENS_EMBEDDED_SEED`` (default 0) trains with another seed for the data order and initialisation, into its
own cache directory: the way to see what another training would do to the numbers (``make test`` passes for any
seed whose model is above the floors).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .concepts import FewShotPrompter
from .errors import NsLensError
from .files import file_lock, nslens_home
from .nexttoken import next_token_dataset, target_token_ids
from .synthetic import (
    EMBEDDED_VERSION,
    SYNTHETIC_LABELS,
    build_tokenizer,
    synthetic_concepts,
    synthetic_corpus,
    synthetic_text,
)

__all__ = ["FLOORS", "TRAIN_THREADS", "build_embedded_model", "check_embedded", "embedded_model_dir",
           "embedded_seed", "training_env"]

logger = logging.getLogger(__name__)

#: threads while training: the same on every machine (2 = the cores of the smallest machine it is built on)
TRAIN_THREADS = 2
#: the least clean accuracy of every concept (classification) and of every next-token concept a cached model has
FLOORS = {"classification": 0.75, "next_token": 0.6}
#: held-out evaluation data: seeds never used by training (which draws from random.Random(seed))
_CHECK_SEED = 777_001
_CHECK_PER_CONCEPT = 60
_FAMILIES = ("pronouns", "pronoun_pairs", "punctuation", "delimiters", "agreement")


def embedded_seed() -> int:
    """The training seed: ``$NSLENS_EMBEDDED_SEED`` or 0."""
    raw = os.environ.get("NSLENS_EMBEDDED_SEED", "0")
    try:
        return int(raw)
    except ValueError:
        raise NsLensError(f"NSLENS_EMBEDDED_SEED must be an integer, got {raw!r}") from None


def embedded_model_dir(seed: int | None = None) -> Path:
    """Where the embedded model is cached: ``$NSLENS_HOME/embedded-<version>`` (default ``~/.cache/nslens``), with
    ``-seed<N>`` for a training seed other than 0."""
    seed = embedded_seed() if seed is None else seed
    return nslens_home() / (f"embedded-{EMBEDDED_VERSION}" + (f"-seed{seed}" if seed else ""))


def training_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The child's environment: ``base`` (default ``os.environ``) with the thread count and CPU kernels pinned."""
    env = dict(os.environ if base is None else base)
    threads = str(TRAIN_THREADS)
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    if platform.machine().lower() in ("x86_64", "amd64"):
        env.update(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2", MKL_CBWR="AVX2,STRICT")
    return env


def build_embedded_model(
    out_dir: str | Path | None = None,
    *,
    steps: int = 900,
    seed: int | None = None,
    check: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Train the tiny Llama on the synthetic task and save it (model + tokenizer) to ``out_dir``.

    Training runs in a child process under ``training_env()`` (see the module docstring). The model is written to
    a temporary directory and renamed into place only after it passed ``check_embedded`` (``check=False`` skips
    the floors, for short test builds), so an interrupted or failed build leaves nothing behind. Processes sharing
    ``NSLENS_HOME`` train it once: a file lock serialises the builds, and a process that waited finds the
    finished model. Without ``progress`` the training is announced and its progress logged (WARNING), so every
    entry point says what the first minute is spent on.
    """
    seed = embedded_seed() if seed is None else seed
    out = Path(out_dir) if out_dir is not None else embedded_model_dir(seed)
    if (out / "config.json").exists():
        return out
    with file_lock(out.parent / f".{out.name}.lock"):
        if (out / "config.json").exists():  # built by another process while this one waited
            return out
        if progress is None:
            logger.warning("training the embedded model (once, 1-3 minutes on 2 cores; cached in %s)", out)

            def progress(done: int, total: int) -> None:
                if done % max(1, total // 10) == 0 or done == total:
                    logger.warning("training the embedded model: %d/%d steps", done, total)
        tmp = Path(tempfile.mkdtemp(prefix=".embedded-", dir=out.parent))
        try:
            _train_in_child(tmp, steps, seed, check, progress)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _train_in_child(tmp: Path, steps: int, seed: int, check: bool, progress: Callable[[int, int], None]) -> None:
    """Run ``python -m nslens.embedded`` and relay its progress lines; its last line is the result."""
    cmd = [sys.executable, "-m", "nslens.embedded", str(tmp), str(steps), str(seed), "1" if check else "0"]
    proc = subprocess.Popen(cmd, env=training_env(), stdout=subprocess.PIPE, text=True)
    result: dict[str, Any] = {}
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:  # something else wrote to the child's stdout: pass it on
                sys.stderr.write(line)
                continue
            if "step" in msg:
                progress(msg["step"], msg["total"])
            else:
                result = msg
    except BaseException:  # Ctrl-C or an error here: the child must not outlive the build
        proc.kill()
        raise
    finally:
        proc.wait()
    if "error" in result:
        raise NsLensError(result["error"])
    if proc.returncode != 0 or not result.get("ok"):
        raise RuntimeError(f"training the embedded model failed (exit {proc.returncode}); its error is above")


# --------------------------------------------------------------------------------------------- the child


def _training_batch(rng: random.Random, tok, batch: int, k_max: int = 1, n_plain: int = 12):
    """``batch`` few-shot prompts ending in their label, plus ``n_plain`` rows of running synthetic text after an
    end-of-text token (how lm-eval's perplexity tasks present a document)."""
    import torch  # heavy: only the training child and the check use it; the parent only locates the cache

    prompts, labels = [], []
    for line in synthetic_corpus(n_plain, seed=rng.randrange(2**31)):
        prompts.append(f"{tok.eos_token} {line}")
        labels.append(-1)
    for _ in range(batch):
        demos = []
        for c in range(len(SYNTHETIC_LABELS)):
            demos += [(synthetic_text(c, rng), c) for _ in range(rng.randint(0, k_max))]
        rng.shuffle(demos)
        p = FewShotPrompter(list(SYNTHETIC_LABELS), demos)
        c = rng.randrange(len(SYNTHETIC_LABELS))
        prompts.append(p(synthetic_text(c, rng)) + " " + SYNTHETIC_LABELS[c])
        labels.append(c)
    enc = tok(prompts, return_tensors="pt", padding=True)
    ids, att = enc["input_ids"], enc["attention_mask"]
    targets = ids.clone()
    targets[att == 0] = -100
    return ids, att, targets, torch.tensor(labels)


def _train(steps: int, seed: int, progress: Callable[[int, int], None]):  # -> (LlamaForCausalLM, tokenizer)
    import torch  # heavy, as above (the training child)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(TRAIN_THREADS)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = build_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=512, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    label_ids = torch.tensor(tok.convert_tokens_to_ids(SYNTHETIC_LABELS))
    for step in range(steps):
        ids, att, targets, y = _training_batch(rng, tok, batch=24)
        logits = model(input_ids=ids, attention_mask=att).logits
        lm = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                               targets[:, 1:].reshape(-1), ignore_index=-100)
        # the label is the last token; its prediction comes from position -2
        is_prompt = y >= 0
        cls = torch.nn.functional.cross_entropy(logits[is_prompt, -2], label_ids[y[is_prompt]])
        loss = lm + cls
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        progress(step + 1, steps)
    return model.eval(), tok


def _greedy_correct(model: Any, tok: Any, prompts: list[str], gold: np.ndarray) -> np.ndarray:
    """Plain-torch greedy next token at the last position (left padding, positions from each row's first token)."""
    import torch  # heavy, as above (the check)

    out = []
    for i in range(0, len(prompts), 64):
        enc = tok(prompts[i:i + 64], return_tensors="pt", padding=True)
        pos = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            out.append(model(**enc, position_ids=pos).logits[:, -1].argmax(-1).numpy())
    return np.concatenate(out) == gold


def check_embedded(model: Any, tok: Any) -> dict[str, dict[str, float]]:
    """Clean accuracy per concept on held-out data: the few-shot classification task (the pipeline's prompt,
    one demonstration per class) and each next-token family on held-out synthetic text. ``model`` is the raw HF
    model, ``tok`` its tokenizer (padding on the left)."""
    tok.padding_side = "left"
    ds = synthetic_concepts(2 * _CHECK_PER_CONCEPT, seed=_CHECK_SEED)
    demos, queries = ds.split(0.5, seed=0)
    prompter = FewShotPrompter.from_dataset(demos, k=1, seed=0)
    gold = np.asarray(tok.convert_tokens_to_ids(SYNTHETIC_LABELS))[queries.labels]
    ok = _greedy_correct(model, tok, prompter.prompts(queries.texts), gold)
    acc = {"classification": {n: float(ok[queries.labels == c].mean()) for c, n in enumerate(queries.label_names)}}
    for family in _FAMILIES:
        nt = next_token_dataset(f"next:{family}:synthetic", n_per_concept=_CHECK_PER_CONCEPT, seed=_CHECK_SEED)
        g, usable = target_token_ids(tok, nt.texts, nt.targets or [])
        idx = np.flatnonzero(usable)
        ok = _greedy_correct(model, tok, [nt.texts[i] for i in idx], g[idx])
        labels = nt.labels[idx]
        acc[family] = {n: float(ok[labels == c].mean()) if (labels == c).any() else 0.0
                       for c, n in enumerate(nt.label_names)}
    return acc


def below_floors(acc: dict[str, dict[str, float]]) -> list[str]:
    """``family/concept (accuracy < floor)`` for every concept under its floor."""
    bad = []
    for family, per in acc.items():
        floor = FLOORS["classification" if family == "classification" else "next_token"]
        bad += [f"{family}/{c} ({a:.2f} < {floor})" for c, a in per.items() if a < floor]
    return bad


def _child(out: Path, steps: int, seed: int, check: bool) -> int:
    def emit(msg: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(msg) + "\n")
        sys.stdout.flush()

    from transformers.utils import logging as hf_logging  # heavy, as above (the training child)

    hf_logging.disable_progress_bar()  # the parent reports progress; no tqdm bars of the child's own
    model, tok = _train(steps, seed, lambda d, t: emit({"step": d, "total": t}))
    acc = check_embedded(model, tok) if check else {}
    bad = below_floors(acc)
    if bad:
        emit({"error": f"the embedded model trained here (seed {seed}) is below its accuracy floor: "
                       + ", ".join(bad) + "; it was not cached (try NSLENS_EMBEDDED_SEED=1, and please report it)"})
        return 3
    model.save_pretrained(out)
    tok.save_pretrained(out)
    import torch  # heavy, as above (the training child)

    (out / "nslens_embedded.json").write_text(json.dumps(
        {"version": EMBEDDED_VERSION, "steps": steps, "seed": seed, "labels": SYNTHETIC_LABELS,
         "train_threads": TRAIN_THREADS, "torch": torch.__version__, "cpu_capability":
         torch.backends.cpu.get_cpu_capability(), "clean_accuracy": acc, "floors": FLOORS}, indent=2))
    emit({"ok": True})
    return 0


if __name__ == "__main__":  # the training child (see build_embedded_model)
    sys.exit(_child(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"))
