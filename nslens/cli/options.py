"""One vocabulary for every command: each option that sets a configuration value is one ``Flag`` here, with the
one field it sets (``RunConfig``'s, a section's as ``section.field``, or ``NegConfig``'s as ``neg.field``), its
default and its help. A command declares the flags that apply to it with ``option(flag)`` and builds its
configuration with ``run_config(ctx)`` / ``neg_config(ctx)``, which route each flag's value to its field and to no
other. Options that name no configuration value (outputs, inputs, switches of one command) are ``COMMAND_OPTIONS``."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

#: the embedded model's and RunConfig's defaults are repeated here (a test checks they agree): reading them from
#: nslens.config would import torch on `nslens --help`
_OPERATORS = "zero, dampen, mean (general-text mean), mean_concept, adaptive or leace (LEACE per concept over the " \
             "masks' neurons, fitted on the training split)"


@dataclass(frozen=True)
class Flag:
    """A command-line option: its names (the first is the flag, ``--a/--b`` for a switch), the config field it
    sets, its default and its help."""

    names: tuple[str, ...]
    target: str
    default: Any
    help: str

    @property
    def flag(self) -> str:
        return self.names[0].split("/")[0]


FLAGS: dict[str, Flag] = {f.flag: f for f in [
    Flag(("--model", "-m"), "model", "embedded", "Hub id, local directory or 'embedded'."),
    Flag(("--dataset", "-d"), "dataset", "synthetic",
         "synthetic, ag_news, dbpedia_14, emotion, sst2, imdb, next:<family>[:<source>] (next-token concepts: "
         "pronouns, pronoun_pairs, punctuation, delimiters, agreement or w1,w2/w3; source wikitext, synthetic or a "
         ".txt file), or a .csv/.jsonl path."),
    Flag(("--layer", "-l"), "layer", -1, "Decoder layer whose output is the site (negative counts from the end; "
         "-1 = the last block, the paper's 'penultimate layer' before the output head)."),
    Flag(("--label-words",), "label_words", None, "Comma-separated words the model answers with, one per concept in "
         "the dataset's order (default: the label names)."),
    Flag(("--n-per-class", "--n"), "n_per_class", 400, "Samples per concept before the train/test split."),
    Flag(("--batch-size",), "batch_size", 16, "Prompts per model pass."),
    Flag(("--remote",), "remote", False, "Run traces on NDIF (needs a hub id and NDIF_API_KEY)."),
    Flag(("--quantize",), "quantize", None, "nf4 or int8 (bitsandbytes; local models)."),
    Flag(("--dtype",), "dtype", None, "float32, bfloat16 or float16."),
    Flag(("--seed",), "seed", 0, "Seed of the sampling, the split and the demonstrations."),
    Flag(("--only-correct/--all-samples",), "only_correct", True,
         "Keep only samples the clean model classifies correctly (the paper's protocol)."),
    Flag(("--max-words",), "max_words", 64, "Texts are cut to this many words."),
    Flag(("--readout",), "readout", "argmax", "How logits become a prediction: argmax (the greedy token, the "
         "paper's), labels (the best label word) or calibrated (the best label word after the prompt's content-free "
         "prior)."),
    Flag(("--k-shot",), "k_shot", 1, "Demonstrations per concept in the few-shot prompt."),
    Flag(("--position",), "record_position", "last", "Where activations are recorded: last or all tokens."),
    Flag(("--positions",), "positions", "all", "Where interventions apply: all positions or the last one."),
    Flag(("--method",), "method", "max", "Ranking: max or probeless (probe needs `nslens run`, which keeps "
         "samples)."),
    Flag(("--fraction",), "fraction", 0.3, "Top fraction of neurons per concept, in (0, 1]."),
    Flag(("--tau",), "tau", 2.5, "Range half-width in standard deviations."),
    Flag(("--operators", "--operator"), "operators", "zero", f"Comma-separated operators: {_OPERATORS}."),
    Flag(("--alpha",), "alpha", 0.125, "Dampening factor (dampen)."),
    Flag(("--beta",), "beta", 0.5, "Adaptive-dampening factor (adaptive)."),
    Flag(("--side-effects/--no-side-effects",), "side_effects.enabled", False,
         "Also measure lm-eval side effects (MMLU, token perplexity)."),
    Flag(("--tasks",), "side_effects.tasks", "mmlu,nslens_wikipedia_ppl",
         "Comma-separated lm-eval tasks (embedded model: offline synthetic tasks replace the defaults)."),
    Flag(("--lm-eval-limit", "--limit"), "side_effects.limit", None,
         "lm-eval --limit (per subtask for the mmlu group)."),
    Flag(("--include",), "side_effects.include", None, "Directory of extra lm-eval task YAMLs."),
    Flag(("--sae-path",), "sae.path", None, "Gemma Scope params.npz."),
    Flag(("--sae-release", "--release"), "sae.release", None, "sae-lens release, e.g. gemma-scope-2b-pt-res."),
    Flag(("--sae-id",), "sae.id", None, "e.g. layer_25/width_16k/average_l0_285."),
    Flag(("--sae-ranges-over", "--ranges-over"), "sae.ranges_over", "firing",
         "SAE feature ranges over the concept's firing samples or all its samples."),
    Flag(("--steering", "--kinds"), "steering.runs", "", "Comma-separated steering runs: steer, ablate, arm, leace."),
    Flag(("--steer-alpha",), "steering.alpha", -2.0, "Steering strength a in x + a r."),
    Flag(("--steer-source",), "steering.source", "last",
         "Steering vectors from the last token or the mean token (mean)."),
    Flag(("--steer-tau",), "steering.tau", 1.0, "tau of the full-vector ranges (range-gated steering, arm)."),
    Flag(("--param",), "sweeps.params", "", "What to sweep: fraction, tau or layer."),
    Flag(("--kind",), "neg.kind", "product", "Neuron: product (default), up_proj, act_fn or residual."),
    Flag(("--prompts",), "neg.prompts", 8, "Prompts (test split) to sweep; those answered correctly are used."),
    Flag(("--neurons",), "neg.neurons", 100, "Neurons sampled per prompt (the paper: 100)."),
    Flag(("--all-layers/--one-layer",), "neg.all_layers", True,
         "Sample neurons from every feed-forward layer (the paper) or --layer only."),
    Flag(("--log-prob/--no-log-prob",), "neg.log_prob", False, "Differentiate log p instead of p."),
    Flag(("--ig-steps",), "neg.ig_steps", 20, "Integrated-gradients steps."),
    Flag(("--ig-grid",), "neg.ig_grid", "linspace", "IG alphas: linspace (the authors' linspace(0, 1, steps)) or "
         "right (k/steps, k = 1..steps)."),
    Flag(("--lpi-norm",), "neg.lpi_norm", "final", "LPI normaliser: final (the released LPI code: one fixed "
         "rsqrt(final_var + 1e-6)) or recompute (the final norm on each vector)."),
    Flag(("--mceval",), "neg.mceval", None, "An MCEval8K task (e.g. agnews, paws, ner) instead of --dataset: its "
         "prompts, answers and option letters."),
    Flag(("--mceval-path",), "neg.mceval_path", None, "A local copy of the task: its folder ({train,valid,test}.json) "
         "or one split's json file."),
    Flag(("--zero-shot",), "neg.zero_shot", False, "MCEval8K prompts without the demonstrations (the authors' "
         "default: one per answer label, from the train split)."),
    Flag(("--queries",), "neg.queries", None, "At most this many MCEval8K queries (the first after the authors' "
         "seeded shuffle)."),
]}

#: options that set no configuration value, and what they are
COMMAND_OPTIONS = {
    "--out": "where the command writes (a file, a table's stem or a run directory)",
    "--overwrite": "replace an existing run directory",
    "--ranges": "the directory of range masks a command reads",
    "--checkpoint": "record: partial statistics to resume from",
    "--allow-other-model": "use masks recorded on another model id",
    "--values": "sweep: the values of the swept --param (sweeps.fractions, taus or layers)",
    "--source": "nexttoken: the text source of the dataset next:<family>:<source>",
    "--min-words": "nexttoken: the shortest context extracted",
    "--bundle": "an intervention bundle directory a command reads (instead of --ranges)",
    "--concepts": "generate, bundle: the concepts whose masks apply",
    "--gated": "generate, bundle: range masking (--gated) or neuron masking (--ungated)",
    "--prompt": "generate: a prompt (repeatable)",
    "--prompts-file": "generate: a file of prompts, one per line",
    "--max-new-tokens": "generate: tokens generated per prompt",
    "--sample": "generate: sample (--sample) or decode greedily (--greedy)",
    "--temperature": "generate: the sampling temperature",
    "--top-p": "generate: the nucleus-sampling mass",
    "--top-k": "generate: the top-k cut",
}

_UNSET = object()


def option(flag: str, default: Any = _UNSET, help: str | None = None) -> Any:
    """The typer option of ``flag`` (its names and help; ``default``: a command's own, where it differs)."""
    f = FLAGS[flag]
    return typer.Option(f.default if default is _UNSET else default, *f.names, help=help or f.help)


def to_field_type(value: Any, tp: Any) -> Any:
    """A command-line value as its field's type: comma-separated lists, paths as strings."""
    if isinstance(value, Path):
        value = str(value)
    origin = typing.get_origin(tp)
    lists = [a for a in typing.get_args(tp) if typing.get_origin(a) is list] if origin is not list else [tp]
    if isinstance(value, str) and lists:
        return [w.strip() for w in value.split(",") if w.strip()]
    return value


def flag_values(ctx: typer.Context) -> dict[str, Any]:
    """The values of the context's configuration flags, by target (``model``, ``steering.alpha``, ...)."""
    out = {}
    for p in ctx.command.params:
        flag = _long_flag(p)
        if flag in FLAGS and p.name in ctx.params:
            out[FLAGS[flag].target] = ctx.params[p.name]
    return out


def _long_flag(param: Any) -> str | None:
    """A command parameter's first ``--`` name (the ``FLAGS`` key), or None."""
    return next((o for o in param.opts if o.startswith("--")), None)


def run_config(ctx: typer.Context, **fixed: Any) -> Any:
    """The command's ``RunConfig`` from its flags and ``fixed`` (fields the command sets itself; a section as a
    dict of its fields), validated, its layers checked where the model's depth is known locally."""
    from nslens.config import SECTIONS, RunConfig  # torch loads with the library, not with `nslens --help`
    from nslens.workflows import checked

    hints = typing.get_type_hints(RunConfig)
    core: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    for target, value in flag_values(ctx).items():
        section, _, name = target.rpartition(".")
        if section == "neg":
            continue
        if section:
            sections.setdefault(section, {})[name] = to_field_type(value, typing.get_type_hints(SECTIONS[section])[name])
        else:
            core[name] = to_field_type(value, hints[name])
    for key, value in fixed.items():
        if isinstance(value, dict):
            sections.setdefault(key, {}).update(value)
        else:
            core[key] = value
    core.update(_protocol_defaults(ctx, core, set(fixed)))
    return checked(RunConfig(**core, **sections))


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the user set parameter ``name`` (command line or environment), not its default. By the source's
    name: typer may bring a click of its own, whose ``ParameterSource`` is another class."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def _protocol_defaults(ctx: typer.Context, core: dict[str, Any], fixed: set[str]) -> dict[str, Any]:
    """The model's registered classification protocol (``nslens.protocols``) for the settings the command line
    left at their defaults (also those the command has no flag for), announced in one line
    on stderr; an explicit flag, and a field the command sets itself (``fixed``), always win."""
    from nslens.protocols import protocol_settings

    settings = protocol_settings(str(core.get("model", "")), str(core.get("dataset", "")))
    given = {FLAGS[flag].target for p in ctx.command.params
             if (flag := _long_flag(p)) in FLAGS and _given(ctx, p.name)}
    applied = {k: v for k, v in settings.items() if k not in given and k not in fixed}
    if applied:
        from .app import console

        listed = ", ".join(f"{k} {','.join(v) if isinstance(v, list) else v}" for k, v in applied.items())
        console.print(f"{core['model']}: its protocol's settings apply ({listed}; docs/real-model.md)",
                      highlight=False, markup=False)
    return applied


def neg_config(ctx: typer.Context) -> Any:
    """The command's ``NegConfig`` from its ``neg.*`` flags."""
    from nslens.negstudy import NegConfig  # torch loads with the library, not with `nslens --help`

    hints = typing.get_type_hints(NegConfig)
    values = {t.removeprefix("neg."): v for t, v in flag_values(ctx).items() if t.startswith("neg.")}
    neg = NegConfig(**{k: to_field_type(v, hints[k]) for k, v in values.items()})
    neg.validate()
    return neg
