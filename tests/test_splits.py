"""The field's split lists shipped in protocols/splits: pinned, parsed into the datasets' ids, checked."""
import shutil

import pytest

from bench import BenchError
from bench.data.readers import open_source
from bench.protocol import PROTOCOLS_DIR, list_protocols, load_protocol
from bench.planning import plan_sweep
from bench.splits import select_labeled, split_file_sha256
from tests.test_readers import _image, _mask

SHIPPED = {  # protocol -> labeled ids in its list (the sizes the papers' tables name)
    "voc_92": 92, "voc_183": 183, "voc_366": 366, "voc_732": 732, "voc_1464": 1464,
    "voc_1_16": 662, "voc_1_8": 1323, "voc_1_4": 2646,
    "voc_u2pl_1_16": 662, "voc_u2pl_1_8": 1323, "voc_u2pl_1_4": 2646,
    "cityscapes_1_30": 100, "cityscapes_1_16": 186, "cityscapes_1_8": 372, "cityscapes_1_4": 744,
    "cityscapes_1_2": 1488,
}


def _list_ids(protocol_name, entry_id=lambda stem: stem):
    path = load_protocol(protocol_name).labeled.split_path()
    return [entry_id(line.split()[0].rsplit("/", 1)[-1].rsplit(".", 1)[0])
            for line in path.read_text().splitlines() if line.strip()]


def test_every_shipped_list_is_pinned_by_its_protocol_and_has_the_published_size():
    with_lists = {n for n in list_protocols() if load_protocol(n).labeled.split_file}
    unimatch_setting = {f"voc_unimatch_{n}": f"voc_{n}" for n in (92, 183, 366, 732, 1464)}
    assert with_lists == set(SHIPPED) | set(unimatch_setting)
    for name, same_list in unimatch_setting.items():
        assert load_protocol(name).labeled == load_protocol(same_list).labeled
    for name, n in SHIPPED.items():
        spec = load_protocol(name).labeled
        assert not spec.split_file.startswith("/") and spec.split_path().parent.parent.parent == PROTOCOLS_DIR / "splits"
        assert split_file_sha256(spec) == spec.split_sha256  # the pin holds for the shipped bytes
        assert len(set(_list_ids(name))) == n
        seeded = name.replace("u2pl_", "") + "_seeded"  # the seeded draw of that size stays available
        assert load_protocol(seeded).labeled.count == n
    assert set(_list_ids("voc_92")) <= set(_list_ids("voc_1464"))  # classic lists come from the fine train set


def test_a_list_that_differs_from_its_pin_stops_the_plan_naming_the_file(tmp_path):
    edited = tmp_path / "labeled.txt"
    lines = load_protocol("voc_92").labeled.split_path().read_text().splitlines()
    edited.write_text("\n".join(lines[:-1]) + "\n")  # one id dropped
    with pytest.raises(BenchError, match=rf"split file {edited}: sha256 .* differs .*\(labeled.split_sha256\)"):
        plan_sweep(["ce"], "voc_92", [0], [f"labeled.split_file={edited}"], tmp_path / "results")
    # the shipped list, and a user's own list with the pin cleared (what --split-file does), plan fine
    plan_sweep(["ce"], "voc_92", [0], [], tmp_path / "results")
    plan_sweep(["ce"], "voc_92", [0], [f"labeled.split_file={edited}", "labeled.split_sha256=null"],
               tmp_path / "results")


def test_voc_classic_list_selects_its_ids_on_a_voc_layout(tmp_path):
    labeled = _list_ids("voc_92")
    fine_rest = [f"2099_{i:06d}" for i in range(4)]  # fine train images the list leaves unlabeled
    aug_only = [f"2098_{i:06d}" for i in range(3)]
    val = ["2097_000000"]
    root = tmp_path / "voc"
    for i, image_id in enumerate(labeled + fine_rest + aug_only + val):
        _image(root / "JPEGImages" / f"{image_id}.jpg", i, size=(8, 6))
        _mask(root / "SegmentationClassAug" / f"{image_id}.png", (0, 1), size=(8, 6))
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("\n".join(labeled + fine_rest) + "\n")
    (lists / "train_aug.txt").write_text("\n".join(labeled + fine_rest + aug_only) + "\n")
    (lists / "val.txt").write_text("\n".join(val) + "\n")
    protocol = load_protocol("voc_92", {"dataset.root": str(root)})
    source = open_source("voc", root)
    split = select_labeled(source.split_ids("train_aug"), protocol.labeled, source.split_ids("train"),
                            source.entry_id)
    assert split.ids == sorted(labeled) and split.file_sha256 == protocol.labeled.split_sha256
    # a list id missing from the data's fine train list is an error naming the file and line
    (lists / "train.txt").write_text("\n".join(labeled[1:] + fine_rest) + "\n")
    with pytest.raises(BenchError, match=r"labeled.txt line \d+: id .* is not in the training split \(train\)"):
        select_labeled(source.split_ids("train_aug"), protocol.labeled, source.split_ids("train"), source.entry_id)


def test_cityscapes_list_entries_name_image_files_whose_ids_drop_leftImg8bit(tmp_path):
    labeled = _list_ids("cityscapes_1_30", lambda stem: stem.removesuffix("_leftImg8bit"))
    root = tmp_path / "cs"
    for i, image_id in enumerate(labeled + ["zurich_000000_000019"]):
        city = image_id.split("_")[0]
        _image(root / "leftImg8bit" / "train" / city / f"{image_id}_leftImg8bit.png", i, size=(8, 4))
        _mask(root / "gtFine" / "train" / city / f"{image_id}_gtFine_labelIds.png", (7, 26), size=(8, 4))
    source = open_source("cityscapes", root)
    protocol = load_protocol("cityscapes_1_30", {"dataset.root": str(root)})
    split = select_labeled(source.split_ids("train"), protocol.labeled, None, source.entry_id)
    assert split.ids == sorted(labeled) and len(split.ids) == 100
    assert "zurich_000000_000019" not in split.ids


def test_a_missing_shipped_list_is_named(tmp_path, monkeypatch):
    import bench.protocol as protocol_module

    fake = tmp_path / "protocols"
    shutil.copytree(PROTOCOLS_DIR, fake, ignore=shutil.ignore_patterns("splits"))
    monkeypatch.setattr(protocol_module, "PROTOCOLS_DIR", fake)
    with pytest.raises(BenchError, match=f"split file {fake}/splits/pascal/1_16/labeled.txt does not exist"):
        split_file_sha256(load_protocol("voc_1_16", directory=fake).labeled)
