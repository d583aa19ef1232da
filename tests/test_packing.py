"""jaxtal.pack_labels, pack_rotated_labels and pack_masks (host side): YOLO label rows (and keypoints, masks)
padded into fixed ``(b, M)`` GT slots.

Expectations are hand-worked or computed by the NumPy packer ``oracles.np_pack``.
"""

from __future__ import annotations

import chex
import numpy as np
import pytest

import jaxtal
from support.oracles import np_pack


class TestPackLabels:

  ROWS = np.array([
      [1, 2, 0.50, 0.50, 0.20, 0.40],
      [0, 0, 0.25, 0.75, 0.50, 0.10],
      [1, 1, 0.10, 0.20, 0.10, 0.10],
      [0, 4, 0.90, 0.10, 0.05, 0.15],
      [1, 0, 0.60, 0.60, 0.30, 0.30],
  ], np.float32)

  def test_ordering_within_images_and_padding(self):
    gt = jaxtal.pack_labels(self.ROWS, batch_size=3, max_boxes=4, image_size=(100, 200))
    chex.assert_shape([gt.labels, gt.boxes, gt.mask], [(3, 4), (3, 4, 4), (3, 4)])
    assert (gt.labels.dtype, gt.boxes.dtype, gt.mask.dtype) == (np.int32, np.float32, bool)
    labels, boxes, mask = np_pack(self.ROWS.astype(np.float64), 3, 4, (100, 200))
    np.testing.assert_array_equal(gt.labels, labels)
    np.testing.assert_allclose(gt.boxes, boxes, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(gt.mask, mask)
    np.testing.assert_array_equal(gt.labels[0, :2], [0, 4])  # image 0: rows 1, 3 in that order
    np.testing.assert_array_equal(gt.labels[1, :3], [2, 1, 0])  # image 1: rows 0, 2, 4
    np.testing.assert_array_equal(gt.mask[2], False)  # image 2 has no labels: all padding
    assert np.all(gt.boxes[~gt.mask] == 0) and np.all(gt.labels[~gt.mask] == 0)

  def test_no_labels(self):
    for rows in (np.zeros((0, 6), np.float32), np.zeros((0,)), []):
      gt = jaxtal.pack_labels(rows, batch_size=2, max_boxes=3, image_size=(64, 64))
      chex.assert_shape([gt.labels, gt.boxes, gt.mask], [(2, 3), (2, 3, 4), (2, 3)])
      np.testing.assert_array_equal(gt.mask, False)
      np.testing.assert_array_equal(gt.boxes, 0)

  def test_exactly_max_boxes_fits(self):
    gt = jaxtal.pack_labels(self.ROWS, batch_size=2, max_boxes=3, image_size=(100, 200))
    np.testing.assert_array_equal(gt.mask.sum(1), [2, 3])

  @pytest.mark.parametrize("row,col,value,match", [
      (2, 0, 2.0, "row 2"),
      (1, 0, -1.0, "row 1"),
      (3, 0, 0.5, "row 3"),
      (1, 1, -1.0, "row 1"),
      (4, 1, 1.5, "row 4"),
      (2, 3, np.nan, "row 2"),
      (0, 4, np.inf, "row 0"),
  ], ids=["batch_index_too_large", "batch_index_negative", "batch_index_not_whole", "class_negative", "class_not_whole", "nan_centre", "inf_width"])
  def test_bad_row_raises_naming_it(self, row, col, value, match):
    rows = self.ROWS.copy()
    rows[row, col] = value
    with pytest.raises(ValueError, match=rf"\b{match}\b"):
      jaxtal.pack_labels(rows, batch_size=2, max_boxes=4, image_size=(100, 200))

  def test_too_many_rows_for_one_image_names_the_first_extra_row(self):
    # Image 1 owns rows 0, 2, 4: with max_boxes = 2 its third box, row 4, is the one that does not fit.
    with pytest.raises(ValueError, match=r"\brow 4\b.*image 1"):
      jaxtal.pack_labels(self.ROWS, batch_size=2, max_boxes=2, image_size=(100, 200))

  @pytest.mark.parametrize("rows,match", [
      (np.zeros((3, 5)), "shape"),
      (np.zeros((3, 6, 1)), "shape"),
      (np.zeros((6,)), "shape"),
  ])
  def test_wrong_shape_raises(self, rows, match):
    with pytest.raises(ValueError, match=match):
      jaxtal.pack_labels(rows, batch_size=2, max_boxes=2, image_size=(64, 64))

  def test_bad_sizes_raise(self):
    for kw, match in (
        (dict(batch_size=0, max_boxes=2, image_size=(64, 64)), "batch_size"),
        (dict(batch_size=2, max_boxes=0, image_size=(64, 64)), "max_boxes"),
        (dict(batch_size=2, max_boxes=2, image_size=(64,)), "image_size"),
        (dict(batch_size=2, max_boxes=2, image_size=(0, 64)), "image_size"),
    ):
      with pytest.raises(ValueError, match=match):
        jaxtal.pack_labels(self.ROWS[:1], **kw)


  def test_image_size_as_one_int_is_a_square_input(self):
    square = jaxtal.pack_labels(self.ROWS, batch_size=2, max_boxes=4, image_size=640)
    pair = jaxtal.pack_labels(self.ROWS, batch_size=2, max_boxes=4, image_size=(640, 640))
    for x, y in zip(square, pair):
      np.testing.assert_array_equal(x, y)
    _, boxes, _ = np_pack(self.ROWS.astype(np.float64), 2, 4, (640, 640))
    np.testing.assert_allclose(square.boxes, boxes, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(jaxtal.pack_labels(self.ROWS, 2, 4, np.int64(320)).boxes, boxes / 2, rtol=1e-6, atol=1e-4)

  def test_a_list_of_per_image_arrays(self):
    per_image = [
        np.array([[0, 0.25, 0.75, 0.50, 0.10], [4, 0.90, 0.10, 0.05, 0.15]]),  # image 0, no batch index
        np.array([[2, 0.50, 0.50, 0.20, 0.40], [1, 0.10, 0.20, 0.10, 0.10], [0, 0.60, 0.60, 0.30, 0.30]]),
        np.zeros((0, 5)),  # image 2: no labels
    ]
    gt = jaxtal.pack_labels(per_image, batch_size=3, max_boxes=4, image_size=(100, 200))
    rows = np.concatenate([np.c_[np.full(len(x), i), x] for i, x in enumerate(per_image)])
    labels, boxes, mask = np_pack(rows, 3, 4, (100, 200))
    np.testing.assert_array_equal(gt.labels, labels)
    np.testing.assert_allclose(gt.boxes, boxes, rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(gt.mask, mask)
    # The same as the (n, 6) rows they stand for.
    for x, y in zip(gt, jaxtal.pack_labels(self.ROWS, batch_size=3, max_boxes=4, image_size=(100, 200))):
      np.testing.assert_array_equal(x, y)

  def test_a_ragged_list_gives_a_clear_error(self):
    # Arrays of different widths: a message about the labels, not NumPy's "inhomogeneous shape".
    ragged = [np.zeros((2, 5)), np.zeros((1, 4))]
    with pytest.raises(ValueError, match=r"one \(n_i, 5\) array per image .* widths \[4, 5\]") as info:
      jaxtal.pack_labels(ragged, batch_size=2, max_boxes=4, image_size=64)
    assert "inhomogeneous" not in str(info.value)
    with pytest.raises(ValueError, match=r"one \(n_i, 5\) array per image \(batch_size = 3\).*got 2 arrays"):
      jaxtal.pack_labels([np.zeros((2, 5)), np.zeros((1, 5))], batch_size=3, max_boxes=4, image_size=64)
    # Rows of mixed lengths in one list.
    with pytest.raises(ValueError, match=r"labels must be one \(n, 6\) array.*mixed shapes") as info:
      jaxtal.pack_labels([[0, 1, 0.5, 0.5, 0.1, 0.1], [0, 1, 0.5]], batch_size=2, max_boxes=4, image_size=64)
    assert "inhomogeneous" not in str(info.value)

  @pytest.mark.parametrize("col,value", [
      (4, 1e29),
      (2, 1e29),
      (3, -1e25),
      (5, 1e37),
  ], ids=["side_1e29", "centre_1e29", "centre_negative_1e25", "side_beyond_float32"])
  def test_coordinates_beyond_coord_limit_are_rejected_naming_the_row(self, col, value):
    rows = self.ROWS.astype(np.float64)
    rows[3, col] = value
    # (1e37 * 640 overflows float32 to inf inside pack_labels: NumPy's overflow warning is expected.)
    with pytest.raises(ValueError, match=r"label row 3 has a box coordinate beyond 1\.04858e\+06 pixels"), \
        np.errstate(over="ignore"):
      jaxtal.pack_labels(rows, batch_size=2, max_boxes=4, image_size=640)

  def test_coordinate_exactly_at_coord_limit_is_kept(self):
    # cx = 1 on a 2**20-pixel-wide input: x1 = x2 = 2**20 = COORD_LIMIT exactly (a zero-width box, valid data).
    assert jaxtal.COORD_LIMIT == 2.0**20
    size = int(jaxtal.COORD_LIMIT)
    gt = jaxtal.pack_labels(np.array([[0, 1, 1.0, 0.5, 0.0, 0.5]]), batch_size=1, max_boxes=1, image_size=size)
    np.testing.assert_array_equal(gt.boxes[0, 0], [2.0**20, 2.0**18, 2.0**20, 3 * 2.0**18])
    with pytest.raises(ValueError, match="label row 0 has a box coordinate beyond"):
      jaxtal.pack_labels(np.array([[0, 1, 1.0, 0.5, 0.001, 0.5]]), batch_size=1, max_boxes=1, image_size=size)

  def test_image_size_errors(self):
    for size in ((64,), (0, 64), -5, (np.inf, 64), "640", True):
      with pytest.raises(ValueError, match="image_size"):
        jaxtal.pack_labels(self.ROWS[:1], batch_size=2, max_boxes=2, image_size=size)


def test_huge_normalised_values_are_named_without_a_numpy_warning():
  import warnings

  rows = np.array([[0, 1, 0.5, 0.5, 1e37, 0.2]], np.float32)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # an overflow RuntimeWarning would fail here
    with pytest.raises(ValueError, match=r"label row 0 has a box coordinate beyond"):
      jaxtal.pack_labels(rows, 1, 2, 640)


class TestPackKeypoints:
  """pack_labels(..., keypoints=): pose keypoints padded beside the boxes (hand-worked values)."""

  ROWS = TestPackLabels.ROWS

  def keypoints(self, d=3):
    k = np.zeros((5, 2, d))
    k[:, :, 0] = np.arange(5)[:, None] / 10 + np.array([0.0, 0.05])  # x: row / 10 (+ 0.05 for keypoint 1)
    k[:, :, 1] = 0.5
    if d == 3:
      k[:, :, 2] = [[2, 1], [0, 2], [1, 1], [2, 0], [1, 2]]
    return k

  def test_keypoints_follow_their_rows_in_pixels(self):
    gt = jaxtal.pack_labels(self.ROWS, 3, 4, (100, 200), keypoints=self.keypoints())
    chex.assert_shape(gt.keypoints, (3, 4, 2, 3))
    assert gt.keypoints.dtype == np.float32
    # Image 1 holds rows 0, 2, 4 in that order; x scales by the width 200, y by the height 100.
    np.testing.assert_allclose(gt.keypoints[1, :3, 0, 0], [0.0, 40.0, 80.0], atol=1e-5)
    np.testing.assert_allclose(gt.keypoints[1, :3, 1, 0], [10.0, 50.0, 90.0], atol=1e-5)
    np.testing.assert_allclose(gt.keypoints[..., 1][gt.mask], 50.0)
    np.testing.assert_array_equal(gt.keypoints[0, :2, :, 2], [[0, 2], [2, 0]])  # image 0: rows 1, 3
    np.testing.assert_array_equal(gt.keypoints[~gt.mask], 0.0)  # padding rows are zero

  def test_two_values_per_keypoint_means_all_visible(self):
    gt = jaxtal.pack_labels(self.ROWS, 3, 4, (100, 200), keypoints=self.keypoints(d=2))
    chex.assert_shape(gt.keypoints, (3, 4, 2, 3))
    np.testing.assert_array_equal(gt.keypoints[..., 2][gt.mask], 1.0)
    np.testing.assert_array_equal(gt.keypoints[..., 2][~gt.mask], 0.0)

  @pytest.mark.parametrize("axis,value", [
      (0, -0.01),
      (0, 1.2),
      (1, -3.0),
      (1, 1.0001),
  ])
  def test_a_keypoint_outside_the_image_becomes_unlabelled_and_clipped(self, axis, value):
    k = self.keypoints()
    k[1, 0, axis] = value  # row 1 = image 0, slot 0, keypoint 0 (visibility 0 before; make it 2)
    k[1, 0, 2] = 2
    gt = jaxtal.pack_labels(self.ROWS, 3, 4, (100, 200), keypoints=k)
    assert gt.keypoints[0, 0, 0, 2] == 0.0
    assert gt.keypoints[0, 0, 0, axis] == (200.0, 100.0)[axis] * float(np.clip(value, 0, 1))
    assert gt.keypoints[0, 0, 1, 2] == 2.0  # its other keypoint is untouched

  def test_keypoints_on_the_border_stay_labelled(self):
    k = self.keypoints()
    k[1, 0] = [1.0, 0.0, 2]
    gt = jaxtal.pack_labels(self.ROWS, 3, 4, (100, 200), keypoints=k)
    np.testing.assert_array_equal(gt.keypoints[0, 0, 0], [200.0, 0.0, 2.0])

  def test_a_list_of_per_image_keypoints(self):
    k = self.keypoints()
    per_image = [self.ROWS[self.ROWS[:, 0] == i, 1:] for i in range(3)]
    per_image_k = [k[self.ROWS[:, 0] == i] for i in range(3)]
    got = jaxtal.pack_labels(per_image, 3, 4, (100, 200), keypoints=per_image_k)
    want = jaxtal.pack_labels(self.ROWS, 3, 4, (100, 200), keypoints=k)
    np.testing.assert_array_equal(got.keypoints, want.keypoints)

  @pytest.mark.parametrize("k,match", [
      (np.zeros((4, 2, 3)), "one row per label row"),
      (np.zeros((5, 2, 4)), r"D = 2 \(x, y\) or 3"),
      (np.zeros((5, 6)), r"\(n, K, D\)"),
  ])
  def test_bad_keypoint_shapes_raise(self, k, match):
    with pytest.raises(ValueError, match=match):
      jaxtal.pack_labels(self.ROWS, 3, 4, (100, 200), keypoints=k)

  def test_a_non_finite_keypoint_names_its_row(self):
    k = self.keypoints()
    k[3, 1, 0] = np.nan
    with pytest.raises(ValueError, match="label row 3 have a non-finite"):
      jaxtal.pack_labels(self.ROWS, 3, 4, (100, 200), keypoints=k)


class TestPackMasks:
  """pack_masks: per-instance binary masks drawn into per-image index maps."""

  def test_slots_follow_row_order_and_later_rows_win(self):
    masks = np.zeros((4, 3, 4), bool)
    masks[0, :2, :2] = True  # image 1, slot 0
    masks[1, :, :] = True  # image 0, slot 0
    masks[2, 1:, 1:3] = True  # image 1, slot 1: drawn over row 0 where they overlap
    masks[3, 0, 3] = True  # image 1, slot 2
    out = jaxtal.pack_masks(masks, np.array([1, 0, 1, 1]), batch_size=3, max_boxes=3)
    assert (out.shape, out.dtype) == ((3, 3, 4), np.int32)
    np.testing.assert_array_equal(out[0], 1)
    np.testing.assert_array_equal(out[1], [[1, 1, 0, 3], [1, 2, 2, 0], [0, 2, 2, 0]])
    np.testing.assert_array_equal(out[2], 0)

  def test_slots_match_pack_labels(self):
    rng = np.random.default_rng(0)
    bidx = rng.integers(0, 3, 7)
    rows = np.c_[bidx, np.arange(7) % 3, rng.uniform(0.3, 0.7, (7, 2)), np.full((7, 2), 0.1)]
    masks = np.zeros((7, 5, 5), np.float32)
    for r in range(7):
      masks[r, r % 5, r // 5] = 1.0  # one distinct pixel per row
    out = jaxtal.pack_masks(masks, bidx[:, None], 3, 4)
    gt = jaxtal.pack_labels(rows, 3, 4, 64)
    for r in range(7):
      slot = out[bidx[r], r % 5, r // 5] - 1
      assert gt.labels[bidx[r], slot] == r % 3
      np.testing.assert_allclose(gt.boxes[bidx[r], slot, :2], (rows[r, 2:4] - 0.05) * 64, rtol=1e-5)

  def test_no_instances(self):
    out = jaxtal.pack_masks(np.zeros((0, 4, 6), bool), np.zeros((0,)), 2, 5)
    np.testing.assert_array_equal(out, np.zeros((2, 4, 6), np.int32))

  @pytest.mark.parametrize("masks,bidx,match", [
      (np.zeros((2, 4)), np.zeros(2), r"\(n, mh, mw\)"),
      (np.zeros((2, 4, 4)), np.zeros(3), r"batch_idx must be \(n,\)"),
      (np.full((2, 4, 4), 0.5), np.zeros(2), "binary"),
      (np.zeros((2, 4, 4)), np.array([0, 2]), "batch index"),
      (np.zeros((3, 4, 4)), np.zeros(3), "max_boxes is 2"),
  ])
  def test_bad_input_raises(self, masks, bidx, match):
    with pytest.raises(ValueError, match=match):
      jaxtal.pack_masks(masks, bidx, 2, 2)


# ----------------------------------------------------------------------------- pack_rotated_labels


def test_pack_rotated_labels_hand_worked():
  rows = np.array(
      [
          [1, 2, 0.5, 0.25, 0.5, 0.125, 0.3],
          [0, 1, 0.25, 0.5, 0.25, 0.5, -0.7],
          [1, 0, 0.75, 0.75, 0.125, 0.25, 1.5707964],
      ],
      np.float32,
  )
  gt = jaxtal.pack_rotated_labels(rows, 3, 3, (64, 128))  # height 64, width 128
  assert gt.boxes.shape == (3, 3, 5) and gt.boxes.dtype == np.float32 and gt.labels.dtype == np.int32
  np.testing.assert_array_equal(gt.mask, [[True, False, False], [True, True, False], [False, False, False]])
  np.testing.assert_array_equal(gt.labels, [[1, 0, 0], [2, 0, 0], [0, 0, 0]])
  np.testing.assert_array_equal(gt.boxes[0, 0], np.float32([32.0, 32.0, 32.0, 32.0, -0.7]))
  np.testing.assert_array_equal(gt.boxes[1, 0], np.float32([64.0, 16.0, 64.0, 8.0, 0.3]))  # rows keep their order
  np.testing.assert_array_equal(gt.boxes[1, 1], np.float32([96.0, 48.0, 16.0, 16.0, 1.5707964]))
  assert not gt.boxes[2].any() and not gt.boxes[0, 1:].any()
  # The list form (no batch index) gives the same.
  per_image = [rows[rows[:, 0] == i, 1:] for i in range(3)]
  listed = jaxtal.pack_rotated_labels(per_image, 3, 3, (64, 128))
  for a, b in zip(listed, gt):
    np.testing.assert_array_equal(a, b)


def test_pack_rotated_labels_drops_rows_under_two_pixels_and_they_take_no_slot():
  size = 64
  px = lambda v: v / size  # noqa: E731
  rows = np.array(
      [
          [0, 0, 0.5, 0.5, px(1.99), px(10), 0.1],  # dropped (width)
          [0, 1, 0.5, 0.5, px(10), px(1.5), 0.1],  # dropped (height)
          [0, 2, 0.5, 0.5, px(2.0), px(2.0), 0.1],  # exactly 2 px: kept
          [0, 1, 0.4, 0.4, px(8), px(8), 0.0],
          [1, 0, 0.5, 0.5, px(0.5), px(0.5), 0.0],  # dropped: image 1 is empty
      ],
      np.float32,
  )
  gt = jaxtal.pack_rotated_labels(rows, 2, 2, size)  # M = 2 is enough: dropped rows take no slot
  np.testing.assert_array_equal(gt.mask, [[True, True], [False, False]])
  np.testing.assert_array_equal(gt.labels[0], [2, 1])
  np.testing.assert_allclose(gt.boxes[0, 0, 2:4], [2.0, 2.0])
  # The error names the row in the caller's numbering (row 4), counting kept rows only.
  with pytest.raises(ValueError, match=r"label row 4 is box 3 of image 0, which has 3 boxes; max_boxes is 2"):
    jaxtal.pack_rotated_labels(np.concatenate([rows[:3], rows[3:4], rows[3:4]]), 2, 2, size)


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ([2, 0, 0.5, 0.5, 0.1, 0.1, 0.0], r"label row 0 has batch index 2\.0, expected a whole number in \[0, 2\)"),
        ([0, -1, 0.5, 0.5, 0.1, 0.1, 0.0], r"label row 0 has class -1\.0, expected a whole number >= 0"),
        ([0, 0, 0.5, np.nan, 0.1, 0.1, 0.0], r"label row 0 has a non-finite value"),
        ([0, 0, 0.5, 0.5, 0.1, 0.1, np.inf], r"label row 0 has a non-finite value"),
        ([0, 0, 0.5, 0.5, 1e5, 0.1, 0.0], r"label row 0 has a box coordinate beyond 1\.04858e\+06 pixels"),
        ([0, 0, 0.5, 0.5, 0.1, 0.1, 2e6], r"label row 0 has a box coordinate beyond"),
    ],
)
def test_pack_rotated_labels_errors(row, match):
  with pytest.raises(ValueError, match=match):
    jaxtal.pack_rotated_labels(np.array([row], np.float64), 2, 3, 64)


def test_pack_rotated_labels_shape_errors_and_empty():
  with pytest.raises(ValueError, match=r"labels must have shape \(n, 7\)"):
    jaxtal.pack_rotated_labels(np.zeros((2, 6), np.float32), 2, 3, 64)
  gt = jaxtal.pack_rotated_labels(np.zeros((0, 7), np.float32), 2, 3, 64)
  assert gt.boxes.shape == (2, 3, 5) and not gt.mask.any()


# ----------------------------------------------------------------------------- mistakes of a new user


class TestNewUserMistakes:
  """Label rows in pixels, class ids beyond ``num_classes``, a 1-D empty image in the list form and
  packing inside ``jit``: each is an error that names the row (or entry) and says what to do."""

  ROWS = TestPackLabels.ROWS
  NORMALISE = r"labels must be normalised to \[0, 1\] \(divide pixel coordinates by the image width/height\)"

  @pytest.mark.parametrize("col,value", [(2, 320.0), (3, 50.0), (4, 64.0), (5, 2.5)], ids=["cx", "cy", "w", "h"])
  def test_pixel_coordinates_are_rejected_naming_the_row(self, col, value):
    rows = self.ROWS.astype(np.float64)
    rows[2, col] = value
    with pytest.raises(ValueError, match=rf"pack_labels: label row 2 has a centre or size above 2 .*{self.NORMALISE}"):
      jaxtal.pack_labels(rows, 2, 4, 640)

  def test_a_whole_batch_in_pixels_is_rejected_at_its_first_row(self):
    # The case: every row in pixels of a 640 input (it packed silently and trained on "all background").
    rows = self.ROWS.astype(np.float64)
    rows[:, 2:6] *= 640
    with pytest.raises(ValueError, match=rf"label row 0 .*{self.NORMALISE}.*row = \[1\.0, 2\.0, 320\.0"):
      jaxtal.pack_labels(rows, 2, 4, 640)

  def test_pixels_of_a_large_source_image_get_the_hint_beside_the_coordinate_limit(self):
    # 1920-pixel coordinates scaled by a 1024 input pass COORD_LIMIT first: the message says both.
    rows = np.array([[0, 1, 1500.0, 900.0, 50.0, 80.0]])
    with pytest.raises(ValueError, match=rf"label row 0 has a box coordinate beyond 1\.04858e\+06 pixels.*; {self.NORMALISE}"):
      jaxtal.pack_labels(rows, 1, 4, 1024)
    # Beyond COORD_LIMIT for another reason (a huge negative centre): no normalisation hint.
    with pytest.raises(ValueError, match="beyond") as info:
      jaxtal.pack_labels(np.array([[0, 1, -1e29, 0.5, 0.1, 0.1]]), 1, 4, 64)
    assert "normalised" not in str(info.value)

  @pytest.mark.parametrize("value", [1.0, 1.001, 1.3, 2.0])
  def test_rows_slightly_outside_the_image_are_still_data(self, value):
    # A box partly off the image (augmentation without clipping), or larger than it: accepted up to 2.
    rows = np.array([[0, 1, value, 0.5, value, 0.2], [0, 0, 0.5, value, 0.2, value]])
    gt = jaxtal.pack_labels(rows, 1, 2, (100, 200))
    # Independent expectation: xyxy = (cx -+ w/2, cy -+ h/2) scaled by (width 200, height 100).
    want = [[(value - value / 2) * 200, 40.0, (value + value / 2) * 200, 60.0],
            [80.0, (value - value / 2) * 100, 120.0, (value + value / 2) * 100]]
    np.testing.assert_allclose(gt.boxes[0], want, rtol=1e-6)
    np.testing.assert_array_equal(gt.mask, [[True, True]])

  def test_just_above_the_limit_is_rejected(self):
    rows = np.array([[0, 1, 0.5, 0.5, 0.2, float(np.nextafter(2.0, 3.0))]])
    with pytest.raises(ValueError, match=rf"label row 0 .*{self.NORMALISE}"):
      jaxtal.pack_labels(rows, 1, 2, 64)

  def test_rotated_rows_in_pixels_are_rejected(self):
    rows = np.array([[0, 0, 0.5, 0.5, 0.1, 0.1, 0.3], [1, 2, 300.0, 200.0, 40.0, 20.0, 0.3]])
    with pytest.raises(ValueError, match=rf"pack_rotated_labels: label row 1 has a centre or size above 2 .*{self.NORMALISE}"):
      jaxtal.pack_rotated_labels(rows, 2, 2, 640)
    # The angle column is radians, not normalised: a large angle is no pixel coordinate.
    gt = jaxtal.pack_rotated_labels(np.array([[0, 0, 0.5, 0.5, 0.1, 0.1, 3.0]]), 1, 1, 640)
    assert gt.boxes[0, 0, 4] == np.float32(3.0)

  def test_num_classes_rejects_a_class_id_out_of_range_naming_the_row(self):
    with pytest.raises(ValueError, match=r"pack_labels: label row 3 has class 4\.0, expected a class id in \[0, num_classes = 4\)"):
      jaxtal.pack_labels(self.ROWS, 2, 4, 640, num_classes=4)
    gt = jaxtal.pack_labels(self.ROWS, 2, 4, 640, num_classes=5)  # ids 0..4 fit 5 classes
    np.testing.assert_array_equal(gt.labels[0, :2], [0, 4])
    rot = np.array([[0, 0, 0.5, 0.5, 0.1, 0.1, 0.0], [0, 3, 0.5, 0.5, 0.1, 0.1, 0.0]])
    with pytest.raises(ValueError, match=r"pack_rotated_labels: label row 1 has class 3\.0, expected a class id in \[0, num_classes = 3\)"):
      jaxtal.pack_rotated_labels(rot, 1, 2, 640, num_classes=3)
    with pytest.raises(ValueError, match=r"num_classes must be a whole number >= 1, got 0"):
      jaxtal.pack_labels(self.ROWS, 2, 4, 640, num_classes=0)

  @pytest.mark.parametrize("empty", [np.zeros(0), [], np.zeros((0, 5)), np.zeros((0,), np.float32)],
                           ids=["zeros_0", "empty_list", "zeros_0x5", "zeros_0_float32"])
  def test_an_empty_image_in_the_list_form_may_be_any_size_0_array(self, empty):
    per_image = [np.array([[1, 0.5, 0.5, 0.2, 0.4]]), empty, np.array([[2, 0.25, 0.25, 0.1, 0.1]])]
    gt = jaxtal.pack_labels(per_image, 3, 2, 100)
    np.testing.assert_array_equal(gt.mask, [[True, False], [False, False], [True, False]])
    np.testing.assert_array_equal(gt.labels[:, 0], [1, 0, 2])
    np.testing.assert_allclose(gt.boxes[2, 0], [20.0, 20.0, 30.0, 30.0], rtol=1e-6)

  def test_an_empty_rotated_image_and_empty_keypoints_in_the_list_form(self):
    gt = jaxtal.pack_rotated_labels([np.zeros(0), np.array([[1, 0.5, 0.5, 0.25, 0.25, 0.1]])], 2, 1, 64)
    np.testing.assert_array_equal(gt.mask, [[False], [True]])
    kp = [np.zeros(0), np.full((1, 2, 3), 0.5)]
    gt = jaxtal.pack_labels([np.zeros(0), np.array([[1, 0.5, 0.5, 0.25, 0.25]])], 2, 1, 64, keypoints=kp)
    np.testing.assert_array_equal(gt.keypoints[1, 0], [[32.0, 32.0, 0.5], [32.0, 32.0, 0.5]])

  @pytest.mark.parametrize("entry,shape", [(np.zeros(5), r"\(5,\)"), (np.zeros((1, 4)), r"\(1, 4\)"), (np.zeros((2, 6)), r"\(2, 6\)")])
  def test_a_list_entry_of_the_wrong_shape_is_named(self, entry, shape):
    with pytest.raises(ValueError, match=rf"labels\[1\] has shape {shape} \(an image without labels is np\.zeros\(\(0, 5\)\)"):
      jaxtal.pack_labels([np.zeros((2, 5)), entry], 2, 4, 64)
    with pytest.raises(ValueError, match=r"labels\[0\] has shape \(3,\) \(an image without labels is np\.zeros\(\(0, 6\)\)"):
      jaxtal.pack_rotated_labels([np.zeros(3), np.zeros((1, 6))], 2, 4, 64)

  def test_packing_inside_jit_says_to_pack_on_the_host(self):
    import jax
    import jax.numpy as jnp

    want = r"is a traced JAX value .*packing runs on the host with NumPy, before the jitted step: call {0} outside jit" \
           r" and pass the GroundTruth it returns to the jitted step as an argument"
    with pytest.raises(TypeError, match=rf"pack_labels: labels {want.format('pack_labels')}"):
      jax.jit(lambda r: jaxtal.pack_labels(r, 2, 4, 64).boxes)(jnp.asarray(self.ROWS))
    with pytest.raises(TypeError, match=rf"pack_labels: labels {want.format('pack_labels')}"):
      jax.jit(lambda r: jaxtal.pack_labels([r, np.zeros((0, 5))], 2, 4, 64).boxes)(jnp.zeros((1, 5)))
    with pytest.raises(TypeError, match=rf"pack_rotated_labels: labels {want.format('pack_rotated_labels')}"):
      jax.jit(lambda r: jaxtal.pack_rotated_labels(r, 1, 4, 64).boxes)(jnp.zeros((1, 7)))
    with pytest.raises(TypeError, match=rf"pack_masks: instance_masks {want.format('pack_masks')}"):
      jax.jit(lambda m: jaxtal.pack_masks(m, np.zeros(1), 1, 2))(jnp.zeros((1, 4, 4)))
    # A concrete jax.Array (outside jit) is host data: packed as NumPy would be.
    gt = jaxtal.pack_labels(jnp.asarray(self.ROWS), 2, 4, 64)
    np.testing.assert_array_equal(gt.labels, jaxtal.pack_labels(self.ROWS, 2, 4, 64).labels)
