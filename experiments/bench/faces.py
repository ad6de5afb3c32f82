"""Frames/s of face detection (Haar vs BlazeFace) and of BlazeFace + Face Mesh + z-buffered depth
on a 640×480 frame, and the detectors' hit rates on scikit-image's LFW subset.

Prints one JSON line.  python experiments/bench/faces.py [--repeats 50] [--threads 0]
(--threads: OpenCV's thread count, 0 = its default.)
"""

from __future__ import annotations

import argparse
import json
import os
import time

import cv2
import numpy as np
from skimage import data as skdata

from d2am_jax.data import facemesh, faces


def frame_640x480() -> np.ndarray:
    """The astronaut's head and shoulders on a 640×480 canvas (face ~95 px, as in FAS videos)."""
    canvas = np.full((480, 640, 3), 120, np.uint8)
    canvas[40:440, 120:520] = cv2.resize(skdata.astronaut()[0:400, 60:460], (400, 400))
    return canvas


def rate(fn, repeats: int) -> dict:
    """Wall-clock frames/s, and CPU ms per frame (all threads; steadier than wall time on a
    shared machine)."""
    fn()  # first call loads the model / cascade
    t, c = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        fn()
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    return {"fps": round(repeats / wall, 1), "cpu_ms": round(1000 * cpu / repeats, 2)}


def lfw_rates() -> dict:
    lfw = skdata.lfw_subset()   # 100 faces, then 100 non-faces, 25×25 gray

    def canvas(i):
        img = cv2.resize(np.stack([(lfw[i] * 255).astype(np.uint8)] * 3, -1), (100, 100),
                         interpolation=cv2.INTER_CUBIC)
        return cv2.copyMakeBorder(img, 30, 30, 30, 30, cv2.BORDER_REPLICATE)

    imgs = [canvas(i) for i in range(200)]
    blaze = [facemesh.detect_face(im) is not None for im in imgs]
    haar = [faces.detect_face(im) is not None for im in imgs]
    return {"blazeface_faces_found": sum(blaze[:100]),
            "blazeface_non_faces_found": sum(blaze[100:]),
            "haar_faces_found": sum(haar[:100]), "haar_non_faces_found": sum(haar[100:])}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        cv2.setNumThreads(args.threads)
    frame = frame_640x480()
    face = facemesh.detect_face(frame)
    box = face.int_box()
    crop = faces.crop_face(frame, box, 0.25, 256)
    crop_points, _ = facemesh.mesh_landmarks(crop, facemesh.detect_face(crop))

    def full_pipeline(size=256):
        f = facemesh.detect_face(frame)
        c = faces.crop_face(frame, f.int_box(), 0.25, size)
        return facemesh.crop_depth(c)

    def haar_pipeline():
        b = faces.detect_face(frame)
        return faces.crop_face(frame, b, 0.25, 256)

    out = {
        "frame": "640x480, face ~95 px", "opencv": cv2.__version__,
        "opencv_threads": cv2.getNumThreads(), "cpus": os.cpu_count(),
        "haar_detect": rate(lambda: faces.detect_face(frame), args.repeats),
        "haar_detect_crop": rate(haar_pipeline, args.repeats),
        "blazeface_detect": rate(lambda: facemesh.detect_face(frame), args.repeats),
        "mesh_landmarks": rate(lambda: facemesh.mesh_landmarks(frame, face), args.repeats),
        "zbuffer_256": rate(lambda: facemesh.depth_from_landmarks(crop_points, 256),
                                args.repeats),
        "zbuffer_32": rate(lambda: facemesh.depth_from_landmarks(crop_points, 32, 32 / 256),
                               args.repeats),
        "crop_depth_256": rate(lambda: facemesh.crop_depth(crop), args.repeats),
        "detect_crop_mesh_depth_256": rate(full_pipeline, args.repeats),
        "detect_crop_mesh_depth_32": rate(lambda: full_pipeline(32), args.repeats),
        "lfw_subset": lfw_rates(),
    }
    out["load_average_1min"] = os.getloadavg()[0]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
