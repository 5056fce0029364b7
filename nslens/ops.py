"""Intervention operators phi: small pure-tensor functions of the selected neurons' activations.

Each operator is one frozen dataclass (picklable, so it ships to NDIF with the trace) derived from ``Operator``.
It is called as ``op(x, mu, sigma, tau, neurons)`` with ``x`` the activations of the selected neurons ``[..., k]``,
the mask's per-neuron ``mu``/``sigma`` ``[k]`` and the selected neurons' indices ``[k]``; it returns phi(x) with
x's shape. Gating (apply only inside [lo, hi]) is not the operator's business: see ``nslens.intervene``.

- ``Zero`` (``zero``): phi(x) = 0 (the paper's concept erasure).
- ``Dampen`` (``dampen``): phi(x) = alpha * x (Suau et al. 2024; alpha = 0.125 in the paper).
- ``MeanReplace`` (``mean``): phi(x) = the neuron's mean over general text (paper App. G.2, Tables 13-15;
  ``nslens.general``), given for the whole site (``site_values``, ``[d_model]``) so one operator serves every
  concept's mask; or given values, one per selected neuron.
- ``MeanConcept`` (``mean_concept``): phi(x) = mu, the mask's concept mean (the concept's most typical value).
- ``Steer`` (``steer``): phi(x) = x + a * r, r a whole-site steering vector (difference-in-means, App. M; a = -2 in
  the paper); range-gated ("range-based steering", App. M.2) it adds a * r_j only to components in the range.
- ``Ablate`` (``ablate``): phi(x) = x - (x . r_hat) r_hat, directional ablation (Arditi et al.; App. M.1) of the
  unit direction r_hat restricted to the selected neurons (all of them, for a full-width mask).
- ``Adaptive`` (``adaptive``): phi(x) = a(x) * x with a(x) = beta * |x - mu| / (tau * sigma) (paper Appendix G):
  full suppression at mu, dampening by beta at the range's edges, a = 0 where tau * sigma = 0. Ungated, a(x) is
  capped at beta (values outside the range are never amplified); inside the range the cap never binds.
- ``Leace`` (``leace``, in ``nslens.leace``): LEACE, one eraser per concept fitted on the training split.

``OPERATOR_REGISTRY`` maps each name to its class; ``make_operator`` builds one by name through the class's
``from_options``, and ``register_operator`` adds a class of one's own (``docs/extending.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .errors import NsLensError, check_number
from .registry import Names, Registry

__all__ = ["FITTED_OPERATORS", "OPERATORS", "OPERATOR_FITTERS", "OPERATOR_REGISTRY", "VECTOR_OPERATORS", "Ablate",
           "Adaptive", "Dampen", "MeanConcept", "MeanReplace", "Operator", "Steer", "Zero", "ablate_direction",
           "adaptive_dampen", "dampen", "get_operator", "make_operator", "mean_replace", "register_operator", "steer",
           "zero"]


@dataclass(frozen=True)
class Operator:
    """phi with its parameters: the base of every operator.

    A subclass is a frozen dataclass (its fields are its parameters: they are hashed into the intervention's
    fingerprint and pickled with the trace) that sets ``name``, implements ``__call__`` with plain torch (it runs
    inside the trace, locally or on NDIF) and, where it has parameters, ``label``/``describe`` and checks in
    ``__post_init__``. ``build`` says how a run gets one: ``"options"`` (``from_options``, by name from a config or
    the CLI), ``"fitted"`` (fitted per concept on the training split) or ``"vector"`` (from a per-concept steering
    vector)."""

    name: ClassVar[str] = ""
    build: ClassVar[str] = "options"
    #: the shared options (``alpha``, ``beta``) that ``from_options`` builds it from, checked by ``check_options``
    options: ClassVar[tuple[str, ...]] = ()
    values: ClassVar[torch.Tensor | None] = None
    """Replacement values, one per selected neuron (only ``MeanReplace`` sets them)."""
    site_values: ClassVar[torch.Tensor | None] = None
    """Values for every neuron of the site ``[d_model]`` (a general-text mean, a steering vector or direction)."""

    def __call__(self, x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, tau: float,
                 neurons: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not implement __call__")

    @property
    def label(self) -> str:
        """The short name tables and reports print (``dampen(a=0.125)``)."""
        return self.name

    def describe(self) -> dict[str, Any]:
        """The operator's name and parameters, as written into a run's JSON."""
        return {"name": self.name}

    def check(self, mask: Any, sae: Any = None) -> None:
        """Refuse a mask this operator cannot edit (called by ``Intervention``); the base accepts any."""

    @classmethod
    def from_options(cls, *, alpha: float = 0.125, beta: float = 0.5, general_mean: torch.Tensor | None = None,
                     **options: Any) -> Operator:
        """The operator a run or the CLI asks for by name, from the shared options (``--alpha``, ``--beta``, the
        site's general-text mean). The base builds the class without parameters."""
        return cls()

    @classmethod
    def check_options(cls, **options: Any) -> None:
        """Refuse the shared options this class is built from (``options``), as ``__post_init__`` would, before the
        model loads (``RunConfig.validate``)."""
        if cls.options:
            cls(**{k: options[k] for k in cls.options})

    @classmethod
    def from_vector(cls, vector: torch.Tensor, *, alpha: float = -2.0) -> Operator:
        """A vector operator (``build == "vector"``) from one concept's steering vector ``[d_model]`` (``alpha``:
        the steering strength, for the operators that take one): how ``nslens.steering`` builds them by name."""
        raise NsLensError(f"the {cls.name} operator is not built from a steering vector (its build is {cls.build!r})")


def _site_rows(op: Operator, x: torch.Tensor, neurons: torch.Tensor | None) -> torch.Tensor:
    """The site-wide values of the selected neurons, on x's device and dtype."""
    if op.site_values is None or neurons is None:
        raise NsLensError(f"{op.name} needs its site-wide vector and the selected neurons' indices")
    return op.site_values.to(device=x.device, dtype=x.dtype)[neurons.to(x.device)]


def _check_site_width(op: Operator, mask: Any, sae: Any) -> None:
    """A site-wide vector must match the mask's site and cannot edit SAE features."""
    site_values = op.site_values
    if site_values is None:
        return
    if sae is not None:
        raise NsLensError(f"{op.name} works on the site's neurons, not SAE features "
                          "(for mean replacement of features use mean_concept)")
    d = mask.meta.get("d_model")
    if (d is not None and site_values.numel() != d) or int(mask.neurons.max()) >= site_values.numel():
        raise NsLensError(f"{op.name} has {site_values.numel()} site values for a mask over "
                          f"{d if d is not None else 'more'} neurons")


@dataclass(frozen=True)
class Zero(Operator):
    """phi(x) = 0: the paper's concept erasure."""

    name: ClassVar[str] = "zero"

    def __call__(self, x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, tau: float,
                 neurons: torch.Tensor | None = None) -> torch.Tensor:
        return torch.zeros_like(x)


@dataclass(frozen=True)
class Dampen(Operator):
    """phi(x) = alpha * x (Suau et al. 2024; the paper's alpha is 0.125)."""

    name: ClassVar[str] = "dampen"
    options: ClassVar[tuple[str, ...]] = ("alpha",)
    alpha: float = 0.125

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", check_number("dampening factor alpha", self.alpha, 0.0, 1.0))

    def __call__(self, x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, tau: float,
                 neurons: torch.Tensor | None = None) -> torch.Tensor:
        return x * self.alpha

    @property
    def label(self) -> str:
        return f"dampen(a={self.alpha:g})"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "alpha": self.alpha}

    @classmethod
    def from_options(cls, *, alpha: float = 0.125, **options: Any) -> Operator:
        return cls(alpha)


def _replacement(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(device=x.device, dtype=x.dtype).expand_as(x).clone()


@dataclass(frozen=True)
class MeanReplace(Operator):
    """Replace by a fixed value per neuron: ``site_values`` (one per neuron of the site: the general-text mean,
    ``nslens.general_mean``; paper App. G.2) or ``values`` (one per selected neuron), exactly one of them."""

    name: ClassVar[str] = "mean"
    values: torch.Tensor | None = None  # type: ignore[misc]
    site_values: torch.Tensor | None = None  # type: ignore[misc]

    def __post_init__(self) -> None:
        if self.values is not None and self.site_values is not None:
            raise NsLensError("give values (per selected neuron) or site_values (per site neuron), not both")
        if self.values is None and self.site_values is None:
            raise NsLensError("mean replacement needs values (per selected neuron) or site_values (per site "
                              "neuron); MeanConcept replaces by the concept mean mu")
        if self.site_values is not None:
            object.__setattr__(self, "site_values", _site_vector(self.site_values, "mean replacement vector (site_values)"))
        if self.values is not None:  # NaN values ran and read as a perfect erasure (NaN logits)
            object.__setattr__(self, "values", _site_vector(self.values, "mean replacement vector (values)"))

    def __call__(self, x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, tau: float,
                 neurons: torch.Tensor | None = None) -> torch.Tensor:
        if self.site_values is not None:
            if neurons is None:
                raise NsLensError("site-wide replacement values need the selected neurons' indices")
            return _replacement(self.site_values.to(x.device)[neurons.to(x.device)], x)
        return _replacement(self.values, x)

    @property
    def label(self) -> str:
        return "mean"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "values": "general-text mean" if self.site_values is not None else "given"}

    def check(self, mask: Any, sae: Any = None) -> None:
        if self.values is not None and self.values.numel() != len(mask):
            raise NsLensError(f"mean replacement has {self.values.numel()} values for {len(mask)} selected neurons")
        _check_site_width(self, mask, sae)

    @classmethod
    def from_options(cls, *, general_mean: torch.Tensor | None = None, **options: Any) -> Operator:
        if general_mean is None:
            raise NsLensError("the mean operator replaces with the general-text mean: pass general_mean= "
                              "(nslens.general_mean(model, site)), or use mean_concept for the concept mean")
        return cls(site_values=general_mean)


@dataclass(frozen=True)
class MeanConcept(Operator):
    """phi(x) = mu, the mask's concept mean: pulls the concept to its most typical value (works on SAE features
    too, since mu is the mask's own)."""

    name: ClassVar[str] = "mean_concept"

    def __call__(self, x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, tau: float,
                 neurons: torch.Tensor | None = None) -> torch.Tensor:
        return _replacement(mu, x)

    @property
    def label(self) -> str:
        return "mean(mu)"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "values": "mu"}


@dataclass(frozen=True)
class Adaptive(Operator):
    """phi(x) = a(x) * x, a(x) = beta * |x - mu| / (tau * sigma) capped at beta (paper Appendix G): full
    suppression at mu, dampening by beta at the range's edges, a = 0 where tau * sigma = 0."""

    name: ClassVar[str] = "adaptive"
    options: ClassVar[tuple[str, ...]] = ("beta",)
    beta: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "beta", check_number("adaptive dampening beta", self.beta, 0.0, 1.0))

    def __call__(self, x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, tau: float,
                 neurons: torch.Tensor | None = None) -> torch.Tensor:
        denom = tau * sigma.to(device=x.device, dtype=x.dtype)
        dist = (x - mu.to(device=x.device, dtype=x.dtype)).abs()
        a = torch.where(denom > 0, self.beta * dist / denom.clamp(min=torch.finfo(x.dtype).tiny),
                        torch.zeros_like(x))
        return a.clamp(max=self.beta) * x

    @property
    def label(self) -> str:
        return f"adaptive(b={self.beta:g})"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "beta": self.beta}

    @classmethod
    def from_options(cls, *, beta: float = 0.5, **options: Any) -> Operator:
        return cls(beta)


def _site_vector(vector: Any, what: str) -> torch.Tensor:
    try:
        v = torch.as_tensor(vector, dtype=torch.float32).flatten()
    except (TypeError, ValueError, RuntimeError) as e:
        raise NsLensError(f"the {what} must be numbers (a tensor or array), got {type(vector).__name__}") from e
    if not torch.isfinite(v).all():
        raise NsLensError(f"the {what} has NaN/inf values")
    return v


@dataclass(frozen=True)
class Steer(Operator):
    """phi(x) = x + alpha * r_j with ``vector`` r given for every neuron of the site: difference-in-means steering
    (paper App. M: alpha = -2, r = the target concept's mean minus the others', ``nslens.steering``)."""

    name: ClassVar[str] = "steer"
    build: ClassVar[str] = "vector"
    vector: torch.Tensor
    alpha: float = -2.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "vector", _site_vector(self.vector, "steering vector"))
        object.__setattr__(self, "alpha", check_number("steering alpha", self.alpha))

    @classmethod
    def from_vector(cls, vector: torch.Tensor, *, alpha: float = -2.0) -> Steer:
        return cls(vector, alpha)

    @property
    def site_values(self) -> torch.Tensor | None:  # type: ignore[override]
        return self.vector

    def __call__(self, x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, tau: float,
                 neurons: torch.Tensor | None = None) -> torch.Tensor:
        return x + self.alpha * _site_rows(self, x, neurons)

    @property
    def label(self) -> str:
        return f"steer(a={self.alpha:g})"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "alpha": self.alpha}

    def check(self, mask: Any, sae: Any = None) -> None:
        _check_site_width(self, mask, sae)


def _unit(vector: Any) -> torch.Tensor:
    v = torch.as_tensor(vector, dtype=torch.float32).flatten()
    norm = float(v.norm())
    if not norm > 0 or not torch.isfinite(v).all():
        raise NsLensError("directional ablation needs a finite, non-zero direction")
    return v / norm


@dataclass(frozen=True)
class Ablate(Operator):
    """phi(x) = x - (x . r_hat) r_hat: directional ablation (Arditi et al.; App. M.1) of ``vector``'s unit
    direction, restricted to the selected neurons. A vector that is not of unit length is normalised here; one that
    is (within float32 rounding) is kept bit for bit, so an operator rebuilt from its own fields is the same."""

    name: ClassVar[str] = "ablate"
    build: ClassVar[str] = "vector"
    vector: torch.Tensor

    def __post_init__(self) -> None:
        v = torch.as_tensor(self.vector, dtype=torch.float32).flatten()
        if not torch.isfinite(v).all() or abs(float(v.norm()) - 1.0) > 1e-6:
            v = _unit(v)
        object.__setattr__(self, "vector", v)

    @classmethod
    def from_vector(cls, vector: torch.Tensor, *, alpha: float = -2.0) -> Ablate:
        return cls(vector)  # the direction only: alpha does not apply

    @property
    def site_values(self) -> torch.Tensor | None:  # type: ignore[override]
        return self.vector

    def __call__(self, x: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, tau: float,
                 neurons: torch.Tensor | None = None) -> torch.Tensor:
        r = _site_rows(self, x, neurons)
        return x - (x @ r)[..., None] * r

    def check(self, mask: Any, sae: Any = None) -> None:
        _check_site_width(self, mask, sae)


# --------------------------------------------------------------------------------------------- the registry

OPERATOR_REGISTRY: Registry[type[Operator]] = Registry("operator")
#: ``fit(model, site, cfg, data, masks, rec, progress)`` -> one operator per mask: how a run fits a fitted operator
#: on its training split (``data``, a ``nslens.prepare.PreparedData``; ``rec``, its recording, whose raw samples can
#: spare a pass over the model). Kept off the operator classes: a class's code travels with every remote request
#: that uses it, and a fit's (recording, retries) has no business on the server.
Fit = Callable[..., list[Operator]]
OPERATOR_FITTERS: Registry[Fit] = Registry("operator fit")


def register_operator(cls: type[Operator], *, fit: Fit | None = None, replace: bool = False) -> type[Operator]:
    """Make ``cls`` (an ``Operator`` subclass with a ``name``) buildable by name: ``make_operator``, a run
    config's ``operators``, the CLI's ``--operator``. Usable as a class decorator. A fitted operator
    (``build == "fitted"``) comes with its ``fit`` (``OPERATOR_FITTERS``), which runs call."""
    if not (isinstance(cls, type) and issubclass(cls, Operator)) or not cls.name:
        raise NsLensError(f"register_operator needs an Operator subclass with a name, got {cls!r}")
    if cls.build not in ("options", "fitted", "vector"):
        raise NsLensError(f"operator {cls.name!r}: build must be one of options, fitted, vector, got {cls.build!r}")
    if (cls.build == "fitted") != (fit is not None):
        raise NsLensError(f"operator {cls.name!r}: " + ("a fitted operator needs fit= (how a run fits it)"
                                                       if fit is None else f"fit= is for fitted operators; its build "
                                                       f"is {cls.build!r}"))
    if fit is not None:
        OPERATOR_FITTERS.register(cls.name, fit, replace=replace)
    OPERATOR_REGISTRY.register(cls.name, cls, replace=replace)
    return cls


def get_operator(name: str) -> type[Operator]:
    """The operator class registered as ``name`` (an error listing the names otherwise)."""
    return OPERATOR_REGISTRY.get(name)


for _cls in (Zero, Dampen, MeanReplace, MeanConcept, Adaptive):
    register_operator(_cls)
OPERATOR_REGISTRY.register("leace", "nslens.leace:Leace")  # fitted on the range masks: defined above this module
OPERATOR_FITTERS.register("leace", "nslens.leace:run_leace")
for _cls in (Steer, Ablate):
    register_operator(_cls)

#: operators a run builds by name or fits (every registered one but the vector operators), read at each use
OPERATORS: Names = OPERATOR_REGISTRY.view(lambda cls: cls.build != "vector")
#: operators fitted on the concepts' training activations (``nslens.leace``), not built by name alone
FITTED_OPERATORS: Names = OPERATOR_REGISTRY.view(lambda cls: cls.build == "fitted")
#: operators built from a per-concept steering vector (``steer``, ``ablate``), not by name alone
VECTOR_OPERATORS: Names = OPERATOR_REGISTRY.view(lambda cls: cls.build == "vector")


# --------------------------------------------------------------------------------------------- factories


def zero() -> Operator:
    """phi(x) = 0: the paper's masking operator (neuron masking ungated, range masking gated)."""
    return Zero()


def dampen(alpha: float = 0.125) -> Operator:
    """phi(x) = alpha * x (Suau et al. 2024; the paper's alpha is 0.125)."""
    return Dampen(alpha)


def mean_replace(values: torch.Tensor | None = None, *, site_values: torch.Tensor | None = None) -> Operator:
    """Replace by ``site_values`` (one per neuron of the site: the general-text mean, ``nslens.general_mean``), by
    ``values`` (one per selected neuron), or, with neither, by the mask's concept mean mu (``mean_concept``)."""
    if values is None and site_values is None:
        return MeanConcept()
    return MeanReplace(values=values, site_values=site_values)


def steer(vector: torch.Tensor, alpha: float = -2.0) -> Operator:
    """Add ``alpha * vector`` (one value per neuron of the site): difference-in-means steering (paper: alpha = -2
    with the target concept's mean minus the other concepts' mean, ``nslens.steering.steering_vectors``)."""
    return Steer(vector, alpha)


def ablate_direction(vector: torch.Tensor) -> Operator:
    """Project out the unit direction of ``vector`` (one value per neuron of the site): directional ablation."""
    return Ablate(_unit(vector))


def adaptive_dampen(beta: float = 0.5) -> Operator:
    """Adaptive dampening (paper Appendix G, ``Adaptive``): phi(x) = a(x) * x with a(x) = beta * |x - mu| /
    (tau * sigma) capped at beta, full suppression at mu and dampening by beta at the range's edges."""
    return Adaptive(beta)


def make_operator(name: str, *, alpha: float = 0.125, beta: float = 0.5,
                  general_mean: torch.Tensor | None = None, **options: Any) -> Operator:
    """Operator by name (CLI and configs) through its class's ``from_options``. ``mean`` needs the site's
    general-text mean (``nslens.general_mean``); fitted and vector operators are refused with where to get them."""
    if name not in OPERATOR_REGISTRY or name in VECTOR_OPERATORS:
        raise OPERATOR_REGISTRY.unknown(name, OPERATORS)
    cls = get_operator(name)
    if cls.build == "fitted":
        raise NsLensError(f"{name} is fitted per concept on the training split, not built by name: "
                          "nslens.pipeline.run_operators(..., data=, masks=) fits it (OPERATOR_FITTERS)")
    return cls.from_options(alpha=alpha, beta=beta, general_mean=general_mean, **options)
