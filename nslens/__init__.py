"""nslens: range-based neuron interpretation and intervention in LLMs, on nnsight.

The module list reads as the data flow: models (load, site) -> data, nexttoken (concepts, prompts) -> record ->
stats -> rank -> ranges -> ops / intervene -> erasure -> report; ``pipeline`` runs it end to end (``config`` says
what, ``run`` owns the directory), ``cli`` wraps it.
"""

__version__ = "0.1.0"

import importlib  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402

# Public names, imported on first use (PEP 562): ``import nslens`` and ``nslens --help`` stay fast (torch, nnsight
# and transformers load when a name that needs them is first touched).
_EXPORTS = {
    "config": ("RunConfig",),
    "data": ("ConceptDataset", "FewShotPrompter", "label_token_ids", "load_dataset"),
    "erasure": ("ErasureTable", "erasure_table", "predict"),
    "errors": ("NsLensError",),
    "general": ("general_mean",),
    "intervene": ("Intervention", "applied", "apply_in_trace", "edit_hidden"),
    "models": ("Site", "load_model", "read_site", "resolve_site", "write_site"),
    "pipeline": ("run_pipeline",),
    "ops": ("Operator", "adaptive_dampen", "dampen", "make_operator", "mean_replace", "zero"),
    "ranges": ("RangeMask", "build_range_masks", "load_masks", "save_masks"),
    "rank": ("rank", "select_top"),
    "record": ("RecordResult", "record"),
    "run": ("RunResult",),
    "stats": ("ConceptStats",),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}


class _Package(types.ModuleType):
    """``record`` and ``rank`` name both a function and the module it lives in. Imported eagerly, the function
    won; lazily, importing the submodule would rebind the package attribute to the module, so that rebinding is
    ignored here (the module stays reachable as ``sys.modules["nslens.record"]``, as before)."""

    def __setattr__(self, name: str, value: object) -> None:
        if isinstance(value, types.ModuleType) and _HOME.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'nslens' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOME])


__all__ = [
    "ConceptDataset",
    "ConceptStats",
    "ErasureTable",
    "FewShotPrompter",
    "Intervention",
    "NsLensError",
    "Operator",
    "RangeMask",
    "RecordResult",
    "RunConfig",
    "RunResult",
    "Site",
    "__version__",
    "adaptive_dampen",
    "applied",
    "apply_in_trace",
    "build_range_masks",
    "dampen",
    "edit_hidden",
    "erasure_table",
    "general_mean",
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
    "run_pipeline",
    "save_masks",
    "select_top",
    "write_site",
    "zero",
]
