"""``bench data check`` on VOC-sized files (pytest-benchmark; ratios printed at the end): 1,024 images
of 500 x 375 (JPEG, quality 90, photo-like noise) with palette PNG masks in the VOC layout. The
reference is the check as it was when issue 19 was filed: one process reading every image and mask
as a run reads them (full-size decode, masks as int64 tensors). Against it: ``check`` with 1 worker
(this process), 2, and all available cores. Issue 19's goal: >= 3x the reference on 2 cores.
"""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from bench.data.readers import open_source

# fewer than any real split (VOC's smallest, train, has 1,464; Cityscapes train 2,975): the worker
# pool's start-up (about 70 ms for 2 DataLoader workers) is paid once per check, as on a real split
N_IMAGES = 1024
N_DISTINCT = 140  # distinct files, copied to make N_IMAGES: decoding costs the same per file, writing
# a thousand noisy JPEGs does not (CI runs this file once, with benchmarks disabled)


@pytest.fixture(scope="module")
def voc_sized(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500]
    ids = [f"2007_{i:06d}" for i in range(N_IMAGES)]
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    for i, image_id in enumerate(ids[:N_DISTINCT]):
        base = np.stack([(xx * (i % 7 + 1)) % 256, (yy * (i % 5 + 1)) % 256, ((xx + yy) * 3) % 256], -1)
        image = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.jpg", quality=90)
        mask = np.zeros((375, 500), np.uint8)
        mask[100:300, 150:400] = 1 + i % 20
        mask[98:100, 150:400] = 255  # VOC's object borders
        palette = Image.fromarray(mask, "P")
        palette.putpalette([v for k in range(256) for v in (k, (37 * k) % 256, (91 * k) % 256)])
        palette.save(root / "SegmentationClass" / f"{image_id}.png")
    for i, image_id in enumerate(ids[N_DISTINCT:], N_DISTINCT):
        source = ids[i % N_DISTINCT]
        for folder, ext in (("JPEGImages", "jpg"), ("SegmentationClass", "png")):
            (root / folder / f"{image_id}.{ext}").write_bytes((root / folder / f"{source}.{ext}").read_bytes())
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids) + "\n")
    return root


def reference_check(root, ids):
    """The check as it was when issue 19 was filed, written out: per id, the image decoded at full size
    as a run reads it, the mask decoded, its distinct values found with a bincount and checked, its
    size compared with the image header's, and the mask made an int64 tensor."""
    for image_id in ids:
        with Image.open(root / "JPEGImages" / f"{image_id}.jpg") as im:
            image = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
        with Image.open(root / "SegmentationClass" / f"{image_id}.png") as im:
            assert im.mode in ("L", "P", "I", "I;16")
            labels = np.asarray(im)
        values = np.flatnonzero(np.bincount(labels.ravel(), minlength=1))
        assert not values[((values < 0) | (values >= 21)) & (values != 255)].size
        with Image.open(root / "JPEGImages" / f"{image_id}.jpg") as im:
            assert labels.shape == (im.size[1], im.size[0]) == tuple(image.shape[1:])
        torch.from_numpy(labels.astype(np.int64))
    return {"distinct images checked": len(ids)}


@pytest.mark.parametrize("workers", ["reference", 1, 2, "cores"])
def test_data_check(benchmark, voc_sized, workers):
    if workers == "cores":
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    benchmark.group = "data-check"
    benchmark.extra_info["reference"] = workers == "reference"
    source = open_source("voc", voc_sized)
    if workers == "reference":
        counts = benchmark(reference_check, voc_sized, source.split_ids("train"))
    else:
        counts = benchmark(source.check, ["train"], False, workers)
    assert counts["distinct images checked"] == N_IMAGES
