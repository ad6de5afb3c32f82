"""BlazeFace, the Face Mesh and the mesh depth maps on real faces that scikit-image ships
(astronaut, cameraman, the LFW subset), faceless images, and the z-buffer on hand-made meshes."""

import hashlib
import re

import cv2
import numpy as np
import pytest
from skimage import data as skdata

from d2am_jax.data import facemesh, faces


def _rgb(img):
    return np.ascontiguousarray(np.stack([img] * 3, -1) if img.ndim == 2 else img)


ASTRONAUT = skdata.astronaut()
CAMERAMAN = _rgb(skdata.camera())
# The astronaut's face, by hand from the image: forehead to chin, ear to ear (x0, y0, x1, y1).
ASTRONAUT_FACE = (170, 60, 285, 185)
CAMERAMAN_FACE = (165, 95, 275, 215)
FACELESS = {"coffee": skdata.coffee(), "rocket": skdata.rocket(),
            "immunohistochemistry": skdata.immunohistochemistry()}


def iou(a, b):
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    ix = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    iy = max(0, min(ay + ah, by + bh) - max(ay, by))
    return ix * iy / (aw * ah + bw * bh - ix * iy)


def inside(box, region):
    x, y, w, h = box
    return region[0] <= x and region[1] <= y and x + w <= region[2] and y + h <= region[3]


def test_the_shipped_model_files_are_the_mediapipe_ones():
    readme = open(f"{facemesh.MODEL_DIR}/README.md").read()
    for path in (facemesh.DETECTOR_PATH, facemesh.MESH_PATH):
        digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
        assert digest in readme, path
    assert facemesh.model_available()
    tris = facemesh.mesh_triangles()
    assert tris.shape == (900, 3) and tris.min() == 0 and tris.max() == 467
    assert len(np.unique(tris)) == 468


@pytest.mark.parametrize("image, region", [(ASTRONAUT, ASTRONAUT_FACE),
                                           (CAMERAMAN, CAMERAMAN_FACE)])
def test_blazeface_finds_the_face_with_a_sensible_box(image, region):
    face = facemesh.detect_face(image)
    assert face is not None and face.score > 0.7
    x, y, w, h = face.int_box()
    assert inside((x, y, w, h), region)
    assert 0.5 * (region[2] - region[0]) < w < region[2] - region[0]
    assert 0.8 < w / h < 1.25
    # the eyes lie in the box's upper half, the mouth below them
    (rx, ry), (lx, ly), _, (mx, my) = face.keypoints[:4]
    assert y < ry < y + h / 2 and y < ly < y + h / 2 and my > max(ry, ly)
    assert rx < lx  # the person's right eye is on the image's left


def test_blazeface_agrees_with_haar_on_the_astronaut_and_finds_the_cameraman_it_misses():
    face = facemesh.detect_face(ASTRONAUT)
    assert iou(face.int_box(), faces.detect_face(ASTRONAUT)) > 0.5
    assert faces.detect_face(CAMERAMAN) is None
    assert facemesh.find_face_box(CAMERAMAN, "auto")[1] == "blazeface"
    assert facemesh.find_face_box(CAMERAMAN, "haar") == (None, "")


@pytest.mark.parametrize("name", sorted(FACELESS))
def test_an_image_without_a_face_has_no_detection(name):
    assert facemesh.detect_face(FACELESS[name]) is None
    assert facemesh.find_face_box(FACELESS[name], "auto") == (None, "")


def test_lfw_faces_are_found_and_non_faces_are_not():
    """skimage's LFW subset: 100 faces then 100 non-faces, 25×25 gray, here upscaled to 100 px
    on a 160 px canvas (every 3rd of each, for speed)."""
    lfw = skdata.lfw_subset()

    def canvas(i):
        img = cv2.resize(_rgb((lfw[i] * 255).astype(np.uint8)), (100, 100),
                         interpolation=cv2.INTER_CUBIC)
        return cv2.copyMakeBorder(img, 30, 30, 30, 30, cv2.BORDER_REPLICATE)

    found = [facemesh.detect_face(canvas(i)) for i in range(0, 100, 3)]
    assert sum(f is not None for f in found) >= 0.9 * len(found)
    assert sum(facemesh.detect_face(canvas(i)) is not None for i in range(100, 200, 3)) <= 1
    central = []
    for i, face in zip(range(0, 100, 3), found):
        if face is None:
            continue
        points, presence = facemesh.mesh_landmarks(canvas(i), face)
        depth = facemesh.depth_from_landmarks(points, 160)
        iy, ix = np.unravel_index(depth.argmax(), depth.shape)
        x, y, w, h = face.box
        central.append(presence > 0.5 and x + w / 3 <= ix <= x + 2 * w / 3
                       and y + h / 3 <= iy <= y + 2 * h / 3)
    assert np.mean(central) >= 0.75


@pytest.fixture(scope="module")
def astronaut_depth():
    face = facemesh.detect_face(ASTRONAUT)
    points, presence = facemesh.mesh_landmarks(ASTRONAUT, face)
    return face, points, presence, facemesh.depth_from_landmarks(points, ASTRONAUT.shape[0])


def test_mesh_landmarks_cover_the_face(astronaut_depth):
    face, points, presence, _ = astronaut_depth
    assert presence > 0.9 and points.shape == (468, 3)
    x, y, w, h = face.box
    # the mesh spans the face box (forehead above it), no landmark strays far from it
    assert points[:, 0].min() > x - 0.3 * w and points[:, 0].max() < x + 1.3 * w
    assert points[:, 1].min() > y - 0.5 * h and points[:, 1].max() < y + 1.3 * h
    nose_tip = points[4]   # landmark 4: the nose tip, MediaPipe's canonical numbering
    assert points[4, 2] <= np.quantile(points[:, 2], 0.02)  # among the nearest (smallest z)
    assert x + w / 3 <= nose_tip[0] <= x + 2 * w / 3


def test_depth_is_a_face_nearest_at_the_nose_and_zero_outside(astronaut_depth):
    face, points, _, depth = astronaut_depth
    x, y, w, h = face.box
    assert depth.dtype == np.float32 and depth.min() == 0.0 and depth.max() <= 1.0
    assert depth.max() > 0.99
    iy, ix = np.unravel_index(depth.argmax(), depth.shape)
    assert x + w / 3 <= ix <= x + 2 * w / 3 and y + h / 3 <= iy <= y + 2 * h / 3
    far = np.ones_like(depth, bool)
    far[max(0, int(y - 0.5 * h)):int(y + 1.5 * h), max(0, int(x - 0.5 * w)):int(x + 1.5 * w)] = 0
    assert np.all(depth[far] == 0)
    centre = depth[int(y + h / 4):int(y + 3 * h / 4), int(x + w / 4):int(x + 3 * w / 4)]
    assert np.all(centre > 0)  # the closed eyes and mouth leave no holes


def test_depth_is_nearly_symmetric_about_the_nose(astronaut_depth):
    face, points, _, depth = astronaut_depth
    x, y, w, h = face.box
    cx = int(round(points[4, 0]))
    half = int(w / 2)
    rows = slice(int(y), int(y + h))
    left = depth[rows, cx - half:cx][:, ::-1]
    right = depth[rows, cx + 1:cx + 1 + half]
    covered = (left > 0) | (right > 0)
    assert np.abs(left - right)[covered].mean() < 0.05


def test_depth_of_a_mirrored_face_is_the_mirrored_depth(astronaut_depth):
    _, _, _, depth = astronaut_depth
    mirrored = np.ascontiguousarray(ASTRONAUT[:, ::-1])
    face = facemesh.detect_face(mirrored)
    points, _ = facemesh.mesh_landmarks(mirrored, face)
    again = facemesh.depth_from_landmarks(points, ASTRONAUT.shape[0])
    face_px = (depth > 0) | (again[:, ::-1] > 0)
    assert np.abs(again[:, ::-1] - depth)[face_px].mean() < 0.05


def test_crop_depth_on_a_face_crop_and_mesh_error_on_a_faceless_one():
    face = facemesh.detect_face(ASTRONAUT)
    crop = faces.crop_face(ASTRONAUT, face.int_box(), 0.25, 128)
    depth = facemesh.crop_depth(crop)
    assert depth.shape == (128, 128) and depth.max() > 0.99
    iy, ix = np.unravel_index(depth.argmax(), depth.shape)
    assert 128 / 3 <= ix <= 2 * 128 / 3 and 128 / 3 <= iy <= 2 * 128 / 3
    for corner in (depth[:12, :12], depth[:12, -12:], depth[-12:, :12], depth[-12:, -12:]):
        assert corner.max() == 0  # the crop's corners are background
    assert facemesh.crop_depth(crop, 32).shape == (32, 32)
    coffee = faces.resize_square(FACELESS["coffee"], 128)
    with pytest.raises(facemesh.MeshError, match=re.escape("finds no face in the crop")):
        facemesh.crop_depth(coffee)


def test_zbuffer_interpolates_and_keeps_the_nearest_surface():
    xy = np.array([[0, 0], [8, 0], [0, 8], [0, 0], [8, 0], [0, 8]], np.float64)
    height = np.array([0.0, 1.0, 0.0, 0.5, 0.5, 0.5])
    tris = np.array([[0, 1, 2], [3, 4, 5]])
    grid = facemesh.zbuffer(xy, height, tris, 10)
    # pixel (row 1, col 2): centre (2.5, 1.5); the ramp triangle gives x / 8 = 0.3125 < 0.5
    assert grid[1, 2] == pytest.approx(0.5)
    # pixel (row 0, col 6): centre (6.5, 0.5), inside; ramp 0.8125 beats the flat 0.5
    assert grid[0, 6] == pytest.approx(6.5 / 8)
    assert np.isnan(grid[9, 9]) and np.isnan(grid[5, 5])  # outside the hypotenuse x + y = 8
    alone = facemesh.zbuffer(xy[:3], height[:3], tris[:1], 10)
    covered = ~np.isnan(alone)
    assert covered.sum() == 36  # pixel centres (i + ½, j + ½) with i + j ≤ 7: 8 + 7 + … + 1


def test_flat_mesh_is_a_mesh_error():
    points = np.zeros((468, 3), np.float32)
    with pytest.raises(facemesh.MeshError, match="flat"):
        facemesh.depth_from_landmarks(points, 16)
