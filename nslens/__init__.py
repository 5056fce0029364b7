"""nslens: range-based neuron interpretation and intervention in LLMs, on nnsight.

The module list reads as the data flow: models (load, site) -> data, nexttoken (concepts, prompts) -> record ->
stats -> rank -> ranges -> ops / intervene -> erasure -> report; ``pipeline`` runs it end to end, ``cli`` wraps it.
"""

__version__ = "0.1.0"

from .data import ConceptDataset, FewShotPrompter, label_token_ids, load_dataset  # noqa: E402
from .erasure import ErasureTable, erasure_table, predict  # noqa: E402
from .intervene import Intervention, applied, apply_in_trace, edit_hidden  # noqa: E402
from .models import Site, load_model, read_site, resolve_site, write_site  # noqa: E402
from .ops import Operator, adaptive_dampen, dampen, make_operator, mean_replace, zero  # noqa: E402
from .ranges import RangeMask, build_range_masks, load_masks  # noqa: E402
from .rank import rank, select_top  # noqa: E402
from .record import RecordResult, record  # noqa: E402
from .stats import ConceptStats  # noqa: E402

__all__ = [
    "ConceptDataset",
    "ConceptStats",
    "ErasureTable",
    "FewShotPrompter",
    "Intervention",
    "Operator",
    "RangeMask",
    "RecordResult",
    "Site",
    "__version__",
    "adaptive_dampen",
    "applied",
    "apply_in_trace",
    "build_range_masks",
    "dampen",
    "edit_hidden",
    "erasure_table",
    "label_token_ids",
    "load_dataset",
    "load_masks",
    "load_model",
    "make_operator",
    "mean_replace",
    "predict",
    "rank",
    "read_site",
    "record",
    "resolve_site",
    "select_top",
    "write_site",
    "zero",
]
