"""``bench data check`` on VOC-sized files (pytest-benchmark; the ratio to the single-process check is
printed at the end): 256 images of 500 x 375 (JPEG, quality 90, photo-like noise) with palette PNG
masks in the VOC layout, checked by one process (the reference) and by a pool of 2 and of all
available cores. Issue 19's goal: >= 3x the single process on 2 cores.
"""
import os

import numpy as np
import pytest
from PIL import Image

from bench.data.readers import open_source

N_IMAGES = 256  # a few hundred: the pool's start-up is paid once per check, as on a real split


@pytest.fixture(scope="module")
def voc_sized(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500]
    ids = [f"2007_{i:06d}" for i in range(N_IMAGES)]
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    for i, image_id in enumerate(ids):
        base = np.stack([(xx * (i % 7 + 1)) % 256, (yy * (i % 5 + 1)) % 256, ((xx + yy) * 3) % 256], -1)
        image = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.jpg", quality=90)
        mask = np.zeros((375, 500), np.uint8)
        mask[100:300, 150:400] = 1 + i % 20
        mask[98:100, 150:400] = 255  # VOC's object borders
        palette = Image.fromarray(mask, "P")
        palette.putpalette([v for k in range(256) for v in (k, (37 * k) % 256, (91 * k) % 256)])
        palette.save(root / "SegmentationClass" / f"{image_id}.png")
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids) + "\n")
    return root


@pytest.mark.parametrize("workers", [1, 2, "cores"])
def test_data_check(benchmark, voc_sized, workers):
    if workers == "cores":
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    benchmark.group = "data-check"
    benchmark.extra_info["reference"] = workers == 1
    source = open_source("voc", voc_sized)
    counts = benchmark(source.check, ["train"], False, workers)
    assert counts["distinct images checked"] == N_IMAGES
