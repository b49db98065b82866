"""The leaderboard on hand-made records: aggregation, grouping, stability, figures, bad records."""
import copy
import json

import numpy as np
import pytest
import torch

from bench import BenchError
from bench.leaderboard import aggregate, load_records, paired_bootstrap, render
from bench.leaderboard.render import format_comparison
from bench.protocol import load_protocol, preset_overrides
from bench.results import save_per_image, write_json_atomic

CLASSES = ["a", "b"]


def _per_image(correct: np.ndarray) -> np.ndarray:
    """Per-image 2x2 confusions: image i has 10 px of class 0 and 10 of class 1, ``correct[i]`` of each right."""
    mats = np.zeros((len(correct), 2, 2), np.int32)
    mats[:, 0, 0] = mats[:, 1, 1] = correct
    mats[:, 0, 1] = mats[:, 1, 0] = 10 - np.asarray(correct)
    return mats


def make_record(results, protocol="synth_1_8", method="ce", seed=0, miou=50.0, correct=None,
                iterations=None, needs=("pixel_labels",), n_labeled=50, method_config=None, tag="ref", preset=None):
    """``preset``: made with ``--preset`` (its overrides in the config and among the command's)."""
    at_preset = dict(preset_overrides(preset, protocol)) if preset else {}
    config = {"method": {"name": method, **(method_config or {})},
              "protocol": load_protocol(protocol, at_preset).model_dump(), "seed": seed}
    overrides = {".".join(k): v for k, v in at_preset.items()}
    if iterations is not None:
        config["protocol"]["train"]["iterations"] = overrides["train.iterations"] = iterations
    run = results / protocol / method / f"seed{seed}-{iterations or tag}"
    record = {
        "method": method, "protocol": protocol, "seed": seed, "supervision": sorted(needs),
        "config": config, "config_hash": f"{method}{seed}{iterations}",
        "overrides": overrides,
        "split": {"n_labeled": n_labeled, "n_train": 400, "labeled_sha256": "0" * 64, "source": "seeded:0"},
        "dataset": {"eval_ids_sha256": "e" * 64, "class_names": CLASSES},
        "metrics": {"miou": miou, "pixel_acc": miou + 30, "mean_class_acc": miou + 5, "matching": "direct",
                    "per_class_iou": {"a": miou + 10, "b": miou - 10}},
        "train_time_s": 100.0 + seed, "train_images_per_s": 60.0, "per_image_file": "per_image.npz",
    }
    if correct is not None:
        save_per_image(run / "per_image.npz", _per_image(correct))
    write_json_atomic(run / "result.json", record)
    return run / "result.json"


def test_aggregation_mean_std_and_annotation_hours(tmp_path):
    make_record(tmp_path, seed=0, miou=50.0)
    make_record(tmp_path, seed=1, miou=54.0)
    make_record(tmp_path, protocol="synth_1_16", seed=0, miou=40.0, n_labeled=25)
    agg = aggregate(load_records(tmp_path))
    row = agg[agg["protocol"] == "synth_1_8"].iloc[0]
    assert row["miou_mean"] == pytest.approx(52.0)
    assert row["miou_std"] == pytest.approx(np.std([50.0, 54.0], ddof=1))
    assert row["seeds"] == 2
    assert row["annotation_hours"] == pytest.approx(50 * 239 / 3600)  # 50 masks at 239 s each
    single = agg[agg["protocol"] == "synth_1_16"].iloc[0]
    assert single["seeds"] == 1 and np.isnan(single["miou_std"])


def test_image_tag_and_unsupervised_costs(tmp_path):
    make_record(tmp_path, method="tags", needs=("image_tags",))
    make_record(tmp_path, method="clusters", needs=())
    make_record(tmp_path, method="semi", needs=("pixel_labels", "unlabeled_images"))
    agg = aggregate(load_records(tmp_path)).set_index("method")
    assert agg.loc["tags", "annotation_hours"] == pytest.approx(400 * 20 / 3600)
    assert agg.loc["clusters", "annotation_hours"] == 0
    assert agg.loc["semi", "annotation_hours"] == pytest.approx(50 * 239 / 3600)
    assert agg.loc["semi", "supervision"] == "pixel labels + unlabeled"


def test_runs_with_other_configs_never_share_a_row(tmp_path):
    make_record(tmp_path, seed=0, miou=50.0)
    make_record(tmp_path, seed=1, miou=52.0)
    make_record(tmp_path, seed=0, miou=70.0, iterations=5000)
    agg = aggregate(load_records(tmp_path))
    assert len(agg) == 2
    ref = agg[agg["differs"] == ""].iloc[0]
    other = agg[agg["differs"] != ""].iloc[0]
    assert ref["miou_mean"] == pytest.approx(51.0) and ref["seeds"] == 2
    assert other["differs"] == "train.iterations=5000" and other["miou_mean"] == 70.0


def test_render_is_stable_and_writes_figures(tmp_path):
    results = tmp_path / "results"
    rng = np.random.default_rng(0)
    for protocol, n in (("synth_1_16", 25), ("synth_1_8", 50)):
        for seed in (0, 1):
            base = rng.integers(3, 7, 30)
            make_record(results, protocol, "ce", seed, 40.0 + seed, base, n_labeled=n)
            make_record(results, protocol, "better", seed, 45.0 + seed, np.minimum(base + 2, 10), n_labeled=n)
    make_record(results, "synth_1_8", "tags", 0, 30.0, rng.integers(2, 5, 30), needs=("image_tags",))
    out = tmp_path / "leaderboard.md"
    first = render(results, out, n_boot=200)
    pngs = {p.name: p.read_bytes() for p in (results / "figures").glob("*.png")}
    assert set(pngs) == {"label_efficiency_synth.png", "miou_vs_annotation_hours.png", "paired_differences.png"}
    assert all(len(b) > 1000 for b in pngs.values())
    assert render(results, out, n_boot=200) == first == out.read_text()
    assert {p.name: p.read_bytes() for p in (results / "figures").glob("*.png")} == pngs
    # the commands behind the records: one per (methods, seeds), protocols in label-fraction order
    assert "python -m bench run --methods better,ce --protocol synth_1_16,synth_1_8 --seeds 0,1\n" in first
    assert "python -m bench run --methods tags --protocol synth_1_8 --seeds 0\n" in first
    assert "| ce | pixel labels | 40.50 ± 0.71 |" in first
    assert "better − ce" in first and "| better |" in first
    assert "(results/figures/label_efficiency_synth.png)" in first and str(tmp_path) not in first
    # per-class IoU as a table; the majority-class context row from the evaluation masks alone
    assert "| row | a | b |" in first and "| ce | 50.5 | 30.5 |" in first
    assert "| *majority class* (a) | context | 25.00 | 50.00 |" in first


def test_majority_row_comes_from_a_run_at_the_sections_setting(tmp_path):
    """A run at other image sizes (dataset.resize: other evaluation masks) does not give the
    context row while a run at the setting exists, though its record is read first."""
    make_record(tmp_path, method="ce", correct=np.full(4, 5))  # classes a and b, 10 px each per image
    path = make_record(tmp_path, method="aaa")
    record = json.loads(path.read_text())
    record["config"]["protocol"]["dataset"]["resize"] = record["overrides"]["dataset.resize"] = 240
    write_json_atomic(path, record)
    mats = _per_image(np.full(4, 5))
    mats[:, 1, 1] += 60  # class b the majority at this size
    save_per_image(path.parent / "per_image.npz", mats)
    page = render(tmp_path, tmp_path / "leaderboard.md", n_boot=50)
    assert "| aaa [dataset.resize=240] |" in page
    assert "| *majority class* (a) | context | 25.00 | 50.00 |" in page


def test_paired_bootstrap_sees_a_real_difference_and_no_difference(tmp_path):
    base = np.random.default_rng(1).integers(3, 8, 40)
    for seed in (0, 1):
        make_record(tmp_path, method="ce", seed=seed, correct=base)
        make_record(tmp_path, method="same", seed=seed, correct=base)
        make_record(tmp_path, method="up", seed=seed, correct=np.minimum(base + 1, 10))
    df = load_records(tmp_path)
    up = paired_bootstrap(df, "synth_1_8", "ce", "up", n_boot=500)
    assert up["diff"] > 0 and up["ci_low"] > 0 and up["seeds"] == [0, 1] and up["n_images"] == 40
    assert up["verdict"] == "too few seeds"  # two seeds: never better or worse
    assert format_comparison(up).endswith("| too few seeds (2 < 3) |")
    same = paired_bootstrap(df, "synth_1_8", "ce", "same", n_boot=500)
    assert same["diff"] == 0 and same["ci_low"] == 0 and same["ci_high"] == 0
    make_record(tmp_path, method="ce", seed=2, correct=base)
    make_record(tmp_path, method="up", seed=2, correct=np.minimum(base + 1, 10))
    assert paired_bootstrap(load_records(tmp_path), "synth_1_8", "ce", "up", n_boot=500)["verdict"] == "better"


def test_hierarchical_bootstrap_carries_the_seed_to_seed_spread(tmp_path):
    """Per seed the images agree (b ahead by 2 px on every image, or behind): an image-only bootstrap
    would call each seed certain; over seeds +, -, + the interval must cover 0."""
    from bench.leaderboard.statistics import _square_per_image, hierarchical_bootstrap

    base = np.random.default_rng(4).integers(4, 7, 50)
    a = [_square_per_image(_per_image(base), None)] * 3
    b = [_square_per_image(_per_image(np.clip(base + d, 0, 10)), None) for d in (2, -2, 2)]
    diff = hierarchical_bootstrap(a, b, n_boot=1000)
    assert np.percentile(diff, 2.5) < 0 < np.percentile(diff, 97.5)
    one_seed = hierarchical_bootstrap(a[:1], b[:1], n_boot=1000)
    assert np.percentile(one_seed, 2.5) > 0  # within one seed the images alone are unanimous
    # the same draws for both methods: identical runs give exactly zero in every resample
    assert not hierarchical_bootstrap(a, a, n_boot=50).any()


def test_bootstrap_miou_matches_the_metrics_module(tmp_path):
    from bench.leaderboard.statistics import _miou_batch, _square_per_image
    from bench.metrics import scores

    mats = np.random.default_rng(2).integers(0, 20, (5, 3, 3)).astype(np.int32)
    square = _square_per_image(mats, None).sum(0, keepdims=True)
    assert _miou_batch(square)[0] == pytest.approx(scores(mats.sum(0))["miou"])


def test_record_missing_a_field_is_named(tmp_path):
    path = make_record(tmp_path)
    record = json.loads(path.read_text())
    broken = copy.deepcopy(record)
    del broken["metrics"]
    path.write_text(json.dumps(broken))
    with pytest.raises(BenchError, match=rf"{path}.*lacks field\(s\) metrics"):
        load_records(tmp_path)
    broken = copy.deepcopy(record)
    del broken["split"]["n_train"]
    path.write_text(json.dumps(broken))
    with pytest.raises(BenchError, match=rf"{path} lacks field\(s\) split\.n_train$"):
        load_records(tmp_path)


def test_no_records_is_a_clear_error(tmp_path):
    with pytest.raises(BenchError, match="no result records"):
        render(tmp_path, tmp_path / "leaderboard.md")


def test_compare_and_leaderboard_commands(tmp_path, capsys):
    from bench.cli import main

    base = np.random.default_rng(3).integers(3, 8, 30)
    for seed in (0, 1, 2):
        make_record(tmp_path, method="ce", seed=seed, correct=base)
        make_record(tmp_path, method="up", seed=seed, correct=np.minimum(base + 1, 10))
    args = ["compare", "--protocol", "synth_1_8", "--results-dir", str(tmp_path), "--bootstrap", "200"]
    assert main([*args, "--methods", "ce,up"]) == 0
    out = capsys.readouterr().out
    assert "| synth_1_8 | up − ce |" in out and "| better |" in out
    assert main([*args, "--methods", "ce"]) == 2
    assert main([*args, "--methods", "ce,nothing"]) == 2
    assert "no seed has results for both ce and nothing" in capsys.readouterr().err
    board = tmp_path / "board.md"
    assert main(["leaderboard", "--results-dir", str(tmp_path), "--output", str(board), "--bootstrap", "100"]) == 0
    assert "## synth_1_8" in board.read_text()
    # without --output the page goes inside the results dir, its links relative to it
    assert main(["leaderboard", "--results-dir", str(tmp_path), "--bootstrap", "100"]) == 0
    page = (tmp_path / "leaderboard.md").read_text()
    assert "](figures/paired_differences.png)" in page and str(tmp_path) not in page.split("```")[2]


def test_differences_are_taken_from_the_protocol_file_for_every_row(tmp_path):
    """Every run at train.iterations=200 (the protocol file says 800): each row says so, though
    it is the most common setting among the records."""
    for seed in (0, 1):
        make_record(tmp_path, method="ce", seed=seed, iterations=200)
        make_record(tmp_path, method="other", seed=seed, iterations=200)
    agg = aggregate(load_records(tmp_path))
    assert list(agg["differs"]) == ["train.iterations=200"] * 2
    assert set(agg["label"]) == {"ce [train.iterations=200]", "other [train.iterations=200]"}


def test_a_collapsed_run_is_flagged_on_the_page(tmp_path):
    """A run predicting class 0 everywhere (per_image: all pixels in column 0)."""
    make_record(tmp_path, method="ce", correct=np.full(6, 8))
    path = make_record(tmp_path, method="flat", miou=25.0)
    mats = np.zeros((6, 2, 2), np.int32)
    mats[:, 0, 0] = mats[:, 1, 0] = 10
    save_per_image(path.parent / "per_image.npz", mats)
    text = render(tmp_path, tmp_path / "leaderboard.md", n_boot=10)
    glance, section = text.split("## At a glance")[1].split("## synth_1_8")
    row = next(line for line in section.splitlines() if line.startswith("| flat |"))
    assert "**collapsed** (1/1 seeds)" in row
    assert "collapsed" not in next(line for line in section.splitlines() if line.startswith("| ce |"))
    assert next(line for line in glance.splitlines() if line.startswith("| flat |")).startswith(
        "| flat | pixel labels | 25.00 (1) **collapsed** · ")


def test_method_colours_are_fixed_and_distinct():
    from bench.leaderboard import method_colours

    one = method_colours(["ce", "pixcontrast", "prcl"])
    assert one == {k: v for k, v in method_colours(["prcl", "ce", "pixcontrast", "new"]).items() if k != "new"}
    everyone = method_colours(["ce", "pixcontrast", "prcl", "picie", "aepsl", "meanteacher", "fixmatch", "unimatch",
                               "x", "y"])
    assert len(set(everyone.values())) == len(everyone)


def test_method_settings_other_than_the_defaults_are_named(tmp_path):
    from methods.pixcontrast import PixContrast

    defaults = PixContrast.Config().model_dump()
    for seed in (0, 1):
        make_record(tmp_path, method="pixcontrast", seed=seed, miou=50.0 + seed, method_config=defaults)
    make_record(tmp_path, method="pixcontrast", seed=0, miou=60.0, tag="mem",
                method_config={**defaults, "memory": True})
    agg = aggregate(load_records(tmp_path)).set_index("differs")
    assert agg.loc["", "seeds"] == 2 and agg.loc["", "miou_mean"] == pytest.approx(50.5)
    assert agg.loc["method.memory=True", "miou_mean"] == 60.0


def test_bootstrap_reuses_the_records_cluster_map():
    """Cluster records are resampled through the map fixed on the whole set, never re-matched."""
    from bench.leaderboard.statistics import _miou_batch, _square_per_image
    from bench.metrics import cluster_scores

    per_image = np.array([[[0, 9, 1], [8, 0, 0], [1, 0, 7]], [[0, 0, 5], [0, 0, 0], [5, 0, 0]]], np.int32)
    metrics = cluster_scores(torch.as_tensor(per_image[0]))
    assert metrics["cluster_to_class"] == [1, 0, 2]
    square = _square_per_image(per_image, metrics["cluster_to_class"])
    assert _miou_batch(square[:1])[0] == pytest.approx(metrics["miou"])
    # the second image alone would be matched the other way round; through the fixed map it is all wrong
    assert _miou_batch(square[1:])[0] == 0.0


def test_pseudo_masks_get_their_own_table_next_to_the_final_miou(tmp_path):
    make_record(tmp_path, method="ce", correct=np.full(4, 6))
    path = make_record(tmp_path, method="aepsl", needs=("image_tags",), miou=30.0, correct=np.full(4, 3))
    record = json.loads(path.read_text())
    score = lambda m: {"miou": m, "pixel_acc": m, "mean_class_acc": m, "per_class_iou": {}}  # noqa: E731
    record["pseudo_labels"] = {"n_images": 400, "coverage": 61.25, "labeled_pixels": score(48.5),
                               "all_pixels": score(22.75)}
    record["method_summary"] = {"erasing_steps": 3, "psl": True, "stopped_by_loss_at_step": None,
                                "step_losses": [0.3, 0.4, 0.5], "background_rule": "none"}
    write_json_atomic(path, record)
    text = render(tmp_path, tmp_path / "leaderboard.md", n_boot=10)
    section = text.split("## Pseudo masks")[1].split("\n## ")[0]
    row = next(line for line in section.splitlines() if line.startswith("| synth_1_8 | aepsl"))
    assert "| 61.2 | 48.50 | 22.75 | 30.00 |" in row and "erasing_steps=3" in row and "psl=True" in row
    assert "ce" not in section.split("|---")[1]  # methods without pseudo masks have no row


def test_settings_the_protocol_fixes_for_a_method_are_not_differences(tmp_path):
    """synth sets prcl's contrast sizes: a prcl row at those sizes differs in nothing; the
    reference sizes (the method's defaults) are named as the difference."""
    from methods.prcl import PRCL

    defaults = PRCL.Config().model_dump()
    at_protocol = {**defaults, **load_protocol("synth_1_8").methods["prcl"]}
    make_record(tmp_path, method="prcl", method_config=at_protocol)
    make_record(tmp_path, method="prcl", method_config=defaults, tag="reference", miou=55.0)
    agg = aggregate(load_records(tmp_path)).set_index("miou_mean")
    assert agg.loc[50.0, "differs"] == ""
    assert agg.loc[55.0, "differs"] == "method.num_negatives=512, method.num_queries=256"


def _with_root(record_path, root):
    record = json.loads(record_path.read_text())
    record["config"]["protocol"]["dataset"]["root"] = record["overrides"]["dataset.root"] = root  # as --data-root
    write_json_atomic(record_path, record)


def test_folder_datasets_are_named_by_their_folder_and_real_data_comes_first(tmp_path):
    from bench.leaderboard.records import protocol_order

    make_record(tmp_path, protocol="synth_1_8")
    _with_root(make_record(tmp_path, protocol="stanford_background_1_8"), "/data/stanford_background/")
    _with_root(make_record(tmp_path, protocol="msrc_v2_full"), "/data/msrc_v2")
    make_record(tmp_path, protocol="camvid_1_8")
    df = load_records(tmp_path)
    assert dict(zip(df["protocol"], df["dataset"])) == {
        "synth_1_8": "synth", "stanford_background_1_8": "stanford_background", "msrc_v2_full": "msrc_v2",
        "camvid_1_8": "camvid"}
    agg = aggregate(df)
    assert protocol_order(agg, agg["protocol"]) == ["camvid_1_8", "msrc_v2_full", "stanford_background_1_8",
                                                     "synth_1_8"]


def test_one_protocol_over_two_datasets_is_an_error_naming_both(tmp_path):
    _with_root(make_record(tmp_path, protocol="folder_1_8", seed=0), "/data/stanford_background")
    _with_root(make_record(tmp_path, protocol="folder_1_8", seed=1), "/data/msrc_v2")
    with pytest.raises(BenchError, match=r"protocol folder_1_8 has records of several datasets "
                                         r"\(msrc_v2, stanford_background\)"):
        load_records(tmp_path)
    # where bad records are left out (the page, `bench run`'s summary rows), the protocol is too,
    # reported once, and the other protocols stay
    make_record(tmp_path, protocol="synth_1_8")
    reported = []
    df = load_records(tmp_path, on_bad_record=lambda path, message: reported.append((path, message)))
    assert list(df["protocol"]) == ["synth_1_8"]
    assert [path for path, _ in reported] == [tmp_path / "folder_1_8"]
    assert "several datasets (msrc_v2, stanford_background)" in reported[0][1]


def test_timed_under_load_counts_what_ran_beside_the_run(tmp_path):
    """Load less the run's own threads: a one-thread run beside another one-thread run is loaded at
    a mean load of 1.9 as at 2.1; a two-thread run alone at 2.1 is not; a record without load is unknown.
    Records name the CPU model after the threads since 2026-12-02; older ones do not."""
    cases = {0: (1.9, "cpu (1 threads)"), 1: (2.1, "cpu (1 threads, AMD EPYC 9454 48-Core Processor)"), 2: (2.1, "cpu (2 threads)"), 3: (None, None)}
    for seed, (load, device) in cases.items():
        path = make_record(tmp_path, seed=seed)
        record = json.loads(path.read_text())
        if load is not None:
            record.update(load={"cpu_count": 2, "mean_1min": load, "max_1min": load, "samples": 10},
                          device=device, processes=1)
        write_json_atomic(path, record)
    row = aggregate(load_records(tmp_path)).iloc[0]
    assert (row["under_load"], row["load_known"]) == (2, 3)
    # which two: without seed 2 (two threads, alone) both remaining known seeds count
    (tmp_path / "synth_1_8" / "ce" / "seed2-ref" / "result.json").unlink()
    row = aggregate(load_records(tmp_path)).iloc[0]
    assert (row["under_load"], row["load_known"]) == (2, 2)


def test_timed_under_load_uses_the_measured_busy_threads_where_the_record_has_them(tmp_path):
    """A one-thread run with two loader workers beside another one-thread run (load 2.1): counting
    its workers as busy (3 threads) hid the other run; its measured CPU time (main process 1,000 s
    plus workers 100 s over 1,000 s of training: 1.1 threads busy) shows it. Alone at load 1.2 it
    is not under load either way."""
    for seed, load in ((0, 2.1), (1, 1.2)):
        path = make_record(tmp_path, seed=seed)
        record = json.loads(path.read_text())
        record.update(load={"cpu_count": 2, "mean_1min": load, "max_1min": load, "samples": 10},
                      device="cpu (1 threads)", processes=1, loader_workers={"asked": 2, "used": 2, "cores": 2},
                      train_time_s=1000.0, train_cpu_time_s=1000.0, train_worker_cpu_time_s=100.0)
        write_json_atomic(path, record)
    df = load_records(tmp_path)
    assert list(df["own_threads"]) == pytest.approx([1.1, 1.1])
    assert (aggregate(df).iloc[0]["under_load"], aggregate(df).iloc[0]["load_known"]) == (1, 2)
    # the same records without the workers' time: three threads assumed busy, so neither is flagged
    for seed in (0, 1):
        path = tmp_path / "synth_1_8" / "ce" / f"seed{seed}-ref" / "result.json"
        record = json.loads(path.read_text())
        del record["train_worker_cpu_time_s"]
        write_json_atomic(path, record)
    df = load_records(tmp_path)
    assert list(df["own_threads"]) == [3, 3] and aggregate(df).iloc[0]["under_load"] == 0


def test_rows_at_a_preset_name_what_differs_from_the_protocol_at_that_preset(tmp_path):
    """Real-data rows run at ``--preset cpu`` are compared with the protocol at the preset: a row at
    the preset differs in nothing, one with more iterations says so, a run at the paper setting
    names the preset's fields; the section says its setting and the commands give the flag."""
    protocol = "stanford_background_1_8"
    for seed in (0, 1):
        _with_root(make_record(tmp_path, protocol=protocol, seed=seed, preset="cpu"), "/data/stanford_background")
    _with_root(make_record(tmp_path, protocol=protocol, iterations=1600, preset="cpu", miou=52.0),
               "/data/stanford_background")
    _with_root(make_record(tmp_path, protocol=protocol, method="paper", tag="paper", miou=60.0), "/data/stanford_background")
    df = load_records(tmp_path)
    assert sorted(df["preset"].fillna("-")) == ["-", "cpu", "cpu", "cpu"]
    agg = aggregate(df).set_index("miou_mean")
    assert agg.loc[50.0, "differs"] == "" and agg.loc[50.0, "label"] == "ce"
    assert agg.loc[52.0, "differs"] == "train.iterations=1600"
    assert "model.backbone=resnet50" in agg.loc[60.0, "differs"]
    assert agg.loc[50.0, "overrides"] == "--preset cpu --data-root /path/to/stanford_background"
    assert agg.loc[52.0, "overrides"] == "--preset cpu --data-root /path/to/stanford_background train.iterations=1600"
    page = render(tmp_path, tmp_path / "leaderboard.md", n_boot=50)
    assert "Setting: the protocol file at `--preset cpu`" in page
    assert f"python -m bench run --methods ce --protocol {protocol} --seeds 0,1 --preset cpu --data-root " in page
    assert "model.backbone=resnet18" not in page


def test_the_glance_table_sets_every_method_at_its_defaults_beside_ce(tmp_path):
    """One row per method, one column per protocol where two methods ran at their defaults: the mean
    ± std (seeds) and, against ce, the paired difference and its verdict; an ablation (a row that
    differs from the protocol) and a protocol with ce alone stay out; more annotation ranks first."""
    base = np.random.default_rng(1).integers(3, 8, 40)
    for seed in (0, 1, 2):
        make_record(tmp_path, method="ce", seed=seed, correct=base, miou=50.0 + seed)
        make_record(tmp_path, method="up", seed=seed, correct=np.minimum(base + 1, 10), miou=53.0 + seed,
                    needs=("pixel_labels", "unlabeled_images"))
    make_record(tmp_path, method="up", seed=0, correct=base, miou=70.0, method_config={"other": 1}, tag="abl",
                needs=("pixel_labels", "unlabeled_images"))
    make_record(tmp_path, method="tags", seed=0, correct=base - 2, miou=40.0, needs=("image_tags",))
    make_record(tmp_path, method="ce", protocol="synth_1_16", n_labeled=25, miou=40.0)
    text = render(tmp_path, n_boot=200)
    glance = text.split("## At a glance")[1].split("\n## ")[0]
    rows = [line for line in glance.splitlines() if line.startswith("| ")]
    assert rows[0] == "| method | supervision | synth_1_8 (50 labeled) |"  # synth_1_16 holds ce alone
    assert rows[1] == "| ce | pixel labels | 51.00 ± 1.00 (3) |"
    assert rows[2].startswith("| up | pixel labels + unlabeled | 54.00 ± 1.00 (3) · +")
    assert rows[2].endswith(", better |")  # the ablation at 70.0 is not pooled in
    assert rows[3].startswith("| tags | image tags | 40.00 (1) · -") and rows[3].endswith(", too few seeds |")
    assert len(rows) == 4


def test_a_run_that_differs_only_in_its_labeled_split_is_a_point_on_the_default_curve(tmp_path):
    """ce at labeled.ratio=1/16 on synth_1_8's file: its own table row (it differs), but the same
    label-efficiency curve as ce at the protocols' defaults; another setting keeps its own curve."""
    make_record(tmp_path, seed=0, miou=50.0)
    path = make_record(tmp_path, seed=0, miou=45.0, n_labeled=25, tag="r16")
    record = json.loads(path.read_text())
    record["config"]["protocol"]["labeled"]["ratio"] = 0.0625
    record["overrides"]["labeled.ratio"] = 0.0625
    record["config_hash"] = "ce0r16"
    write_json_atomic(path, record)
    make_record(tmp_path, seed=0, miou=60.0, iterations=5000)
    agg = aggregate(load_records(tmp_path)).set_index("miou_mean")
    assert agg.loc[45.0, "label"] == "ce [labeled.ratio=0.0625]" and agg.loc[45.0, "curve_label"] == "ce"
    assert agg.loc[50.0, "curve_label"] == "ce"
    assert agg.loc[60.0, "curve_label"] == agg.loc[60.0, "label"] == "ce [train.iterations=5000]"
