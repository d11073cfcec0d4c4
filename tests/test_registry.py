import pytest

from loraflow.registry import decide


def test_first_model_must_beat_the_base_by_the_margin():
    d = decide("exact_match", {"exact_match": 0.5}, {"exact_match": 0.0}, None, 0.01)
    assert d.promote and d.reference_name == "base model"
    d = decide("exact_match", {"exact_match": 0.005}, {"exact_match": 0.0}, None, 0.01)
    assert not d.promote and "does not beat" in d.reason


def test_later_models_are_compared_with_the_champion_not_the_base():
    champion = ("3", {"exact_match": 0.8})
    d = decide("exact_match", {"exact_match": 0.7}, {"exact_match": 0.0}, champion, 0.0)
    assert not d.promote and d.reference == 0.8 and d.reference_name == "champion v3"
    d = decide("exact_match", {"exact_match": 0.9}, {"exact_match": 0.0}, champion, 0.05)
    assert d.promote and d.reason.startswith("exact_match 0.900 beats champion v3")


@pytest.mark.parametrize("margin", [0.0, 0.1])
def test_a_tie_never_promotes(margin):
    d = decide("json_valid", {"json_valid": 1.0}, {"json_valid": 1.0}, None, margin)
    assert not d.promote
