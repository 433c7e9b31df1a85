"""The fine regressor's parts: crops, augmentation, network head, inference, training."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from synthetic_eyes import dark_dots, dot_samples

from backend.evaluation import group_split, person_of
from backend.regressor.augment import NONE, Augmentation, augment, centre_crops, window_origin
from backend.regressor.crops import MODEL_GEOMETRY, face_crops, mirror_points
from backend.regressor.inference import predict_crops
from backend.regressor.network import NetworkConfig, SoftArgmax, build_network, keras, tf
from backend.regressor.training import (
    TrainConfig,
    face_errors,
    fit,
    label_offset,
    predict_samples,
)

IN_W, IN_H = MODEL_GEOMETRY.size


# --- crops ----------------------------------------------------------------------------------


def test_face_crops_map_points_both_ways_and_mirror_the_left_pupil_eye(
    face_detector, astronaut_grey, astronaut_pupils
):
    face = face_detector.detect(astronaut_grey)[0]
    crops = face_crops(astronaut_grey, face.landmarks)
    assert crops.pixels.shape == (2, IN_H, IN_W)
    for row, name in enumerate(("left_pupil", "right_pupil")):
        canonical = crops.from_image(row, astronaut_pupils[name])
        np.testing.assert_allclose(crops.to_image(row, canonical)[0], astronaut_pupils[name])
        # the pupil is inside the crop, near its centre
        assert 0.3 * IN_W < canonical[0, 0] < 0.7 * IN_W
        assert 0.3 * IN_H < canonical[0, 1] < 0.7 * IN_H
    # row 0 holds the subject's LEFT eye mirrored: its crop equals the plain crop flipped
    np.testing.assert_array_equal(crops.pixels[0], crops.crops[0].pixels[:, ::-1])
    np.testing.assert_array_equal(crops.pixels[1], crops.crops[1].pixels)
    # mirrored, both eyes look alike: the nose side (brighter) is on the same side of the crop
    halves = [(p[:, IN_W // 2 :].mean() - p[:, : IN_W // 2].mean()) for p in crops.pixels]
    assert np.sign(halves[0]) == np.sign(halves[1])


def test_mirror_points_is_an_involution_about_the_pixel_grid():
    pts = np.array([[0.0, 3.0], [63.0, 1.0], [10.25, 7.5]])
    np.testing.assert_allclose(mirror_points(pts, 64)[:, 0], [63.0, 0.0, 52.75])
    np.testing.assert_allclose(mirror_points(mirror_points(pts, 64), 64), pts)


# --- augmentation ---------------------------------------------------------------------------


def test_augmented_labels_follow_the_pixels():
    rng = np.random.default_rng(1)
    ox, oy = window_origin()
    images, centres = dark_dots(64, rng, margin=(ox + 12, oy + 10))
    strong = Augmentation(blur=0.0, noise=0.0, low_res=0.0, mirror=0.5)
    out, points = augment(images, centres, np.random.default_rng(2), strong)
    assert out.shape == (64, IN_H, IN_W) and out.dtype == np.float32
    found = []
    for image in out:
        smooth = np.asarray(image, np.float64)
        weights = np.clip(smooth.max() - smooth - 0.5 * np.ptp(smooth), 0, None)
        yy, xx = np.mgrid[0 : image.shape[0], 0 : image.shape[1]]
        found.append([np.sum(weights * xx) / weights.sum(), np.sum(weights * yy) / weights.sum()])
    errors = np.linalg.norm(np.array(found) - points, axis=1)
    assert np.median(errors) < 0.5 and errors.max() < 1.5


def test_no_augmentation_is_the_centre_window():
    rng = np.random.default_rng(3)
    images, centres = dark_dots(4, rng)
    out, points = augment(images, centres, rng, NONE)
    plain, plain_points = centre_crops(images, centres)
    np.testing.assert_allclose(out, plain, atol=1e-3)
    np.testing.assert_allclose(points, plain_points, atol=1e-6)
    ox, oy = window_origin()
    np.testing.assert_allclose(plain_points, centres - [ox, oy], atol=1e-4)


# --- network head and inference -------------------------------------------------------------


def test_soft_argmax_decodes_a_peak_to_its_cell_centre_and_measures_spread():
    layer = SoftArgmax(40, 64)
    logits = np.full((2, 20, 32, 1), -50.0, np.float32)
    logits[0, 5, 7, 0] = 50.0  # one sharp peak at stride 2: x = 2*7 + 0.5, y = 2*5 + 0.5
    logits[1] = 0.0  # flat: the centre, wide spread
    xy, spread = (t.numpy() for t in layer(tf.constant(logits)))
    np.testing.assert_allclose(xy[0], [14.5, 10.5], atol=1e-3)
    np.testing.assert_allclose(xy[1], [31.5, 19.5], atol=1e-3)
    assert spread[0, 0] < 0.01 < 10.0 < spread[1, 0]


class DarkestPixel(keras.layers.Layer):
    """An oracle 'network': the darkest pixel's position, exactly (tests the plumbing)."""

    def call(self, x):
        flat = tf.reshape(x, [tf.shape(x)[0], -1])
        index = tf.argmin(flat, axis=-1, output_type=tf.int32)
        width = tf.shape(x)[2]
        xy = tf.cast(tf.stack([index % width, index // width], axis=-1), tf.float32)
        return {"xy": xy, "spread": tf.ones_like(xy[:, :1])}


def test_predict_crops_undoes_the_mirror_of_its_test_time_augmentation():
    crops = np.full((3, IN_H, IN_W), 200.0, np.float32)
    dots = [(5, 7), (40, 30), (63, 0)]
    for crop, (x, y) in zip(crops, dots, strict=True):
        crop[y, x] = 0.0
    oracle_input = keras.Input((IN_H, IN_W, 1))
    oracle = keras.Model(oracle_input, DarkestPixel()(oracle_input))
    out = predict_crops(oracle, crops)
    np.testing.assert_allclose(out.xy, dots)
    np.testing.assert_allclose(out.tta, 0.0)
    assert predict_crops(oracle, np.zeros((0, IN_H, IN_W))).xy.shape == (0, 2)


def test_compact_network_shapes_and_speed_budget():
    model = build_network(NetworkConfig())
    out = model(np.zeros((4, IN_H, IN_W, 1), np.float32), training=False)
    assert out["xy"].shape == (4, 2) and out["spread"].shape == (4, 1)
    assert model.count_params() < 500_000  # small enough for ~1 ms per crop on a CPU


# --- training -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dots_train_val():
    return dot_samples(160, seed=10), dot_samples(40, seed=11)


@pytest.fixture(scope="module")
def dots_model(dots_train_val):
    train, val = dots_train_val
    config = TrainConfig(epochs=6, batch_size=32, learning_rate=3e-3)
    return fit(train, val, config, progress=False)


def test_training_learns_to_find_a_dark_pupil(dots_train_val, dots_model):
    """A real fit: after a few epochs the network finds the dot far better than chance."""
    train, val = dots_train_val
    model, history = dots_model
    prediction = predict_samples(model, val)
    pixel_errors = np.linalg.norm(prediction.xy - val.truth, axis=-1)
    untrained = predict_samples(build_network(NetworkConfig()), val)
    chance = np.linalg.norm(untrained.xy - val.truth, axis=-1)
    assert np.median(pixel_errors) < 1.5 < 4.0 < np.median(chance)
    assert history[-1]["loss_px"] < history[0]["loss_px"]
    assert history[-1]["val_e05"] >= 0.8
    # face_errors: the worse eye in image pixels over the interocular distance
    expected = (pixel_errors / val.scale).max(axis=1) / val.interocular
    np.testing.assert_allclose(face_errors(prediction.xy, val), expected, rtol=1e-6)


def test_label_offset_recovers_a_labelling_convention_in_image_axes(dots_train_val, dots_model):
    """Labels 1.5 px right of the pupil in the IMAGE: + in one crop, - in the mirrored one."""
    train, val = dots_train_val
    model, _ = dots_model
    shift = np.array([1.5, 0.0])
    shifted = dataclasses.replace(train, truth=train.truth + train.image_offset_to_crop(shift))
    np.testing.assert_allclose(shifted.truth[:, 0, 0] - train.truth[:, 0, 0], -3.0, rtol=1e-5)
    np.testing.assert_allclose(shifted.truth[:, 1, 0] - train.truth[:, 1, 0], 3.0, rtol=1e-5)
    offset = label_offset(model, shifted, "truth")
    np.testing.assert_allclose(offset, shift, atol=0.4)
    plain = predict_samples(model, val).xy
    moved = predict_samples(model, val, offset).xy
    np.testing.assert_allclose(
        val.crop_to_image_offset(moved - plain)[:, :, :],
        np.broadcast_to(offset, moved.shape),
        atol=1e-4,
    )


def test_a_fixed_seed_gives_the_same_model(dots_train_val):
    train, val = dots_train_val
    small = train.subset(np.arange(48))
    config = TrainConfig(epochs=2, batch_size=16)
    runs = [fit(small, None, config, progress=False) for _ in range(2)]
    other = fit(small, None, TrainConfig(epochs=2, batch_size=16, seed=1), progress=False)
    a, b, c = (predict_samples(m, val).xy for m, _ in (*runs, other))
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert np.abs(a - c).max() > 1e-3
    assert runs[0][1] == runs[1][1]


def test_coarse_labels_train_on_the_coarse_points(dots_train_val):
    train, _ = dots_train_val
    assert np.array_equal(train.targets("coarse"), train.coarse)
    assert np.array_equal(train.targets("truth"), train.truth)
    with pytest.raises(ValueError, match="truth.*coarse"):
        train.targets("people")


# --- splits ---------------------------------------------------------------------------------


def test_people_stay_on_one_side_of_a_split():
    files = [f"lfw/Ann_Smith_{i:04d}.jpg" for i in range(1, 6)] + [
        f"net/_{a}_{i}_0.jpg" for a in (0, 20) for i in range(200)
    ]
    groups = np.array([person_of(f) for f in files])
    assert set(groups[:5]) == {"Ann_Smith"}
    assert person_of("lfw_5590/Luiz_Inacio_Lula_da_Silva_0012.jpg") == "Luiz_Inacio_Lula_da_Silva"
    for own in ("net_7876/_-20_1045_3.jpg", "img_0001.jpg", "IMG_0001.jpg", "a/face_000.png"):
        assert person_of(own) == own
    mask = group_split(groups, 0.25, seed=0)
    assert mask[:5].all() or not mask[:5].any()
    assert 0.15 < mask.mean() < 0.35
    # adding faces never moves a face that was already assigned
    more = group_split(np.concatenate([groups, ["new_person"]]), 0.25, seed=0)
    assert np.array_equal(more[:-1], mask)
    with pytest.raises(ValueError):
        group_split(groups, 1.0, seed=0)
    # tiny sets still get both sides
    for n in range(2, 12):
        mask = group_split(np.array([f"f{i}" for i in range(n)]), 0.05, seed=0)
        assert 0 < mask.sum() < n
