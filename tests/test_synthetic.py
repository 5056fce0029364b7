import numpy as np

from nslens.synthetic import SYNTHETIC_LABELS, build_tokenizer, synthetic_concepts, synthetic_corpus


def test_synthetic_data_is_deterministic_and_balanced():
    a, b = synthetic_concepts(20, seed=3), synthetic_concepts(20, seed=3)
    assert a.texts == b.texts and a.label_names == SYNTHETIC_LABELS
    assert a.class_counts().tolist() == [20] * 4
    assert synthetic_concepts(20, seed=4).texts != a.texts
    assert len(synthetic_corpus(5, seed=0)) == 5


def test_tokenizer_covers_the_task():
    tok = build_tokenizer()
    ds = synthetic_concepts(10, seed=0)
    ids = tok(ds.texts[0] + "\nLabel: sports")["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.convert_ids_to_tokens(ids[-3:]) == ["Label", ":", "sports"]


def test_embedded_model_learned_the_task(embedded, site, synth):
    import nslens

    ids = nslens.label_token_ids(embedded.tokenizer, synth["test"].label_words)
    gold = np.asarray(ids)[synth["test"].labels]
    p = nslens.predict(embedded, site, synth["test_prompts"], gold, batch_size=32)
    assert p.correct.mean() > 0.9  # chance is 0.25


def test_concurrent_processes_train_the_embedded_model_once(tmp_path):
    """Two processes sharing NSLENS_HOME: one trains (and says so), the other waits and finds the model."""
    import os
    import subprocess
    import sys

    code = ("import logging, sys; logging.basicConfig(level=logging.WARNING, format='%(message)s'); "
            "from nslens.synthetic import build_embedded_model; "
            "print(build_embedded_model(steps=3))")
    env = {**os.environ, "NSLENS_HOME": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    announced = sum(e.count("training the embedded model (once") for _, e in outs)
    assert announced == 1 and sum("3/3 steps" in e for _, e in outs) == 1
    from nslens.synthetic import EMBEDDED_VERSION

    assert outs[0][0].strip() == outs[1][0].strip()
    assert (tmp_path / f"embedded-{EMBEDDED_VERSION}" / "config.json").exists()
