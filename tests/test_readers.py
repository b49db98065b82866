"""Dataset readers in their distribution layouts (VOC, Cityscapes, CamVid, folder), built tiny here:
paths, label mapping, `bench data check`, clear errors, and a 2-step run on each."""
import json

import numpy as np
import pytest
import yaml
from PIL import Image

from bench import BenchError
from bench.cli import main
from bench.data.readers import CITYSCAPES_TRAIN_IDS, open_source

from .conftest import TINY


def _image(path, seed, size=(40, 32)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _mask(path, values, mode="L", size=(40, 32)):
    """A mask whose left half holds values[0] and right half values[1]."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size[1], size[0]), values[0], np.uint8)
    arr[:, size[0] // 2:] = values[1]
    im = Image.fromarray(arr, "L")
    if mode == "P":
        im = im.convert("P")
        im.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
        im = Image.fromarray(arr, "P")
        im.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    im.save(path)


def make_voc(root, aug=True):
    ids = [f"2007_{i:06d}" for i in range(6)]
    for i, image_id in enumerate(ids):
        _image(root / "JPEGImages" / f"{image_id}.jpg", i)
        # VOC's own masks are palette PNGs (index = class), with 255 on object borders
        _mask(root / "SegmentationClass" / f"{image_id}.png", (0, 255 if i == 0 else 1 + i), mode="P")
        if aug:
            _mask(root / "SegmentationClassAug" / f"{image_id}.png", (0, 1 + i))
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("\n".join(ids[:4]) + "\n")
    (lists / "val.txt").write_text("\n".join(ids[4:]) + "\n")
    (lists / "train_aug.txt").write_text("\n".join(ids[:4]) + "\n")
    return ids


def test_data_check_with_two_workers_finds_what_one_finds(tmp_path, capsys, monkeypatch):
    """Faults planted in several files, some of them read by the second worker first: 1 and 2 workers
    name the same file each time (the first in list order), and once all are mended report alike."""
    from bench.data.folder import _CheckFiles

    monkeypatch.setattr(_CheckFiles, "CHUNK", 2)  # several chunks on this small set, so both workers read
    ids = make_voc(tmp_path / "voc")
    voc = tmp_path / "voc"
    aug = voc / "SegmentationClassAug"
    _mask(aug / f"{ids[3]}.png", (0, 40))  # no class and not ignore
    (voc / "JPEGImages" / f"{ids[2]}.jpg").write_bytes(b"not a jpeg")
    (aug / f"{ids[5]}.png").unlink()  # in val
    _mask(aug / f"{ids[1]}.png", (0, 2), size=(20, 32))  # not the image's size
    mends = {ids[1]: lambda: _mask(aug / f"{ids[1]}.png", (0, 2)), ids[2]: lambda: _image(voc / "JPEGImages" /
             f"{ids[2]}.jpg", 2), ids[3]: lambda: _mask(aug / f"{ids[3]}.png", (0, 3)),
             ids[5]: lambda: _mask(aug / f"{ids[5]}.png", (0, 5))}

    def check(workers):
        code = main(["data", "check", "--dataset", "voc", "--data-root", str(voc), "--no-progress",
                     "--workers", str(workers)])
        captured = capsys.readouterr()
        return code, captured.err, [line for line in captured.out.splitlines() if "images/s" not in line]

    for expected in (ids[1], ids[2], ids[3], ids[5]):
        one, two = check(1), check(2)
        assert one == two and one[0] == 2 and expected in one[1], (expected, one, two)
        mends[expected]()
    one, two = check(1), check(2)
    assert one == two and one[0] == 0 and "  distinct images checked  6" in one[2]


def make_camvid(root):
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        for i in range(n):
            _image(root / split / f"{split}_{i:03d}.png", i)
            _mask(root / f"{split}annot" / f"{split}_{i:03d}.png", (i % 11, 11))  # 11 = void


def make_cityscapes(root):
    for split, city, n in (("train", "aachen", 4), ("val", "lindau", 2)):
        for i in range(n):
            stem = f"{city}_{i:06d}_000019"
            _image(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", i)
            # label id 7 = road (train id 0), 26 = car (train id 13), 4 = static (ignored)
            _mask(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", (7, 26 if i % 2 else 4))


def make_coco(root):
    """Two things (person: supercategory person; car: vehicle) and two stuff classes (grass: plant;
    sky-other: sky), plus the rest of the 27 supercategories as categories no pixel uses."""
    import json

    things = ["person", "vehicle", "outdoor", "animal", "accessory", "sports", "kitchen", "food", "furniture",
              "electronic", "appliance", "indoor"]
    stuff = ["textile", "plant", "building", "structural", "furniture", "window", "floor", "ceiling", "wall",
             "raw-material", "ground", "sky", "water", "solid", "food"]
    cats_things = [{"id": i + 1, "name": f"thing{i}", "supercategory": s} for i, s in enumerate(things)]
    cats_stuff = [{"id": 92 + i, "name": f"stuff{i}", "supercategory": s} for i, s in enumerate(stuff)]
    cats_stuff.append({"id": 183, "name": "other", "supercategory": "other"})
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps({"categories": cats_things}))
    (root / "annotations" / "stuff_val2017.json").write_text(json.dumps({"categories": cats_stuff}))
    for split, n in (("train2017", 4), ("val2017", 2)):
        for i in range(n):
            image_id = f"{split[:1]}{i:011d}"
            _image(root / "images" / split / f"{image_id}.jpg", i)
            # stuffthingmaps values are id - 1: 0 = a person thing, 92 = the "plant" stuff (id 93)
            _mask(root / "annotations" / split / f"{image_id}.png", (0, 92 if i % 2 else 182))
        (root / "curated" / split).mkdir(parents=True)
        (root / "curated" / split / "Coco164kFull_Stuff_Coarse_7.txt").write_text(f"{split[:1]}{1:011d}\n")


def test_voc_prefers_sbd_masks_and_reads_palette_masks_as_indices(tmp_path):
    ids = make_voc(tmp_path / "voc")
    source = open_source("voc", tmp_path / "voc")
    assert source.num_classes == 21 and source.class_names[0] == "background"
    assert source.split_ids("train") == ids[:4]
    assert source.load_mask(ids[2]).unique().tolist() == [0, 3]
    plain = make_voc(tmp_path / "plain", aug=False)
    only_voc = open_source("voc", tmp_path / "plain")
    assert only_voc.mask_dir == "SegmentationClass"
    assert only_voc.load_mask(plain[0]).unique().tolist() == [0, 255]
    assert only_voc.load_mask(plain[3]).unique().tolist() == [0, 4]


def test_camvid_void_is_ignored_and_splits_are_the_folders(tmp_path):
    make_camvid(tmp_path / "camvid")
    source = open_source("camvid", tmp_path / "camvid")
    assert source.num_classes == 11
    assert source.split_ids("val") == ["val_000", "val_001"]
    assert source.load_mask("val_001").unique().tolist() == [1, 255]


def test_camvid_in_the_folder_layout_is_read_as_a_folder_dataset(tmp_path):
    """A CamVid copy converted to the generic layout (classes.txt, images/, masks/ with void 255,
    splits/) opens under the camvid layout too; a classes.txt of another dataset is named."""
    root = tmp_path / "camvid"
    names = ["sky", "building", "pole", "road", "sidewalk", "tree", "sign_symbol", "fence", "car", "pedestrian",
             "bicyclist"]
    (root / "splits").mkdir(parents=True)
    (root / "classes.txt").write_text("".join(f"{i} {n}\n" for i, n in enumerate(names)) + "255 void\n")
    for i in range(3):
        _image(root / "images" / f"0001TP_{i:06d}.png", i)
        _mask(root / "masks" / f"0001TP_{i:06d}.png", (i, 255))
    (root / "splits" / "train.txt").write_text("0001TP_000000\n0001TP_000001\n")
    (root / "splits" / "test.txt").write_text("0001TP_000002\n")
    source = open_source("camvid", root)
    assert source.class_names == names and source.split_ids("test") == ["0001TP_000002"]
    assert source.load_mask("0001TP_000001").unique().tolist() == [1, 255]
    (root / "classes.txt").write_text("0 sky\n1 ground\n")
    with pytest.raises(BenchError, match=r"camvid dataset at .*classes.txt lists 2 classes, CamVid has 11"):
        open_source("camvid", root)


def test_cityscapes_label_ids_map_to_train_ids_and_to_the_27_classes(tmp_path):
    make_cityscapes(tmp_path / "cs")
    source = open_source("cityscapes", tmp_path / "cs")
    assert source.num_classes == 19 and list(CITYSCAPES_TRAIN_IDS)[13] == 26
    ids = source.split_ids("train")
    assert ids[1] == "aachen_000001_000019"
    assert source.load_mask(ids[1]).unique().tolist() == [0, 13]
    assert source.load_mask(ids[0]).unique().tolist() == [0, 255]
    c27 = open_source("cityscapes27", tmp_path / "cs")
    c27.split_ids("train")
    assert c27.num_classes == 27 and c27.load_mask(ids[1]).unique().tolist() == [0, 19]


@pytest.mark.parametrize("layout,maker,expected", [
    ("voc", make_voc, {"train": 4, "val": 2, "train_aug": 4, "distinct images checked": 6}),
    ("camvid", make_camvid, {"train": 4, "val": 2, "test": 2, "distinct images checked": 8}),
    ("cityscapes", make_cityscapes, {"train": 4, "val": 2, "distinct images checked": 6}),
])
def test_data_check_counts_what_it_found(tmp_path, capsys, layout, maker, expected):
    maker(tmp_path / layout)
    assert main(["data", "check", "--dataset", layout, "--data-root", str(tmp_path / layout), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "OK" in out
    for name, n in expected.items():
        assert any(line.split()[-1] == str(n) and line.strip().startswith(name) for line in out.splitlines()), name


def test_data_check_names_the_first_bad_file(tmp_path, capsys):
    ids = make_voc(tmp_path / "voc")
    (tmp_path / "voc" / "SegmentationClassAug" / f"{ids[1]}.png").unlink()
    assert main(["data", "check", "--dataset", "voc", "--data-root", str(tmp_path / "voc"), "--no-progress"]) == 2
    assert f"SegmentationClassAug/{ids[1]}.png" in capsys.readouterr().err
    # a value that is no class and not ignore
    _mask(tmp_path / "voc" / "SegmentationClassAug" / f"{ids[1]}.png", (0, 40))
    with pytest.raises(BenchError, match=rf"{ids[1]}.png has label 40 outside 0..20"):
        open_source("voc", tmp_path / "voc").check(["train"], progress=False)
    # a colour mask where an index mask belongs
    Image.new("RGB", (40, 32), (128, 0, 0)).save(tmp_path / "voc" / "SegmentationClassAug" / f"{ids[1]}.png")
    with pytest.raises(BenchError, match="RGB image; expected a single-channel index mask"):
        open_source("voc", tmp_path / "voc").check(["train"], progress=False)
    # a corrupt image
    _mask(tmp_path / "voc" / "SegmentationClassAug" / f"{ids[1]}.png", (0, 2))
    (tmp_path / "voc" / "JPEGImages" / f"{ids[2]}.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(BenchError, match=rf"cannot read image .*{ids[2]}.jpg"):
        open_source("voc", tmp_path / "voc").check(["train"], progress=False)
    # a truncated JPEG (a download cut short): its header reads, its pixels do not; the check, which
    # decodes JPEGs at 1/8 scale, finds it as a run's full-size read does
    _image(tmp_path / "voc" / "JPEGImages" / f"{ids[2]}.jpg", 2)
    whole = (tmp_path / "voc" / "JPEGImages" / f"{ids[3]}.jpg").read_bytes()
    (tmp_path / "voc" / "JPEGImages" / f"{ids[3]}.jpg").write_bytes(whole[:len(whole) * 2 // 3])
    with pytest.raises(BenchError, match=rf"cannot read image .*{ids[3]}.jpg: image file is truncated"):
        open_source("voc", tmp_path / "voc").load_image(ids[3])
    with pytest.raises(BenchError, match=rf"cannot read image .*{ids[3]}.jpg: image file is truncated"):
        open_source("voc", tmp_path / "voc").check(["train"], progress=False)
    _image(tmp_path / "voc" / "JPEGImages" / f"{ids[3]}.jpg", 3)
    # an id that tries to leave the data root
    (tmp_path / "voc" / "ImageSets" / "Segmentation" / "val.txt").write_text("../../etc/passwd\n")
    with pytest.raises(BenchError, match="tries to leave the dataset folder"):
        open_source("voc", tmp_path / "voc").split_ids("val")


def test_missing_layout_parts_and_unknown_layouts_are_named(tmp_path):
    (tmp_path / "voc").mkdir()
    with pytest.raises(BenchError, match="voc dataset at .* is missing JPEGImages"):
        open_source("voc", tmp_path / "voc")
    with pytest.raises(BenchError, match="unknown dataset layout 'kitti'; valid: camvid, cityscapes"):
        open_source("kitti", tmp_path)


@pytest.mark.parametrize("layout,maker,splits", [
    ("voc", make_voc, ("train", "val")), ("camvid", make_camvid, ("train", "val")),
    ("cityscapes", make_cityscapes, ("train", "val")), ("cityscapes27", make_cityscapes, ("train", "val")),
    ("cocostuff27", make_coco, ("train2017", "val2017")),
])
def test_two_step_run_on_each_layout(tmp_path, layout, maker, splits):
    maker(tmp_path / layout)
    protocol = {**TINY, "name": f"tiny_{layout}",
                "dataset": {"name": layout, "train_split": splits[0], "eval_split": splits[1]},
                "labeled": {"ratio": 0.5, "seed": 0},
                "train": {**TINY["train"], "iterations": 2}}
    path = tmp_path / f"tiny_{layout}.yaml"
    path.write_text(yaml.safe_dump(protocol))
    assert main(["run", "--methods", "ce", "--protocol", str(path), "--data-root", str(tmp_path / layout),
                 "--results-dir", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c"), "--no-progress"]) == 0
    record = json.loads(next((tmp_path / "r").rglob("result.json")).read_text())
    assert record["dataset"]["name"] == layout and record["dataset"]["n_eval"] == 2
    assert record["split"]["n_labeled"] == 2


def test_cocostuff27_coarse_classes_come_from_the_supercategories(tmp_path):
    make_coco(tmp_path / "coco")
    source = open_source("cocostuff27", tmp_path / "coco")
    assert source.num_classes == 27
    assert source.class_names[:2] == ["accessory-things", "animal-things"] and "plant-stuff" in source.class_names
    ids = source.split_ids("train2017")
    assert len(ids) == 4 and source.split_ids("curated_train2017") == [ids[1]]
    person, plant = source.class_names.index("person-things"), source.class_names.index("plant-stuff")
    assert source.load_mask(ids[1]).unique().tolist() == sorted([person, plant])
    assert source.load_mask(ids[0]).unique().tolist() == [person, 255]  # 182 = "other": ignored


def test_resize_scales_images_and_masks_alike(tmp_path):
    make_voc(tmp_path / "voc")
    source = open_source("voc", tmp_path / "voc")
    source.resize = 16
    image, mask = source.load_image("2007_000002"), source.load_mask("2007_000002")
    assert image.shape[-2:] == mask.shape == (16, 20)
    assert mask.unique().tolist() == [0, 3]


def _protocol_file(tmp_path, layout, **over):
    data = {**TINY, "name": f"tiny_{layout}", "dataset": {"name": layout, "train_split": "train_aug",
                                                             "eval_split": "val"},
            "labeled": {"count": 2, "seed": 0}, "train": {**TINY["train"], "iterations": 2}, **over}
    path = tmp_path / f"tiny_{layout}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _run(tmp_path, path, root, *extra):
    return main(["run", "--methods", "ce", "--protocol", str(path), "--data-root", str(root), "--results-dir",
                 str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c"), "--no-progress", *extra])


def test_classic_voc_draws_labeled_ids_from_the_fine_train_list(tmp_path):
    ids = make_voc(tmp_path / "voc")
    (tmp_path / "voc" / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids[:2]) + "\n")
    (tmp_path / "voc" / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("\n".join(ids[:4]) + "\n")
    path = _protocol_file(tmp_path, "voc", labeled={"count": 2, "seed": 0, "pool": "train"})
    assert _run(tmp_path, path, tmp_path / "voc") == 0
    record = json.loads(next((tmp_path / "r").rglob("result.json")).read_text())
    [split_file] = (tmp_path / "r").rglob("labeled-*.txt")
    assert split_file.read_text().split() == ids[:2] and record["split"]["n_train"] == 4


def test_split_file_replaces_the_seeded_selection_and_is_recorded(tmp_path, capsys):
    import hashlib

    ids = make_voc(tmp_path / "voc")
    path = _protocol_file(tmp_path, "voc")
    mine = tmp_path / "u2pl_92.txt"
    mine.write_text(f"JPEGImages/{ids[3]}.jpg SegmentationClassAug/{ids[3]}.png\n{ids[1]}\n")
    assert _run(tmp_path, path, tmp_path / "voc", "--split-file", str(mine)) == 0
    record = json.loads(next((tmp_path / "r").rglob("result.json")).read_text())
    assert record["split"]["source"] == f"file:{mine.resolve()}"
    assert record["split"]["split_file_sha256"] == hashlib.sha256(mine.read_bytes()).hexdigest()
    assert record["split"]["n_labeled"] == 2
    # ids that do not exist, or that try to leave the data root, are errors before any training
    mine.write_text(f"{ids[1]}\n2099_000001\n")
    assert _run(tmp_path, path, tmp_path / "voc", "--split-file", str(mine)) == 1
    assert "line 2: id '2099_000001' is not in the training split" in capsys.readouterr().out
    mine.write_text("../../../etc/passwd\n")
    assert _run(tmp_path, path, tmp_path / "voc", "--split-file", str(mine)) == 1


def test_cpu_preset_is_recorded_and_unknown_presets_are_named(tmp_path, capsys):
    make_voc(tmp_path / "voc")
    # the protocol refines the preset (its eval batch); the command line still has the last word
    path = _protocol_file(tmp_path, "voc", presets={"cpu": {"eval.batch_size": 3, "train.crop": 40}})
    assert _run(tmp_path, path, tmp_path / "voc", "--preset", "cpu", "train.iterations=2", "train.crop=32",
                "dataset.resize=32") == 0
    record = json.loads(next((tmp_path / "r").rglob("result.json")).read_text())
    assert record["overrides"]["model.backbone"] == "resnet18" and record["overrides"]["train.iterations"] == 2
    assert record["overrides"]["eval.batch_size"] == 3 and record["config"]["protocol"]["eval"]["batch_size"] == 3
    assert record["overrides"]["train.crop"] == 32 and "presets" not in record["config"]["protocol"]
    assert record["config"]["protocol"]["dataset"]["resize"] == 32
    assert _run(tmp_path, path, tmp_path / "voc", "--preset", "gpu-huge") == 2
    assert "unknown preset 'gpu-huge'; valid presets: cpu" in capsys.readouterr().err


def test_hugging_face_dataset_from_a_local_save_to_disk_folder(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)

    def rows(n):
        images = [Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)) for _ in range(n)]
        masks = [Image.fromarray(np.where(np.arange(40) < 20, 0, 1 + i % 2).astype(np.uint8)[None].repeat(32, 0), "L")
                 for i in range(n)]
        return datasets.Dataset.from_dict({"pixel_values": images, "label": masks},
                                          features=datasets.Features({"pixel_values": datasets.Image(),
                                                                      "label": datasets.Image()}))

    datasets.DatasetDict({"train": rows(4), "validation": rows(2)}).save_to_disk(str(tmp_path / "hfdata"))
    protocol = {**TINY, "name": "tiny_hf",
                "dataset": {"name": "hf", "train_split": "train", "eval_split": "validation",
                            "hf": {"image_column": "pixel_values", "mask_column": "label",
                                   "class_names": ["ground", "cat", "dog"]}},
                "labeled": {"ratio": 0.5, "seed": 0}, "train": {**TINY["train"], "iterations": 2}}
    path = tmp_path / "tiny_hf.yaml"
    path.write_text(yaml.safe_dump(protocol))
    assert main(["data", "check", "--protocol", str(path), "--data-root", str(tmp_path / "hfdata"),
                 "--no-progress"]) == 0
    assert "distinct images checked  6" in capsys.readouterr().out
    assert _run(tmp_path, path, tmp_path / "hfdata") == 0
    record = json.loads(next((tmp_path / "r").rglob("result.json")).read_text())
    assert record["dataset"]["class_names"] == ["ground", "cat", "dog"] and record["dataset"]["n_eval"] == 2
    # a wrong column is named with the columns there are
    bad = {**protocol, "dataset": {**protocol["dataset"], "hf": {**protocol["dataset"]["hf"], "mask_column": "seg"}}}
    path.write_text(yaml.safe_dump(bad))
    assert main(["data", "check", "--protocol", str(path), "--data-root", str(tmp_path / "hfdata")]) == 2
    assert "has no column ['seg']; columns: ['pixel_values', 'label']" in capsys.readouterr().err


def test_a_corrupt_image_read_in_a_loader_worker_fails_the_run_naming_the_file(tmp_path):
    ids = make_voc(tmp_path / "voc")
    for image_id in ids:  # whichever image the first batch draws
        (tmp_path / "voc" / "JPEGImages" / f"{image_id}.jpg").write_bytes(b"\xff\xd8 truncated")
    path = _protocol_file(tmp_path, "voc", train={**TINY["train"], "iterations": 2, "num_workers": 1})
    assert _run(tmp_path, path, tmp_path / "voc") == 1
    failure = json.loads(next((tmp_path / "r").rglob("failure.json")).read_text())
    assert failure["reason"].startswith("cannot read image ") and "JPEGImages" in failure["reason"]
