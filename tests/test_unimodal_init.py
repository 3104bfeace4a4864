"""tools/unimodal_init.py: the labels it trains the ViT on and its chance level (the training
itself and the loading of its outputs run end to end in tests/test_demo.py)."""
import pytest

from tools.unimodal_init import LABELS, chance_recall, object_labels


def test_object_labels_are_the_coloured_shapes_any_caption_names():
    target = object_labels(['A red circle and a blue square.', 'the Red Circle at the top',
                            'two shapes: small triangle'])  # no colour: no label
    named = {LABELS[i] for i in target.nonzero().flatten().tolist()}
    assert named == {'red circle', 'blue square'}
    assert target.sum() == 2 and target.shape == (len(LABELS),)


def test_chance_recall_is_the_share_of_labels_a_random_top_k_hits():
    records = [{'caption': 'a red circle and a blue square'},       # 2 objects: 2/30 each
               {'caption': ['a green cross', 'a green cross.']}]    # 1 object: 1/30
    # (2 * 2/30 + 1 * 1/30) objects expected among 3 named
    assert chance_recall(records) == pytest.approx((4 / 30 + 1 / 30) / 3)
    assert chance_recall([]) == 0
