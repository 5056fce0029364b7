"""Shared fixtures: the embedded model (trained once, cached under NSLENS_HOME) and tiny random models; the CLI run
in this process (run_cli)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NSLENS_HOME", str(Path(__file__).resolve().parents[1] / ".cache" / "nslens"))
# a remote test that waits on a server which will never answer fails after 5 minutes instead of 6 hours
os.environ.setdefault("NSLENS_REMOTE_TIMEOUT", "300")

# The real NDIF server the remote tests run against (session fixture `ndif_stack`; see tests/ndif_stack/README.md).
from ndif_stack.fixture import ndif_stack  # noqa: E402, F401

# `make test` runs the suite in two worker processes (pytest-xdist, `-n 2 --dist loadfile`), each test file whole
# in one worker so that its module fixtures are built once. Two refinements, below: the files of the NDIF server's
# tests go to one worker together (one stack per session, started once, not one per worker), and the longest
# groups are handed out first (the scheduler deals files in collection order), so that no long file starts last.
# (Not `--dist loadgroup` with xdist_group marks: under pytest 9.2 the marks no longer reach xdist's scheduler, and
# the tests are dealt out one by one.)
NDIF_FILES = ("test_ndif_stack.py", "test_remote_faults.py", "test_remote_ndif.py")
FIRST = NDIF_FILES + ("test_real_model.py",)  # the NDIF stack (a minute to start) and SmolLM2: the longest groups

# One torch thread per worker: two workers on two cores would otherwise run four (torch's default is one per core).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile``, with the NDIF files as one group (see NDIF_FILES)."""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class NdifTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            return "ndif" if Path(path).name in NDIF_FILES else path

    return NdifTogether(config, log)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_setupnodes(config, specs):
    """With workers, the embedded model is trained here, in the main process before they start (once per
    NSLENS_HOME; a no-op when cached). Its training pins two threads (for bit-identical weights); sharing the two
    cores with a busy worker made it three times slower (5.5 minutes, against under 2 alone)."""
    from nslens.embedded import build_embedded_model, embedded_model_dir

    if (embedded_model_dir() / "config.json").exists():
        return
    reporter = config.pluginmanager.getplugin("terminalreporter")

    def say(done: int, total: int) -> None:
        if reporter is not None and (done % max(1, total // 10) == 0 or done == total):
            reporter.write_line(f"training the embedded model before the workers start: {done}/{total} steps")

    build_embedded_model(progress=say)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test of the NDIF server lives in NDIF_FILES (else a second worker would start a second stack); the
    FIRST files come first, every other file in its usual order."""
    strays = [item.nodeid for item in items
              if "ndif_stack" in getattr(item, "fixturenames", ()) and item.path.name not in NDIF_FILES]
    if strays:
        raise pytest.UsageError(f"{strays[0]} uses the ndif_stack fixture but its file is not in tests/conftest.py's "
                                f"NDIF_FILES ({', '.join(NDIF_FILES)}): add it there, so that it runs in the worker "
                                "that holds the one NDIF stack")
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # a stable sort: the rest keep their order


@pytest.fixture(scope="session")
def embedded():
    import nslens

    return nslens.load_model("embedded")


@pytest.fixture(scope="session")
def site(embedded):
    import nslens

    return nslens.resolve_site(embedded, -2)


@pytest.fixture(scope="session")
def synth():
    """A small synthetic concept split and its prompts."""
    from nslens import FewShotPrompter
    from nslens.synthetic import synthetic_concepts

    ds = synthetic_concepts(60, seed=11)
    train, test = ds.split(0.3, seed=0)
    prompter = FewShotPrompter.from_dataset(train, k=1, seed=0)
    return {"ds": ds, "train": train, "test": test, "prompter": prompter,
            "train_prompts": prompter.prompts(train.texts), "test_prompts": prompter.prompts(test.texts)}


@pytest.fixture(scope="session")
def synth_recorded(embedded, site, synth):
    """The synthetic training split recorded at ``site``, raw vectors kept (shared by the tests that need some
    recording and its masks: generation, bundles)."""
    import nslens

    tr = synth["train"]
    return nslens.record(embedded, site, synth["train_prompts"], tr.labels, tr.label_names, batch_size=32,
                         keep_samples=True)


@pytest.fixture(scope="session")
def synth_masks(synth_recorded):
    """Top 50 % per concept by the max ranking, tau 2.5."""
    import nslens

    return nslens.build_range_masks(synth_recorded.stats, method="max", fraction=0.5)


def encode(model, prompts):
    enc = model.tokenizer(list(prompts), return_tensors="pt", padding=True)
    return dict(enc)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """What nnsight passes for left-padded batches: positions count from each row's first real token."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def plain_forward(model, enc, hook=None, layer_module=None):
    """The raw HF module's forward (no nnsight), optionally with a plain torch forward hook."""
    hf = model._module
    handle = layer_module.register_forward_hook(hook) if hook is not None else None
    try:
        with torch.no_grad():
            return hf(**enc, position_ids=position_ids(enc["attention_mask"]), output_hidden_states=True)
    finally:
        if handle is not None:
            handle.remove()


def edit_by_hand(hs, mask, phi, gated):
    """A mask's edit written out neuron by neuron (no nslens code): ``phi(x, mu, sigma)`` on each selected neuron,
    where the value lies in the range when ``gated``; returns an edited copy of ``hs``."""
    hs = hs.clone()
    for k, j in enumerate(mask.neurons.tolist()):
        col = hs[..., j]
        new = phi(col, mask.mu[k], mask.sigma[k])
        hs[..., j] = torch.where((col >= mask.lo[k]) & (col <= mask.hi[k]), new, col) if gated else new
    return hs


def hook_reference(embedded, site, enc, mask, phi, gated):
    """A mask's edit (``edit_by_hand``) as a plain torch forward hook on the raw HF module; returns the logits."""
    def hook(module, args, output):
        hs = edit_by_hand(output[0] if isinstance(output, tuple) else output, mask, phi, gated)
        return (hs, *output[1:]) if isinstance(output, tuple) else hs

    layer = embedded._module.model.layers[site.layer]
    return plain_forward(embedded, enc, hook=hook, layer_module=layer).logits


class CliResult(NamedTuple):
    """What a command did: its exit code and what it wrote on stdout and stderr."""

    returncode: int
    stdout: str
    stderr: str


def run_cli(*args, cwd=None) -> CliResult:
    """``nslens.cli.main`` in this process, in ``cwd``, with stdout and stderr captured (not terminals, as in a
    pipe); the state a command can touch (environment, working directory, logging, transformers' verbosity,
    torch's threads and random state, numpy's random state, the consoles' widths) is put back afterwards, so
    nothing leaks into later tests."""
    import transformers  # loaded with nslens, as in the fixtures above

    import nslens.cli as cli

    hf_logging = transformers.utils.logging
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    threads, torch_rng, np_rng = torch.get_num_threads(), torch.random.get_rng_state(), np.random.get_state()
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COLUMNS", "200")
        mp.setattr(cli.console, "width", 200)  # what COLUMNS=200 gives a fresh process's consoles
        mp.setattr(cli.out_console, "width", 140)
        if cwd is not None:
            mp.chdir(cwd)
        env = dict(os.environ)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    cli.main([str(a) for a in args])
                    code = 0
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else int(e.code is not None)
        finally:
            for key in set(os.environ) - set(env):
                del os.environ[key]
            os.environ.update(env)
            root.handlers[:] = handlers
            root.setLevel(level)
            hf_logging.set_verbosity(verbosity)
            (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()
            torch.set_num_threads(threads)
            torch.random.set_rng_state(torch_rng)
            np.random.set_state(np_rng)
    return CliResult(code, out.getvalue(), err.getvalue())


@pytest.fixture
def rng():
    return np.random.default_rng(0)
