"""What a Label Studio annotation teaches (backend/annotations.py), from realistic payloads.

Regions are shaped as Label Studio sends them (docs label-studio-protocol.md §3.2, §4.1):
percent coordinates with `original_width` / `original_height`, an `origin`, and a `parentID`
when points are grouped under a face.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backend.annotations import (
    ACCEPTED,
    EMPTY,
    POINTS,
    REJECTED,
    SKIPPED,
    PupilPair,
    parse_annotation,
    prediction_pairs,
)

W, H = 1280, 960
UNPAIRED_NOTE = "pupil points without a partner"


def point(label, x, y, origin="manual", parent=None, **extra):
    region = {
        "id": f"{label}-{x}-{y}",
        "from_name": "keypoints",
        "to_name": "image",
        "type": "keypointlabels",
        "original_width": W,
        "original_height": H,
        "image_rotation": 0,
        "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": [label]},
        "origin": origin,
    }
    if parent is not None:
        region["parentID"] = parent
    region.update(extra)
    return region


def verdict(choice, from_name="verdict", kind="choices"):
    return {
        "id": "v1",
        "from_name": from_name,
        "to_name": "image",
        "type": kind,
        "value": {"choices": [choice]},
        "origin": "manual",
    }


def annotation(*regions, **fields):
    return {
        "id": 17,
        "task": 42,
        "project": 3,
        "completed_by": 1,
        "result": list(regions),
        "was_cancelled": False,
        "ground_truth": False,
        "parent_prediction": 55,
        "updated_at": "2025-05-01T10:00:00.000000Z",
        **fields,
    }


def px(x, y, width=W, height=H):
    return np.array([x * width / 100.0, y * height / 100.0])


def pair_set(pairs):
    return {(tuple(p.left_pupil.round(6)), tuple(p.right_pupil.round(6))) for p in pairs}


# The subject's left eye is on the image's right: left_pupil has the larger x.
LEFT, RIGHT = (60.0, 40.0), (40.0, 41.0)


def test_manual_points_are_a_label():
    label = parse_annotation(annotation(point("left_pupil", *LEFT), point("right_pupil", *RIGHT)))
    assert label.kind == POINTS and label.teaches
    assert label.verdict is None and label.parent_prediction == 55 and label.unpaired == 0
    [pair] = label.pairs
    np.testing.assert_allclose(pair.left_pupil, px(*LEFT))
    np.testing.assert_allclose(pair.right_pupil, px(*RIGHT))


def test_kept_prediction_points_with_a_correct_verdict_are_points():
    label = parse_annotation(
        annotation(
            point("left_pupil", *LEFT, origin="prediction"),
            point("right_pupil", *RIGHT, origin="prediction"),
            verdict("correct"),
        )
    )
    assert label.kind == POINTS and label.teaches and label.verdict == "correct"
    [pair] = label.pairs
    np.testing.assert_allclose(pair.left_pupil, px(*LEFT))


def test_a_correct_verdict_alone_accepts_the_parent_prediction():
    label = parse_annotation(annotation(verdict("correct")))
    assert label.kind == ACCEPTED and label.teaches
    assert label.verdict == "correct" and label.parent_prediction == 55 and label.pairs == ()


@pytest.mark.parametrize("parent", [None, "55", True, 55.0])
def test_a_correct_verdict_without_an_integer_parent_prediction_teaches_nothing(parent):
    label = parse_annotation(annotation(verdict("correct"), parent_prediction=parent))
    assert label.kind == EMPTY and not label.teaches
    assert label.parent_prediction is None and label.verdict == "correct"


@pytest.mark.parametrize(
    "regions",
    [
        [verdict("wrong")],
        [
            verdict("wrong"),
            point("left_pupil", *LEFT, origin="prediction"),
            point("right_pupil", *RIGHT, origin="prediction"),
        ],
    ],
    ids=["no-points", "unedited-points"],
)
def test_a_wrong_verdict_with_nothing_corrected_is_rejected(regions):
    label = parse_annotation(annotation(*regions))
    assert label.kind == REJECTED and not label.teaches
    assert label.verdict == "wrong" and label.parent_prediction == 55 and label.pairs == ()


@pytest.mark.parametrize("origin", ["prediction-changed", "manual"])
def test_a_wrong_verdict_with_moved_points_is_a_correction(origin):
    label = parse_annotation(
        annotation(
            verdict("wrong"),
            point("left_pupil", 62.5, 40.0, origin=origin),
            point("right_pupil", *RIGHT, origin="prediction"),
        )
    )
    assert label.kind == POINTS and label.teaches and label.verdict == "wrong"
    [pair] = label.pairs
    np.testing.assert_allclose(pair.left_pupil, px(62.5, 40.0))
    np.testing.assert_allclose(pair.right_pupil, px(*RIGHT))


@pytest.mark.parametrize("cancelled", [True, 1])
def test_a_skipped_annotation_is_skipped_whatever_it_holds(cancelled):
    label = parse_annotation(
        annotation(
            point("left_pupil", *LEFT), point("right_pupil", *RIGHT), was_cancelled=cancelled
        )
    )
    assert label.kind == SKIPPED and not label.teaches and label.pairs == ()


@pytest.mark.parametrize(
    "fields",
    [{}, {"result": None}, {"result": {"x": 1}}, {"result": "[]"}],
    ids=["empty-list", "null", "object", "string"],
)
def test_an_annotation_saying_nothing_is_empty(fields):
    body = annotation(**fields)
    if not fields:
        body["result"] = []
    label = parse_annotation(body)
    assert label.kind == EMPTY and not label.teaches
    assert label.pairs == () and label.notes == () and label.unpaired == 0


def test_a_missing_result_is_empty():
    body = annotation()
    del body["result"]
    assert parse_annotation(body).kind == EMPTY


@pytest.mark.parametrize("label_name", ["left_pupil", "right_pupil"])
def test_one_pupil_alone_is_empty_with_an_unpaired_note(label_name):
    label = parse_annotation(annotation(point(label_name, 50.0, 50.0)))
    assert label.kind == EMPTY and not label.teaches and label.pairs == ()
    assert label.notes == (UNPAIRED_NOTE,)
    assert label.unpaired == 1  # "pupil points left over (no partner of the other side)"


@pytest.mark.parametrize(
    ("width", "height", "x", "y", "expected"),
    [
        (1280, 960, 41.2, 37.9, (527.36, 363.84)),
        (100, 50, 0.0, 100.0, (0.0, 50.0)),
        (640, 480, 100.0, 0.0, (640.0, 0.0)),
        ("512", 512.0, "50", 25, (256.0, 128.0)),
    ],
)
def test_percentages_become_pixels_of_the_original_image(width, height, x, y, expected):
    regions = [
        point("left_pupil", x, y, original_width=width, original_height=height),
        point("right_pupil", 10.0, 10.0, original_width=width, original_height=height),
    ]
    [pair] = parse_annotation(annotation(*regions)).pairs
    np.testing.assert_allclose(pair.left_pupil, expected)
    np.testing.assert_allclose(pair.right_pupil, px(10.0, 10.0, float(width), float(height)))


def _without(key):
    def change(region):
        region["value"].pop(key, None)
        region.pop(key, None)

    return change


def _value(**kv):
    return lambda region: region["value"].update(kv)


def _region(**kv):
    return lambda region: region.update(kv)


BAD_POINTS = {
    "x-over-100": _value(x=100.5),
    "x-negative": _value(x=-0.1),
    "y-over-100": _value(y=150.0),
    "x-nan": _value(x=float("nan")),
    "y-nan-string": _value(y="nan"),
    "x-inf": _value(x=float("inf")),
    "x-null": _value(x=None),
    "x-text": _value(x="left"),
    "x-list": _value(x=[41.2]),
    "no-x": _without("x"),
    "no-y": _without("y"),
    "no-width": _without("original_width"),
    "no-height": _without("original_height"),
    "zero-width": _region(original_width=0),
    "negative-height": _region(original_height=-960),
    "nan-width": _region(original_width=float("nan")),
    "width-text": _region(original_width="wide"),
    "value-not-object": _region(value=[60.0, 40.0]),
    "no-value": _without("value"),
    "two-labels": _value(keypointlabels=["left_pupil", "right_pupil"]),
    "no-labels": _value(keypointlabels=[]),
    "label-as-string": _value(keypointlabels="left_pupil"),
    "other-keypoint": _value(keypointlabels=["left_eye_outer"]),
    "not-a-keypoint-region": _region(type="rectanglelabels"),
}


@pytest.mark.parametrize("change", BAD_POINTS.values(), ids=BAD_POINTS.keys())
def test_unusable_points_are_ignored(change):
    bad = point("left_pupil", 80.0, 45.0)
    change(bad)
    label = parse_annotation(
        annotation(point("left_pupil", *LEFT), bad, point("right_pupil", *RIGHT))
    )
    assert label.kind == POINTS and label.unpaired == 0
    [pair] = label.pairs
    np.testing.assert_allclose(pair.left_pupil, px(*LEFT))


def test_a_lone_unusable_partner_leaves_the_other_pupil_unpaired():
    bad = point("right_pupil", *RIGHT)
    bad["value"]["x"] = float("nan")
    label = parse_annotation(annotation(point("left_pupil", *LEFT), bad))
    assert label.kind == EMPTY and label.pairs == () and label.notes == (UNPAIRED_NOTE,)


JUNK_IN_A_GOOD_POINT = {
    "origin-list": _region(origin=["manual"]),
    "origin-object": _region(origin={"by": "manual"}),
    "x-huge-int": _value(x=10**400),
    "width-huge-int": _region(original_width=10**400),
    "parent-id-number": _region(parentID=7),
    "region-id-object": _region(id={"a": 1}),
}


@pytest.mark.parametrize("change", JUNK_IN_A_GOOD_POINT.values(), ids=JUNK_IN_A_GOOD_POINT.keys())
def test_junk_fields_in_a_point_do_not_raise(change):
    """Values json.loads can produce (a list, an object, a 400-digit integer) where Label
    Studio puts a string or a number: an annotation like that is stored, then parsed on every
    webhook and every training run, so parsing must not raise."""
    odd = point("left_pupil", *LEFT)
    change(odd)
    label = parse_annotation(annotation(odd, point("right_pupil", *RIGHT)))
    assert label.kind in (POINTS, EMPTY)


def test_two_faces_are_paired_by_parent_id():
    # Nearest-first would pair face A's left pupil (30 %) with face B's right pupil (32 %).
    regions = [
        point("left_pupil", 30.0, 50.0, parent="faceA"),
        point("right_pupil", 10.0, 50.0, parent="faceA"),
        point("left_pupil", 70.0, 50.0, parent="faceB"),
        point("right_pupil", 32.0, 50.0, parent="faceB"),
    ]
    label = parse_annotation(annotation(*regions))
    assert label.kind == POINTS and label.unpaired == 0
    assert pair_set(label.pairs) == pair_set(
        [_pair((30.0, 50.0), (10.0, 50.0)), _pair((70.0, 50.0), (32.0, 50.0))]
    )


def test_a_parent_with_an_incomplete_face_pairs_only_the_complete_one():
    regions = [
        point("left_pupil", 30.0, 50.0, parent="faceA"),
        point("right_pupil", 10.0, 50.0, parent="faceA"),
        point("left_pupil", 70.0, 50.0, parent="faceB"),
    ]
    label = parse_annotation(annotation(*regions))
    assert label.kind == POINTS and label.unpaired == 1
    assert pair_set(label.pairs) == pair_set([_pair((30.0, 50.0), (10.0, 50.0))])


def test_faces_without_parent_ids_pair_the_nearest_first():
    regions = [
        point("right_pupil", 70.0, 40.0),
        point("left_pupil", 30.0, 40.0),
        point("left_pupil", 80.0, 41.0),
        point("right_pupil", 20.0, 40.0),
        point("right_pupil", 95.0, 90.0),  # a third right pupil, nobody's partner
    ]
    label = parse_annotation(annotation(*regions))
    assert label.kind == POINTS and label.unpaired == 1
    assert pair_set(label.pairs) == pair_set(
        [_pair((30.0, 40.0), (20.0, 40.0)), _pair((80.0, 41.0), (70.0, 40.0))]
    )


def test_some_points_without_a_parent_fall_back_to_nearest_pairs():
    regions = [
        point("left_pupil", 30.0, 50.0, parent="faceA"),
        point("right_pupil", 10.0, 50.0),
    ]
    label = parse_annotation(annotation(*regions))
    assert pair_set(label.pairs) == pair_set([_pair((30.0, 50.0), (10.0, 50.0))])


def _pair(left, right):
    return PupilPair(px(*left), px(*right))


@pytest.mark.parametrize(
    ("choice", "from_name", "kind"),
    [
        ("correct", "verdict", ACCEPTED),
        ("Correct", "verdict", ACCEPTED),
        (" CORRECT ", "review", ACCEPTED),
        ("Wrong", "verdict", REJECTED),
        ("WRONG", "my_choices", REJECTED),
    ],
)
def test_the_verdict_is_found_by_type_in_any_case(choice, from_name, kind):
    label = parse_annotation(annotation(verdict(choice, from_name=from_name)))
    assert label.kind == kind and label.verdict == choice.strip().lower()


@pytest.mark.parametrize("kind", ["textarea", "labels", "taxonomy", None])
def test_a_verdict_word_outside_a_choices_region_is_no_verdict(kind):
    label = parse_annotation(annotation(verdict("correct", kind=kind)))
    assert label.verdict is None and label.kind == EMPTY


def test_other_choices_are_no_verdict():
    label = parse_annotation(annotation(verdict("unsure"), verdict("blurry", from_name="q")))
    assert label.verdict is None and label.kind == EMPTY


def test_prediction_pairs_reads_a_prediction():
    prediction = {
        "id": 55,
        "model_version": "0.0.3",
        "score": 0.87,
        "result": [
            {
                "id": "p42-l", "from_name": "keypoints", "to_name": "image",
                "type": "keypointlabels", "original_width": 1280, "original_height": 960,
                "image_rotation": 0, "score": 0.93, "readonly": False,
                "value": {"x": 58.10, "y": 38.05, "width": 0.5, "keypointlabels": ["left_pupil"]},
            },
            {
                "id": "p42-r", "from_name": "keypoints", "to_name": "image",
                "type": "keypointlabels", "original_width": 1280, "original_height": 960,
                "image_rotation": 0, "score": 0.81,
                "value": {"x": 41.25, "y": 37.92, "width": 0.5, "keypointlabels": ["right_pupil"]},
            },
        ],
    }  # fmt: skip
    [pair] = prediction_pairs(prediction)
    np.testing.assert_allclose(pair.left_pupil, px(58.10, 38.05))
    np.testing.assert_allclose(pair.right_pupil, px(41.25, 37.92))
    assert prediction_pairs({"result": []}) == ()
    assert prediction_pairs({"result": None}) == ()
    assert prediction_pairs({}) == ()


# -- random junk -------------------------------------------------------------------------------

KEY = st.text(max_size=8)
SCALAR = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
JSON = st.recursive(
    SCALAR,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEY, inner, max_size=3),
    max_leaves=8,
)
# Whatever json.loads can give, shallow containers as likely as scalars, and numbers too big
# for a float (json.loads reads a 400-digit integer literal as an int).
JUNK = st.one_of(
    st.lists(SCALAR, max_size=3),
    st.dictionaries(KEY, SCALAR, max_size=3),
    st.integers(min_value=10**308, max_value=10**320),
    SCALAR,
    JSON,
)


def _or_junk(strategy):
    return strategy | JUNK


PUPIL_LABEL = st.sampled_from([["left_pupil"], ["right_pupil"]])
ORIGIN = st.sampled_from(["manual", "prediction", "prediction-changed"])
PARENT = st.sampled_from(["faceA", "faceB"])


@st.composite
def nearly_good_points(draw):
    """A usable pupil point with up to two of its fields replaced by junk."""
    region = {
        "type": "keypointlabels",
        "value": {
            "x": draw(st.floats(0, 100)),
            "y": draw(st.floats(0, 100)),
            "keypointlabels": draw(PUPIL_LABEL),
        },
        "original_width": draw(st.integers(1, 4000)),
        "original_height": draw(st.integers(1, 4000)),
        "origin": draw(ORIGIN),
        "parentID": draw(PARENT),
    }
    fields = ["origin", "original_width", "x", "parentID", "keypointlabels", "y"]
    for key in draw(st.sets(st.sampled_from(fields), min_size=1, max_size=2)):
        target = region["value"] if key in region["value"] else region
        if draw(st.integers(0, 3)):
            target[key] = draw(JUNK)
        else:
            del target[key]
    return region


VALUE = st.fixed_dictionaries(
    {},
    optional={
        "x": _or_junk(st.floats(0, 100)),
        "y": _or_junk(st.floats(0, 100)),
        "keypointlabels": _or_junk(PUPIL_LABEL),
        "choices": _or_junk(st.lists(st.sampled_from(["correct", "Wrong", "maybe"]))),
    },
)
JUNK_REGION = st.fixed_dictionaries(
    {},
    optional={
        "type": _or_junk(st.sampled_from(["keypointlabels", "choices", "rectanglelabels"])),
        "value": _or_junk(VALUE),
        "original_width": _or_junk(st.integers(1, 4000)),
        "original_height": _or_junk(st.integers(1, 4000)),
        "origin": _or_junk(ORIGIN),
        "parentID": _or_junk(PARENT),
    },
)
OTHER_FIELDS = {
    "was_cancelled": _or_junk(st.booleans()),
    "parent_prediction": _or_junk(st.integers(0, 100)),
}
ANNOTATION = st.fixed_dictionaries(
    {"result": st.lists(nearly_good_points() | JUNK_REGION | JUNK, min_size=1, max_size=6)},
    optional=OTHER_FIELDS,
) | st.fixed_dictionaries({}, optional={"result": JUNK, **OTHER_FIELDS})


@settings(max_examples=300, deadline=None)
@given(ANNOTATION)
def test_random_junk_never_raises(body):
    label = parse_annotation(body)
    assert label.kind in (POINTS, ACCEPTED, REJECTED, SKIPPED, EMPTY)
    assert label.teaches == (label.kind in (POINTS, ACCEPTED))
    for pair in label.pairs:
        assert np.isfinite(pair.left_pupil).all() and np.isfinite(pair.right_pupil).all()
    for pair in prediction_pairs(body):
        assert pair.left_pupil.shape == (2,) and pair.right_pupil.shape == (2,)
