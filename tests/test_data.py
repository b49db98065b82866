import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from bench import BenchError
from bench.data import synth
from bench.data.folder import FolderSource
from bench.data.views import ImageDataset, LabeledDataset, StepBatchSampler, TaggedDataset, TrainAugment, normalize
from bench.protocol import LabeledSpec
from bench.splits import ids_sha256, select_labeled


def _tree_digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_synth_is_byte_identical_for_the_same_seed(tmp_path):
    a = synth.generate(tmp_path / "a", seed=5, num_train=6, num_val=2, size=48, progress=False)
    b = synth.generate(tmp_path / "b", seed=5, num_train=6, num_val=2, size=48, progress=False)
    assert _tree_digest(a) == _tree_digest(b)
    c = synth.generate(tmp_path / "c", seed=6, num_train=6, num_val=2, size=48, progress=False)
    assert _tree_digest(a)["images/00000.png"] != _tree_digest(c)["images/00000.png"]


def test_synth_has_stuff_and_things_and_valid_labels():
    seen = set()
    for i in range(40):
        image, mask = synth.make_image(0, i, 64)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        values = set(np.unique(mask).tolist())
        assert values <= set(range(len(synth.CLASSES))) | {255}
        seen |= values
    assert seen == set(range(len(synth.CLASSES))) | {255}


def test_folder_source_reads_synth_and_derives_tags(tmp_path):
    root = synth.generate(tmp_path / "s", seed=0, num_train=4, num_val=2, size=32, progress=False)
    src = FolderSource.open(root)
    assert src.class_names == synth.CLASSES
    ids = src.split_ids("train")
    assert len(ids) == 4 and len(src.split_ids("val")) == 2
    tags = src.image_tags(ids)
    for row, image_id in enumerate(ids):
        mask = src.load_mask(image_id)
        expected = torch.zeros(len(synth.CLASSES))
        expected[mask[mask != 255].unique()] = 1
        assert torch.equal(tags[row], expected)


def _folder(tmp_path, mask_array, image_bytes=None):
    root = tmp_path / "ds"
    for sub in ("images", "masks", "splits"):
        (root / sub).mkdir(parents=True)
    (root / "classes.txt").write_text("0 a\n1 b\n255 ignore\n")
    (root / "splits" / "train.txt").write_text("x\n")
    if image_bytes is None:
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "images" / "x.png")
    else:
        (root / "images" / "x.jpg").write_bytes(image_bytes)
    Image.fromarray(mask_array).save(root / "masks" / "x.png")
    return FolderSource.open(root)


def test_out_of_range_mask_value_names_file_and_value(tmp_path):
    src = _folder(tmp_path, np.array([[0, 1], [7, 255]], np.uint8))
    with pytest.raises(BenchError, match=r"x\.png has label 7 outside 0\.\.1"):
        src.load_mask("x")


def test_bad_mask_value_named_is_the_first_in_raster_order(tmp_path):
    src = _folder(tmp_path, np.array([[0, 9], [7, 255]], np.uint8))
    with pytest.raises(BenchError, match=r"x\.png has label 9 outside 0\.\.1"):
        src.load_mask("x")


def test_16_bit_mask_values_are_checked(tmp_path):
    src = _folder(tmp_path, np.array([[0, 1], [300, 255]], np.uint16))
    with pytest.raises(BenchError, match=r"x\.png has label 300 outside 0\.\.1"):
        src.load_mask("x")


def test_colour_mask_is_rejected(tmp_path):
    src = _folder(tmp_path, np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(BenchError, match="RGB image; expected a single-channel index mask"):
        src.load_mask("x")


def test_corrupt_image_names_the_file(tmp_path):
    src = _folder(tmp_path, np.zeros((4, 4), np.uint8), image_bytes=b"not a jpeg")
    with pytest.raises(BenchError, match=r"cannot read image .*x\.jpg"):
        src.load_image("x")


def test_missing_parts_are_named(tmp_path):
    with pytest.raises(BenchError, match="does not exist"):
        FolderSource.open(tmp_path / "nope")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "classes.txt").write_text("0 a\n")
    with pytest.raises(BenchError, match="missing images"):
        FolderSource.open(tmp_path / "d")
    src = _folder(tmp_path, np.zeros((4, 4), np.uint8))
    with pytest.raises(BenchError, match="split 'val' not found"):
        src.split_ids("val")
    with pytest.raises(BenchError, match="mask for id 'y' not found"):
        src.load_mask("y")


def test_split_ids_may_not_leave_the_folder(tmp_path):
    src = _folder(tmp_path, np.zeros((4, 4), np.uint8))
    (src.root / "splits" / "evil.txt").write_text("../../etc/passwd\n")
    with pytest.raises(BenchError, match="tries to leave the dataset folder"):
        src.split_ids("evil")


def test_labeled_selection_is_seeded_and_documented(tmp_path):
    ids = [f"{i:03d}" for i in range(100)]
    a = select_labeled(ids, LabeledSpec(ratio=0.125, seed=0))
    b = select_labeled(list(reversed(ids)), LabeledSpec(ratio=0.125, seed=0))
    assert a.ids == b.ids and len(a.ids) == 12 and a.ids == sorted(a.ids)
    assert a.sha256 == ids_sha256(a.ids) == hashlib.sha256(("\n".join(a.ids) + "\n").encode()).hexdigest()
    assert select_labeled(ids, LabeledSpec(ratio=0.125, seed=1)).ids != a.ids
    assert len(select_labeled(ids, LabeledSpec(count=7)).ids) == 7


def test_labeled_split_file(tmp_path):
    ids = [f"{i:03d}" for i in range(10)]
    f = tmp_path / "list.txt"
    f.write_text("003\nJPEGImages/005.jpg SegmentationClassAug/005.png\n")
    split = select_labeled(ids, LabeledSpec(split_file=str(f)))
    assert split.ids == ["003", "005"] and split.source == f"file:{f}"
    f.write_text("003\n999\n")
    with pytest.raises(BenchError, match="line 2: id '999' is not in the training split"):
        select_labeled(ids, LabeledSpec(split_file=str(f)))


def test_image_dataset_cannot_reach_masks(tmp_path):
    root = synth.generate(tmp_path / "s", seed=0, num_train=4, num_val=2, size=32, progress=False)
    src = FolderSource.open(root)
    ids = src.split_ids("train")
    for ds in (ImageDataset(src, ids, None), TaggedDataset(src, ids, None, src.image_tags(ids))):
        assert not hasattr(ds.source, "load_mask")
        assert "mask" not in ds[(0, 0)]
    assert "mask" in LabeledDataset(src, ids, None)[(0, 0)]


def test_augment_keeps_image_and_mask_aligned():
    image = torch.zeros(3, 20, 30, dtype=torch.uint8)
    image[:, :, 15:] = 255
    mask = torch.zeros(20, 30, dtype=torch.int64)
    mask[:, 15:] = 1
    aug = TrainAugment(crop=16, scale=(0.5, 2.0))
    for seed in range(20):
        img, m = aug(image, mask, torch.Generator().manual_seed(seed))
        assert img.shape == (3, 16, 16) and m.shape == (16, 16)
        # away from the 0/1 edge (bilinear vs nearest differ by one pixel there), the image agrees
        # with the mask everywhere it is labeled: class 1 is white, class 0 black
        interior = (m != 255) & (m == m.roll(1, -1)) & (m == m.roll(-1, -1))
        white = img[0] > 127
        assert torch.equal(white[interior], m[interior] == 1)


def test_step_sampler_is_a_function_of_the_step():
    full = list(StepBatchSampler(7, 3, seed=0, view="v", start_step=0, total_steps=10))
    resumed = list(StepBatchSampler(7, 3, seed=0, view="v", start_step=4, total_steps=10))
    assert full[4:] == resumed
    # each epoch visits every index once
    flat = [i for batch in full for i, _ in batch]
    assert sorted(flat[:7]) == list(range(7)) and sorted(flat[7:14]) == list(range(7))


def test_unlabeled_view_marks_the_padding_of_a_zoom_out(tmp_path):
    """``valid`` is False exactly where the crop is padding, and giving it costs no random draw: the
    images are those the augmentation makes without it (and the labeled view's mask agrees)."""
    root = synth.generate(tmp_path / "s", seed=0, num_train=4, num_val=2, size=32, progress=False)
    src = FolderSource.open(root)
    ids = src.split_ids("train")
    aug = TrainAugment(crop=48, scale=(0.5, 1.0))  # always smaller than the crop: padded right and below
    unlabeled, labeled = ImageDataset(src, ids, aug), LabeledDataset(src, ids, aug)
    for seed in range(4):
        item = unlabeled[(0, seed)]
        image, _ = aug(src.load_image(ids[0]), None, torch.Generator().manual_seed(seed))
        assert torch.equal(item["image"], normalize(image))
        valid = item["valid"]
        assert valid.dtype == torch.bool and valid.shape == (48, 48) and 0 < valid.sum() < 48 * 48
        mask = labeled[(0, seed)]["mask"]  # the same draws: padding is ignore there
        assert valid[mask != 255].all() and (mask[~valid] == 255).all()
        rows, cols = valid.any(1), valid.any(0)  # the image is one block (padded below and right, maybe flipped)
        assert torch.equal(valid, rows[:, None] & cols[None, :]) and rows[0]
