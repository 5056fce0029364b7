"""nslens.protocols: what a registered protocol sets, and that its settings are valid ones."""

import nslens
from nslens.fortunes import DEFAULT_CATEGORIES, parse_fortunes_spec
from nslens.protocols import PROTOCOLS, protocol_for, protocol_settings
from nslens.readout import READOUTS


def test_smollm2_protocol_sets_shots_words_and_readout():
    proto = protocol_for("smollm2-135m")
    assert proto is not None and proto.readout in READOUTS
    assert protocol_settings("smollm2-135m", "fortunes") == {"k_shot": 1, "max_words": 24, "readout": "calibrated"}
    # the default fortunes categories are the protocol's, and its table of measured accuracies covers each of them
    # above chance: a consistency check of the typed numbers; the measurement itself is test_real_model's
    # test_the_registered_protocol_classifies_its_six_topics_above_chance
    assert parse_fortunes_spec(proto.dataset) == DEFAULT_CATEGORIES
    assert set(proto.measured["min"]) == set(DEFAULT_CATEGORIES)
    assert all(v > proto.chance for v in proto.measured["min"].values())


def test_no_settings_for_next_token_data_or_other_models():
    assert protocol_settings("smollm2-135m", "next:pronouns:synthetic") == {}
    assert protocol_settings("embedded", "synthetic") == {}
    assert protocol_for("gpt2") is None


def test_every_protocol_is_a_valid_config():
    for proto in PROTOCOLS.values():
        nslens.RunConfig(model=proto.model, dataset=proto.dataset, **proto.settings()).validate()
