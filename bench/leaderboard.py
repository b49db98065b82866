"""The leaderboard: every result record, read with pandas, turned into ``leaderboard.md`` and figures.

Never edited by hand; regenerating from the same records gives the same bytes (no timestamps,
sorted rows, fixed number formats, PNGs without software metadata).
"""
from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

from bench import BenchError, supervision
from bench.diagnostics import collapse_check, majority_baseline
from bench.telemetry import read_metrics
from bench.predict import colour_mask, load_npz, overlay
from bench.record import RunRecord, read_record
from bench.results import RESULT_FILE, config_hash, identity, load_per_image, write_text_atomic


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = json.dumps(value, sort_keys=True) if isinstance(value, list) else value
    return out


def annotation_hours(record: RunRecord) -> float:
    """Estimated annotation time of the training set a run used (protocol's cost model, seconds/image)."""
    return supervision.annotation_seconds(record.supervision, record.config.protocol["annotation_cost_s"],
                                          record.split.n_train, record.split.n_labelled) / 3600


def load_records(results_dir: Path, on_bad_record=None) -> pd.DataFrame:
    """One row per result record, with its comparable-config group (the config without seed and
    without fields that cannot change the numbers). A record that cannot be read is an error, or,
    with ``on_bad_record(path, message)``, reported through it and left out."""
    rows = []
    for path in sorted(Path(results_dir).rglob(RESULT_FILE)):
        try:
            rows.append(_record_row(path))
        except BenchError as exc:
            if on_bad_record is None:
                raise
            on_bad_record(path, str(exc))
    return pd.DataFrame(rows)


def _record_row(path: Path) -> dict:
    r = read_record(path)
    m = r.metrics
    try:
        flat = _flatten(identity(r.config.model_dump(exclude_unset=True), with_seed=False))
        return {
            "protocol": r.protocol, "method": r.method, "seed": r.seed,
            "supervision": supervision.label(r.supervision),
            "miou": m.miou, "pixel_acc": m.pixel_acc, "mean_class_acc": m.mean_class_acc,
            "per_class_iou": m.per_class_iou, "matching": m.matching,
            "cluster_to_class": m.cluster_to_class if m.matching == "hungarian" else None,
            "n_labelled": r.split.n_labelled, "n_train": r.split.n_train,
            "labelled_fraction": r.split.n_labelled / r.split.n_train,
            "annotation_hours": annotation_hours(r),
            "train_time_s": r.train_time_s, "images_per_s": r.train_images_per_s,
            "dataset": r.config.protocol["dataset"]["name"],
            "class_names": r.dataset.class_names or list(m.per_class_iou),
            "group": config_hash(flat)[:10], "flat_config": flat,
            "path": str(path), "per_image": str(path.parent / (r.per_image_file or "")),
            "eval_ids": r.dataset.eval_ids_sha256,
            "command_overrides": r.overrides,
            "pseudo_labels": r.pseudo_labels, "method_summary": r.method_summary,
            **_extra_fields(r, path),
            "stale": r.stale() is not None,
        }
    except (KeyError, TypeError, AttributeError, ZeroDivisionError) as exc:  # inside the recorded config
        raise BenchError(f"result record {path}: its config lacks field {exc} or holds a malformed one") from None


def _extra_fields(r: RunRecord, path: Path) -> dict:
    """Fields that records written before telemetry lack: None there, shown as "—"."""
    load = r.load or {}
    by_view = r.train_images_per_s_by_view
    if by_view is None:  # older records: split the total by the views' batch sizes (the same every step)
        by_view = _images_by_view_from_config(r)
    labelled = sum(v for k, v in by_view.items() if k in LABELLED_VIEWS)
    unlabelled = sum(v for k, v in by_view.items() if k not in LABELLED_VIEWS)
    best = r.best_validation or {}
    run = path.parent
    return {
        "cpu_time_s": r.train_cpu_time_s,
        "load_mean": load.get("mean_1min"), "cpu_count": load.get("cpu_count"),
        "labelled_images_per_s": labelled if any(k in LABELLED_VIEWS for k in by_view) else None,
        "unlabelled_images_per_s": unlabelled if any(k not in LABELLED_VIEWS for k in by_view) else None,
        "best_val_miou": best.get("miou"), "best_val_n": best.get("n_evaluations"),
        "metrics_path": str(run / r.metrics_file) if r.metrics_file else None,
        "predictions_path": str(run / r.predictions_file) if r.predictions_file else None,
        "samples_path": str(run.parent.parent / r.samples_file) if r.samples_file else None,
        "random_init_baseline": bool(r.config.method.get("random_init_baseline")),
    }


# views whose images carry labels (pixel masks or image tags); the others are unlabelled images
LABELLED_VIEWS = supervision.labelled_views()


def _images_by_view_from_config(r: RunRecord) -> dict[str, float]:
    sizes = supervision.batch_sizes(r.supervision, r.config.protocol["train"])
    total = sum(sizes.values())
    return {k: r.train_images_per_s * v / total for k, v in sizes.items()}


def _most_common(configs: dict[str, dict], weights: dict[str, int]) -> dict:
    """The config shared by the most runs (ties: the smallest group id)."""
    def runs_sharing(g):
        return sum(weights[h] for h in configs if configs[h] == configs[g])
    return configs[min(configs, key=lambda g: (-runs_sharing(g), g))]


def _method_defaults(method: str, protocol: str) -> dict | None:
    """The method's config as the protocol file sets it (its defaults under the protocol's
    ``methods`` settings), as a record's comparable config holds it."""
    from bench.protocol import load_protocol
    from bench.registry import get_method_class

    try:
        cls = get_method_class(method)
    except BenchError:  # a method no longer in methods/: compare with its most common setting
        return None
    try:
        settings = load_protocol(protocol).methods.get(method, {})
    except BenchError:  # a protocol given as a path elsewhere: the method's own defaults
        settings = {}
    # model_dump(mode="json"): tuples become lists, as in the records read back from JSON; through
    # identity(), as the records are, so that fields left out at their defaults compare equal
    try:
        config = cls.Config.model_validate(settings).model_dump(mode="json")
    except ValueError:  # pydantic's ValidationError: settings the method no longer takes
        return None
    return _flatten(identity({"method": {"name": method, **config}}, with_seed=False))


# where the data lies is not a setting: every real-data run names its own --data-root
NOT_A_SETTING = ("protocol.dataset.root",)


def _protocol_defaults(protocol: str) -> dict | None:
    """The protocol file's resolved config, as a record's comparable config holds it; None when no
    protocol file of that name exists (a protocol given as a path to a file elsewhere)."""
    from bench.protocol import load_protocol

    try:
        resolved = load_protocol(protocol).model_dump(mode="json")
    except BenchError:
        return None
    return _flatten(identity({"protocol": resolved}, with_seed=False))


def _differences(df: pd.DataFrame) -> dict[str, str]:
    """For each config group, the fields where it differs from its protocol file's resolved config
    and from its method's defaults ("" for a group that differs in nothing). A protocol with no file
    of its name is compared with its most common setting among the records instead."""
    out = {}
    runs_per_group = df.groupby("group").size().to_dict()
    for protocol, part in df.groupby("protocol"):
        groups = part.drop_duplicates("group").set_index("group")["flat_config"].to_dict()
        protocol_cfgs = {g: {k: v for k, v in c.items() if k.startswith("protocol.") and k not in NOT_A_SETTING}
                         for g, c in groups.items()}
        ref = _protocol_defaults(protocol)
        if ref is None:
            ref = _most_common(protocol_cfgs, runs_per_group)
        ref = {k: v for k, v in ref.items() if k not in NOT_A_SETTING}
        for method, mpart in part.groupby("method"):
            method_groups = mpart["group"].unique()
            method_cfgs = {g: {k: v for k, v in groups[g].items() if k.startswith("method.")} for g in method_groups}
            method_ref = _method_defaults(method, protocol) or _most_common(method_cfgs, runs_per_group)
            for g in method_groups:
                cfg = {**protocol_cfgs[g], **method_cfgs[g]}
                base = {**ref, **method_ref}
                out[g] = ", ".join(f"{k.removeprefix('protocol.')}={cfg.get(k)}" for k in sorted(set(cfg) | set(base))
                                   if cfg.get(k) != base.get(k))
    return out


def _protocol_settings(df: pd.DataFrame) -> dict[str, str]:
    """Per config group, its protocol-level settings only (the key that pairs a row with a ce row)."""
    return {g: json.dumps({k: v for k, v in c.items() if k.startswith("protocol.") and k not in NOT_A_SETTING},
                          sort_keys=True, default=str)
            for g, c in df.drop_duplicates("group").set_index("group")["flat_config"].items()}


def _label(method: str, differs: str) -> str:
    """A row's name in tables and figures: the method, with its settings where they differ."""
    return f"{method} [{differs.replace('method.', '')}]" if differs else method


def _given(path) -> bool:
    """A file column holds a path, not None or the NaN pandas puts where older records lack it."""
    return isinstance(path, str) and bool(path)


def _under_load(load_mean, cpu_count) -> bool | None:
    """Timing taken under load: the 1-minute load average (mean over the run) above the core count."""
    if load_mean is None or cpu_count is None or pd.isna(load_mean) or pd.isna(cpu_count):
        return None
    return bool(load_mean > cpu_count)


def _collapse(df: pd.DataFrame) -> list[bool | None]:
    """Per run: collapsed (from its per-image matrices, so older records are checked too), None
    without a per-image file."""
    out = []
    for _, r in df.iterrows():
        mats = _read_per_image(r)
        if mats is None:
            out.append(None)
            continue
        check = collapse_check(mats.sum(0), r["miou"], r["cluster_to_class"])
        out.append(check["collapsed"])
    return out


def _read_per_image(row) -> np.ndarray | None:
    path = Path(row["per_image"])
    if not path.is_file():
        return None
    try:
        return load_per_image(path)
    except BenchError:
        return None


def majority_rows(df: pd.DataFrame) -> dict[str, dict]:
    """Per protocol: the scores of predicting the majority class everywhere, from the evaluation
    masks alone (any run's per-image matrices hold the ground-truth counts)."""
    out = {}
    for protocol, part in df.sort_values("path").groupby("protocol"):
        common = part["eval_ids"].mode()
        for _, r in part[part["eval_ids"] == common.iloc[0]].iterrows() if len(common) else part.iterrows():
            mats = _read_per_image(r)
            if mats is not None:
                out[protocol] = majority_baseline(mats.sum(0), r["class_names"])
                break
    return out


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (protocol, method, comparable config): mean and std over seeds."""
    diffs = _differences(df)
    df = df.copy()
    df["collapsed"] = _collapse(df)
    df["under_load"] = [_under_load(r["load_mean"], r["cpu_count"]) for _, r in df.iterrows()]
    rows = []
    for (protocol, method, group), part in df.groupby(["protocol", "method", "group"], sort=True):
        times = part["train_time_s"]
        best = part["best_val_miou"].dropna()
        rows.append({
            "protocol": protocol, "method": method, "group": group,
            "label": _label(method, diffs.get(group, "")),
            "supervision": part["supervision"].iloc[0],
            "miou_mean": part["miou"].mean(), "miou_std": part["miou"].std(ddof=1) if len(part) > 1 else np.nan,
            "pixel_acc_mean": part["pixel_acc"].mean(),
            "pixel_acc_std": part["pixel_acc"].std(ddof=1) if len(part) > 1 else np.nan,
            "seeds": len(part), "seed_list": ",".join(str(s) for s in sorted(part["seed"])),
            "labelled_fraction": part["labelled_fraction"].iloc[0], "n_labelled": part["n_labelled"].iloc[0],
            "annotation_hours": part["annotation_hours"].iloc[0], "dataset": part["dataset"].iloc[0],
            "train_time_s": times.mean(), "train_time_min": times.min(), "train_time_max": times.max(),
            "cpu_time_s": part["cpu_time_s"].mean() if part["cpu_time_s"].notna().all() else np.nan,
            "images_per_s": part["images_per_s"].mean(),
            "labelled_images_per_s": part["labelled_images_per_s"].mean(),
            "unlabelled_images_per_s": part["unlabelled_images_per_s"].mean(),
            "best_val_miou": best.mean() if len(best) == len(part) else np.nan,
            "best_val_n": part["best_val_n"].min() if len(best) == len(part) else np.nan,
            "collapsed": int(sum(c is True for c in part["collapsed"])),
            "stale": int(part["stale"].sum()),
            "under_load": int(sum(u is True for u in part["under_load"])),
            "load_known": int(sum(u is not None for u in part["under_load"])),
            "context": "random-init baseline" if part["random_init_baseline"].all() else "",
            "differs": diffs.get(group, ""),
            "overrides": " ".join(f"{k}={v}" for k, v in sorted(part["command_overrides"].iloc[0].items())),
        })
    return pd.DataFrame(rows).sort_values(["protocol", "differs", "miou_mean", "method"],
                                          ascending=[True, True, False, True], ignore_index=True)


def _pm(mean: float, std: float) -> str:
    return f"{mean:.2f} ± {std:.2f}" if np.isfinite(std) else f"{mean:.2f}"


def _num(value, fmt: str) -> str:
    return "—" if value is None or pd.isna(value) else format(value, fmt)


def _train_time(r) -> str:
    """The mean, or the range where the seeds' times differ by more than half (concurrent jobs)."""
    lo, hi = r["train_time_min"], r["train_time_max"]
    if r["seeds"] > 1 and hi > 1.5 * max(lo, 1e-9):
        return f"{lo:.0f}–{hi:.0f}"
    return f"{r['train_time_s']:.0f}"


def _notes(r) -> str:
    notes = []
    if r["stale"]:
        notes.append(f"**stale**: older method code ({r['stale']}/{r['seeds']} seeds; re-run pending)")
    if r["collapsed"]:
        notes.append(f"**collapsed** ({r['collapsed']}/{r['seeds']} seeds)")
    if r["under_load"]:
        notes.append(f"timed under load ({r['under_load']}/{r['seeds']} seeds)")
    if r["context"]:
        notes.append(f"context: {r['context']}")
    return "; ".join(notes) or "—"


def protocol_table(agg: pd.DataFrame, protocol: str, majority: dict | None = None) -> str:
    part = agg[agg["protocol"] == protocol]
    best = part["best_val_miou"].notna().any()
    lines = ["| method | supervision | mIoU (%) | "
             + ("best-of-N val mIoU (%) ⚠ optimistic | " if best else "")
             + "pixel acc (%) | seeds | annotation (h) | train time (s) | CPU time (s) "
             "| labelled img/s | unlabelled img/s | notes | differs from protocol |",
             "|---|---|---|" + ("---|" if best else "") + "---|---|---|---|---|---|---|---|---|"]
    for _, r in part.iterrows():
        best_cell = (f"{_num(r['best_val_miou'], '.2f')}" + (f" (N={r['best_val_n']:.0f})" if pd.notna(r["best_val_n"])
                                                             else "") + " | ") if best else ""
        lines.append(f"| {r['method']} | {r['supervision']} | {_pm(r['miou_mean'], r['miou_std'])} | {best_cell}"
                     f"{_pm(r['pixel_acc_mean'], r['pixel_acc_std'])} | {r['seeds']} | {r['annotation_hours']:.2f} | "
                     f"{_train_time(r)} | {_num(r['cpu_time_s'], '.0f')} | {_num(r['labelled_images_per_s'], '.1f')} | "
                     f"{_num(r['unlabelled_images_per_s'], '.1f')} | {_notes(r)} | {r['differs'] or '—'} |")
    if majority:
        lines.append(f"| *majority class* ({majority['class']}) | context | {majority['miou']:.2f} | "
                     + ("— | " if best else "")
                     + f"{majority['pixel_acc']:.2f} | — | 0.00 | — | — | — | — | "
                     "context: from the evaluation masks alone | — |")
    return "\n".join(lines)


def per_class_table(agg: pd.DataFrame, df: pd.DataFrame, protocol: str) -> str:
    """Per-class IoU (%), mean over each row's seeds, classes in index order."""
    runs = df[df["protocol"] == protocol]
    classes = list(runs["class_names"].iloc[0])
    lines = ["| row | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
    for _, r in agg[agg["protocol"] == protocol].iterrows():
        seeds = runs[runs["group"] == r["group"]]
        cells = []
        for c in classes:
            values = [v for v in (run["per_class_iou"].get(c) for _, run in seeds.iterrows()) if v is not None]
            cells.append(f"{np.mean(values):.1f}" if values else "—")
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pseudo_label_table(df: pd.DataFrame, agg: pd.DataFrame) -> str | None:
    """Per run, for methods that make pseudo masks of their training images (scored by the harness
    against the true masks after training): their quality next to the final mIoU."""
    part = df[df["pseudo_labels"].notna()].sort_values(["protocol", "method", "group", "seed"])
    if part.empty:
        return None
    differs = {(r["protocol"], r["group"]): r["differs"] for _, r in agg.iterrows()}
    lines = ["| protocol | method | seed | pseudo-mask coverage (%) | pseudo-mask mIoU, labelled pixels (%) "
             "| pseudo-mask mIoU, all pixels (%) | final mIoU (%) | facts | differs from protocol |",
             "|---|---|---|---|---|---|---|---|---|"]
    for _, r in part.iterrows():
        p, facts = r["pseudo_labels"], r["method_summary"]
        shown = ", ".join(f"{k}={v}" for k, v in facts.items() if isinstance(v, (bool, int, float)) and v is not None)
        lines.append(f"| {r['protocol']} | {r['method']} | {r['seed']} | {p['coverage']:.1f} | "
                     f"{p['labelled_pixels']['miou']:.2f} | {p['all_pixels']['miou']:.2f} | {r['miou']:.2f} | "
                     f"{shown or '—'} | {differs.get((r['protocol'], r['group'])) or '—'} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- paired comparison


def _square_per_image(per_image: np.ndarray, cluster_to_class: list[int] | None) -> np.ndarray:
    """[N, C, K] per-image confusions -> [N, C, C + 1]: class columns, then unmatched clusters."""
    n, c, k = per_image.shape
    if cluster_to_class is None:
        return np.concatenate([per_image, np.zeros((n, c, 1), per_image.dtype)], axis=2).astype(np.int64)
    onehot = np.zeros((k, c + 1), np.int64)
    onehot[np.arange(k), np.where(np.asarray(cluster_to_class) < 0, c, cluster_to_class)] = 1
    return per_image.astype(np.int64) @ onehot


def _miou_batch(mats: np.ndarray) -> np.ndarray:
    """mIoU (%) of each [C, C + 1] matrix in a batch [B, C, C + 1] (same convention as bench.metrics)."""
    c = mats.shape[1]
    tp = np.einsum("bii->bi", mats[:, :, :c])
    gt, pred = mats.sum(2), mats[:, :, :c].sum(1)
    union = gt + pred - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    return np.nanmean(iou, axis=1) * 100


MIN_SEEDS = 3  # paired seeds below which no verdict is given: the seed level of the bootstrap is unknown


def _pick_group(rows: pd.DataFrame, method: str, diffs: dict[str, str]) -> str | None:
    """A method's row on a protocol: its protocol-default one, else the one with most seeds."""
    groups = rows[rows["method"] == method].groupby("group").size()
    if groups.empty:
        return None
    default = [g for g in groups.index if not diffs.get(g)]
    return default[0] if default else min(groups.index, key=lambda g: (-groups[g], g))


def _partner_group(rows: pd.DataFrame, method: str, group_b: str) -> str | None:
    """The group of ``method`` run under the same protocol settings as ``group_b`` (its own method
    settings at their defaults where such a row exists)."""
    settings = _protocol_settings(rows)
    diffs = _differences(rows)
    same = [g for g in rows[rows["method"] == method]["group"].unique() if settings[g] == settings[group_b]]
    if not same:
        return None
    plain = [g for g in same if not any(part.startswith("method.") for part in diffs.get(g, "").split(", ") if part)]
    return sorted(plain or same)[0]


def _seed_mats(rows: pd.DataFrame, seeds: list[int]) -> list[np.ndarray]:
    out = []
    for s in seeds:
        side = rows.loc[s]
        if not Path(side["per_image"]).is_file():
            raise BenchError(f"{side['path']}: no per-image file, cannot bootstrap over images")
        out.append(_square_per_image(load_per_image(Path(side["per_image"])), side["cluster_to_class"]))
    return out


def hierarchical_bootstrap(mats_a: list[np.ndarray], mats_b: list[np.ndarray], n_boot: int = 2000,
                           seed: int = 0) -> np.ndarray:
    """Resampled mean paired mIoU differences (b - a), [n_boot].

    Two levels, paired: each resample draws S seeds with replacement from the S paired seeds, then,
    for each drawn seed, N evaluation images with replacement; both methods get the same seeds and
    the same images. The statistic is the mean over the drawn seeds of mIoU(b) - mIoU(a), each
    mIoU computed from the resampled images' summed confusion matrices. It carries both the
    training noise (seeds) and the evaluation-set noise (images).
    """
    n_seeds, n = len(mats_a), mats_a[0].shape[0]
    rng = np.random.default_rng(seed)
    seed_draw = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    counts = rng.multinomial(n, np.full(n, 1 / n), size=(n_boot, n_seeds)).astype(np.float64)  # [B, S, N]
    diff = np.zeros(n_boot)
    for j in range(n_seeds):  # the j-th draw: which seed, and its own image counts
        per_seed = []
        for s in range(n_seeds):
            a = counts[:, j] @ mats_a[s].reshape(n, -1)  # one BLAS product per (seed, draw)
            b = counts[:, j] @ mats_b[s].reshape(n, -1)
            shape = (n_boot, *mats_a[s].shape[1:])
            per_seed.append(_miou_batch(b.reshape(shape)) - _miou_batch(a.reshape(shape)))
        diff += np.stack(per_seed)[seed_draw[:, j], np.arange(n_boot)]
    return diff / n_seeds


def paired_bootstrap(df: pd.DataFrame, protocol: str, method_a: str, method_b: str, n_boot: int = 2000,
                     seed: int = 0, group_b: str | None = None, group_a: str | None = None) -> dict:
    """mIoU(b) - mIoU(a) on one protocol, runs paired by seed, with a 95% hierarchical bootstrap
    interval (seeds, then evaluation images; see ``hierarchical_bootstrap``).

    b's row: ``group_b``, else its protocol-default row, else its row with most seeds; a's row: the
    one run under the same protocol settings as b's."""
    rows = df[df["protocol"] == protocol]
    diffs = _differences(df)
    group_b = group_b or _pick_group(rows, method_b, diffs)
    if group_b is None:
        raise BenchError(f"no seed has results for both {method_a} and {method_b} on {protocol}")
    group_a = group_a or _partner_group(rows, method_a, group_b)
    if group_a is None:
        raise BenchError(f"{method_b} on {protocol} ({diffs.get(group_b) or 'protocol settings'}): no {method_a} "
                         f"run under the same protocol settings")
    a = rows[rows["group"] == group_a].set_index("seed")
    b = rows[rows["group"] == group_b].set_index("seed")
    seeds = sorted(set(a.index) & set(b.index))
    if not seeds:
        raise BenchError(f"no seed has results for both {method_a} and {method_b} on {protocol}")
    for s in seeds:
        if a.loc[s]["eval_ids"] != b.loc[s]["eval_ids"]:
            raise BenchError(f"{method_a} and {method_b} seed {s} were evaluated on different images")
    mats_a, mats_b = _seed_mats(a, seeds), _seed_mats(b, seeds)
    if len({m.shape[0] for m in mats_a + mats_b}) != 1:
        raise BenchError(f"{method_a} and {method_b} on {protocol}: per-image files of different lengths")
    per_seed = [float(_miou_batch(mb.sum(0, keepdims=True))[0] - _miou_batch(ma.sum(0, keepdims=True))[0])
                for ma, mb in zip(mats_a, mats_b)]
    diff = hierarchical_bootstrap(mats_a, mats_b, n_boot, seed)
    label_b = _label(method_b, diffs.get(group_b, ""))
    label_a = _label(method_a, diffs.get(group_a, ""))
    return {"protocol": protocol, "a": label_a, "b": label_b, "method_a": method_a, "method_b": method_b,
            "group_a": group_a, "group_b": group_b, "seeds": seeds, "n_images": mats_a[0].shape[0],
            "diff": float(np.mean(per_seed)), "ci_low": float(np.percentile(diff, 2.5)),
            "ci_high": float(np.percentile(diff, 97.5)), "per_seed_diff": per_seed, "n_boot": n_boot,
            "verdict": verdict(len(seeds), float(np.percentile(diff, 2.5)), float(np.percentile(diff, 97.5)))}


def verdict(n_seeds: int, low: float, high: float) -> str:
    if n_seeds < MIN_SEEDS:
        return f"too few seeds ({n_seeds} < {MIN_SEEDS})"
    return "better" if low > 0 else "worse" if high < 0 else "not distinguishable"


COMPARISON_HEADER = ("| protocol | difference | mIoU diff | 95% CI | per seed | verdict |\n"
                     "|---|---|---|---|---|---|")


def format_comparison(c: dict) -> str:
    seeds = ", ".join(f"{d:+.2f}" for d in c["per_seed_diff"])
    return (f"| {c['protocol']} | {c['b']} − {c['a']} | {c['diff']:+.2f} | [{c['ci_low']:+.2f}, {c['ci_high']:+.2f}] "
            f"| {seeds} | {c['verdict']} |")


def comparisons_against(df: pd.DataFrame, agg: pd.DataFrame, baseline: str = "ce", n_boot: int = 2000) -> list[dict]:
    """Every row of every protocol against the baseline row run under the same protocol settings."""
    out = []
    for protocol in _protocol_order(agg, agg["protocol"]):
        rows = df[df["protocol"] == protocol]
        for _, row in agg[(agg["protocol"] == protocol) & (agg["method"] != baseline)].sort_values(
                ["method", "differs"]).iterrows():
            partner = _partner_group(rows, baseline, row["group"])
            if partner is None:
                continue
            try:
                out.append(paired_bootstrap(df, protocol, baseline, row["method"], n_boot, group_b=row["group"],
                                            group_a=partner))
            except BenchError as exc:
                if "no seed has results" not in str(exc):
                    raise
    return out


BOOTSTRAP_NOTE = (
    "Difference in mIoU (points), runs paired by seed, each row against the `ce` row run under the same protocol "
    "settings. 95% interval from a hierarchical bootstrap ({n_boot} resamples): each resample draws the paired seeds "
    "with replacement, then, within each drawn seed, the evaluation images with replacement; both methods get the "
    "same draws, so the interval carries the training noise (seeds) and the evaluation-set noise (images). With "
    "fewer than {min_seeds} paired seeds the seed-to-seed spread cannot be estimated: the verdict is then "
    "\"too few seeds\", whatever the interval.")


# ---------------------------------------------------------------- figures

# One colour per method in every figure: the Okabe-Ito colour-blind-safe set (its yellow left out:
# too pale on white), then Paul Tol's wine and olive; methods not named here take the remaining
# colours of Tol's muted set in name order.
METHOD_COLOURS = {
    "ce": "#000000", "pixcontrast": "#E69F00", "prcl": "#0072B2", "picie": "#009E73", "aepsl": "#CC79A7",
    "meanteacher": "#56B4E9", "fixmatch": "#D55E00", "unimatch": "#882255",
}
SPARE_COLOURS = ["#999933", "#332288", "#44AA99", "#AA4499", "#DDCC77", "#117733", "#88CCEE", "#CC6677"]
HLINE_STYLES = ["--", ":", "-.", (0, (5, 1)), (0, (1, 1))]  # rows without pixel labels: horizontal lines
VARIANT_STYLES = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1)), "v"), ((0, (1, 1)), "P")]


def method_colours(methods) -> dict[str, str]:
    out = {m: METHOD_COLOURS[m] for m in methods if m in METHOD_COLOURS}
    spare = iter(SPARE_COLOURS * 4)
    for m in sorted(set(methods) - set(out)):
        out[m] = next(spare)
    return out


def _variant_styles(agg: pd.DataFrame) -> dict[str, tuple]:
    """Per row label: (line style, marker); a method's protocol-default row gets the solid line."""
    out = {}
    for _, part in agg.groupby("method"):
        # the default row first, then the rows run on most protocols and seeds
        runs = part.groupby("label").agg(protocols=("protocol", "size"), seeds=("seeds", "sum"))
        labels = sorted(runs.index, key=lambda lab: ("[" in lab, -runs.loc[lab, "protocols"],
                                                     -runs.loc[lab, "seeds"], lab))
        for i, lab in enumerate(labels):
            out[lab] = VARIANT_STYLES[i % len(VARIANT_STYLES)]
    return out


def _figures(df: pd.DataFrame, agg: pd.DataFrame, comparisons: list[dict], fig_dir: Path) -> dict[str, Path]:
    """Every figure, by key: ``label_efficiency_<dataset>``, ``miou_vs_annotation_hours``,
    ``paired_differences``, ``training_curves_<protocol>``, ``predictions_<protocol>``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    plt.rcParams.update({"font.size": 9, "axes.grid": True, "grid.alpha": 0.3})
    fig_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    colours = method_colours(agg["method"].unique())
    styles = _variant_styles(agg)

    def save(fig, name):
        path = fig_dir / f"{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
        plt.close(fig)
        written[name] = path

    def legend(ax, **kw):
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, **kw)

    # label-efficiency curve per dataset: every row, its settings in the legend
    for dataset, rows in agg.groupby("dataset"):
        fig, ax = plt.subplots(figsize=(6.5, 4.0))
        curves = rows[rows["supervision"].str.startswith("pixel labels")]
        for label, part in curves.groupby("label", sort=True):
            part = part.sort_values("labelled_fraction")
            ls, marker = styles[label]
            colour = colours[part["method"].iloc[0]]
            ax.errorbar(part["labelled_fraction"], part["miou_mean"], yerr=part["miou_std"].fillna(0), color=colour,
                        ls=ls, marker=marker, ms=5, capsize=3, lw=1.5, label=label)
        for label, part in rows[~rows["supervision"].str.startswith("pixel labels")].groupby("label", sort=True):
            variant = [s for s, _ in VARIANT_STYLES].index(styles[label][0])
            ax.axhline(part["miou_mean"].mean(), ls=HLINE_STYLES[variant % len(HLINE_STYLES)],
                       color=colours[part["method"].iloc[0]], lw=1.4, label=f"{label} ({part['supervision'].iloc[0]})")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: "all" if v >= 1 else f"1/{round(1 / v)}"))
        ax.set_xlabel("fraction of training images with pixel labels")
        ax.set_ylabel("mIoU (%)")
        ax.set_title(f"{dataset}: label efficiency (bars = std over seeds)")
        legend(ax)
        save(fig, f"label_efficiency_{dataset}")

    # mIoU against the estimated annotation effort, every row
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    for label, part in agg.groupby("label", sort=True):
        part = part.sort_values("annotation_hours")
        ls, marker = styles[label]
        ax.errorbar(part["annotation_hours"], part["miou_mean"], yerr=part["miou_std"].fillna(0),
                    color=colours[part["method"].iloc[0]], ls=ls, marker=marker, ms=5, capsize=3, lw=1, label=label)
    ax.set_xscale("symlog", linthresh=1)  # unsupervised runs cost 0 hours and still get a place
    top = max(1.0, float(agg["annotation_hours"].max()))
    ax.set_xticks([t for t in (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000) if t <= top * 1.5])
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("estimated annotation time of the training set (hours)")
    ax.set_ylabel("mIoU (%)")
    ax.set_title("what each hour of annotation buys")
    legend(ax)
    save(fig, "miou_vs_annotation_hours")

    # forest plot of the paired differences
    if comparisons:
        fig, ax = plt.subplots(figsize=(7.0, 0.8 + 0.32 * len(comparisons)))
        ys = np.arange(len(comparisons))[::-1]
        for y, c in zip(ys, comparisons):
            colour = colours.get(c["method_b"], "#777777")
            few = c["verdict"].startswith("too few")
            ax.errorbar(c["diff"], y, xerr=[[c["diff"] - c["ci_low"]], [c["ci_high"] - c["diff"]]], fmt="o",
                        color=colour, mfc="white" if few else colour, capsize=3, ms=6)
        ax.axvline(0, color="grey", lw=1)
        ax.set_yticks(ys, [f"{c['protocol']}: {c['b']}" for c in comparisons], fontsize=7)
        ax.set_xlabel("mIoU difference against ce (points), 95% hierarchical bootstrap interval")
        ax.set_title(f"paired differences (hollow: fewer than {MIN_SEEDS} seeds, no verdict)")
        save(fig, "paired_differences")

    # training curves per protocol, from the runs' metrics.jsonl
    for protocol, runs in df.groupby("protocol"):
        curves = {}
        for _, r in runs.sort_values(["group", "seed"]).iterrows():
            lines = read_metrics(r["metrics_path"]) if _given(r["metrics_path"]) else []
            if lines:
                curves.setdefault(r["group"], []).append(lines)
        if not curves:
            continue
        labels = agg.set_index("group")["label"].to_dict()
        method_of = agg.set_index("group")["method"].to_dict()
        has_val = any(e["kind"] == "val" for runs_ in curves.values() for lines in runs_ for e in lines)
        fig, axes = plt.subplots(1, 3 if has_val else 2, figsize=(12 if has_val else 9, 3.6))
        for group, seed_runs in sorted(curves.items(), key=lambda kv: labels[kv[0]]):
            colour, (ls, _) = colours[method_of[group]], styles[labels[group]]
            for i, lines in enumerate(seed_runs):
                train = [e for e in lines if e["kind"] == "train"]
                it = [e["iteration"] for e in train]
                kw = dict(color=colour, ls=ls, lw=1, alpha=0.8, marker=".", ms=3,
                          label=labels[group] if i == 0 else None)
                axes[0].plot(it, [e["parts"].get("loss", np.nan) for e in train], **kw)
                axes[1].plot(it, [e["lr"] for e in train], **kw)
                if has_val:
                    val = [e for e in lines if e["kind"] == "val"]
                    axes[2].plot([e["iteration"] for e in val], [e["miou"] for e in val], **kw)
        if all(v > 0 for line in axes[0].get_lines() for v in np.asarray(line.get_ydata(), float) if np.isfinite(v)):
            axes[0].set_yscale("log")
        axes[0].set_title("training loss (window mean)")
        axes[1].set_title("learning rate")
        for ax in axes:
            ax.set_xlabel("iteration (all stages)")
        if has_val:
            axes[2].set_title("validation mIoU (%) (eval.every)")
        legend(axes[-1])
        fig.suptitle(f"{protocol}: training curves (one line per seed)", y=1.03)
        save(fig, f"training_curves_{protocol}")

    # prediction overlays per protocol: image, ground truth, each row's first seed
    for protocol, runs in df.groupby("protocol"):
        shown = []
        for _, row in agg[agg["protocol"] == protocol].iterrows():
            for _, r in runs[runs["group"] == row["group"]].sort_values("seed").iterrows():
                preds = load_npz(Path(r["predictions_path"])) if _given(r["predictions_path"]) else None
                samples = load_npz(Path(r["samples_path"])) if _given(r["samples_path"]) else None
                if preds is not None and samples is not None:
                    shown.append((row["label"], r["seed"], preds, samples))
                    break
        if not shown:
            continue
        samples = shown[0][3]
        n = len(samples["ids"])
        fig, axes = plt.subplots(n, 2 + len(shown), figsize=(1.6 * (2 + len(shown)), 1.6 * n + 0.4), squeeze=False)
        for i in range(n):
            cells = [("image", samples[f"image_{i}"]), ("ground truth", colour_mask(samples[f"mask_{i}"]))]
            for label, seed, preds, _ in shown:
                ok = f"pred_{i}" in preds and str(preds["ids"][i]) == str(samples["ids"][i])
                cells.append((f"{label} (seed {seed})", overlay(samples[f"image_{i}"], preds[f"pred_{i}"], 0.6)
                              if ok else np.full_like(samples[f"image_{i}"], 255)))
            for ax, (title, picture) in zip(axes[i], cells):
                ax.imshow(picture, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                ax.grid(False)
                if i == 0:
                    ax.set_title(textwrap.fill(title, 24, break_on_hyphens=False), fontsize=6)  # settings wrap
            axes[i][0].set_ylabel(str(samples["ids"][i]), fontsize=6)
        fig.suptitle(f"{protocol}: predictions on the first {n} evaluation images (overlay)", fontsize=9)
        save(fig, f"predictions_{protocol}")
    return written


# ---------------------------------------------------------------- the document


def _commands(agg: pd.DataFrame) -> list[str]:
    """The `bench run` commands that reproduce the records, derived from the records themselves:
    one per set of (methods, seeds, overrides), listing every protocol it was run on."""
    per_protocol = agg.groupby(["protocol", "seed_list", "overrides"])["method"].apply(
        lambda m: ",".join(sorted(set(m)))).reset_index()
    cmds = []
    for (methods, seeds, overrides), part in per_protocol.groupby(["method", "seed_list", "overrides"]):
        protocols = ",".join(_protocol_order(agg, part["protocol"]))
        cmds.append(f"python -m bench run --methods {methods} --protocol {protocols} --seeds {seeds}"
                    + (f" {overrides}" if overrides else ""))
    return sorted(cmds)


def _protocol_order(agg: pd.DataFrame, protocols) -> list[str]:
    """Protocols by dataset, then by labelled fraction (1/16 before 1/8 before full), then name."""
    keys = agg.groupby("protocol").agg(dataset=("dataset", "first"), fraction=("labelled_fraction", "first"))
    return sorted(set(protocols), key=lambda p: (keys.loc[p, "dataset"], keys.loc[p, "fraction"], p))


def render(results_dir: Path, output: Path | None = None, n_boot: int = 2000, on_bad_record=None) -> str:
    """Write ``output`` (default ``<results_dir>/leaderboard.md``; the CLI passes the project's
    top-level page for ``results/``) and the figures in ``<results_dir>/figures/``; links are
    relative to the page. A record that cannot be read is left out, named on the page under
    "Records left out" and passed to ``on_bad_record(path, message)``."""
    results_dir = Path(results_dir)
    output = Path(output) if output is not None else results_dir / "leaderboard.md"
    left_out = []

    def leave_out(path, message):
        left_out.append((path, message))
        if on_bad_record is not None:
            on_bad_record(path, message)

    df = load_records(results_dir, on_bad_record=leave_out)
    if df.empty:
        raise BenchError(f"no result records under {results_dir}; run `python -m bench run ...` first")
    agg = aggregate(df)
    comparisons = comparisons_against(df, agg, "ce", n_boot)
    fig_dir = results_dir / "figures"
    figures = _figures(df, agg, comparisons, fig_dir)
    majority = majority_rows(df)
    page_dir = output.resolve().parent
    rel = lambda p: os.path.relpath(Path(p).resolve(), page_dir).replace(os.sep, "/")  # noqa: E731

    out = ["# Leaderboard", "",
           "Generated by `python -m bench leaderboard` from the records in "
           f"{'this folder' if rel(results_dir) == '.' else f'`{rel(results_dir)}/`'}; do not edit by hand. "
           "The runs behind it:", "", "```bash",
           *_commands(agg), "```", "",
           "mIoU and pixel accuracy: final checkpoint, whole evaluation split, mean ± std over seeds. "
           "Annotation time: the protocol's cost model (seconds per image: pixel labels, image tags, "
           "unlabelled) times the images each method's supervision used. \"differs from protocol\": every field "
           "where the row's resolved config differs from the protocol file and the method's defaults; such rows "
           "are never pooled with others. Train time: wall time of the training loop (a range where the seeds' "
           "times differ by more than half); CPU time: the process's CPU seconds in it; \"timed under load\": the "
           "machine's 1-minute load average during the run exceeded its core count. Images/s count labelled images "
           "(pixel labels or tags) and unlabelled ones separately. Context rows: the majority class predicted "
           "everywhere (from the evaluation masks alone) and random-init baselines; a run is **collapsed** when one "
           "class takes more than 95% of its predicted pixels or its mIoU is not more than 1 point above the "
           "majority-class row. A **stale** row was made by an older revision of its method's code (a change "
           "since then alters its numbers, e.g. a correction towards the reference); it is kept until re-run. "
           "A best-of-N validation column appears where runs set `eval.report=best`: the best "
           "of N evaluations on the evaluation split during training, optimistic by construction (the field's "
           "U2PL/CPS/UniMatch convention). Records written before telemetry lack some of these facts (\"—\") and "
           "have no training curves (`metrics.jsonl`) or prediction overlays (`predictions.npz`).", ""]
    for protocol in _protocol_order(agg, agg["protocol"]):
        out += [f"## {protocol}", "", protocol_table(agg, protocol, majority.get(protocol)), "",
                "Per-class IoU (%), mean over seeds:", "", per_class_table(agg, df, protocol), ""]
        for key, title in ((f"training_curves_{protocol}", "training curves"),
                           (f"predictions_{protocol}", "predictions")):
            if key in figures:
                out += [f"![{title} on {protocol}]({rel(figures[key])})", ""]
    pseudo = pseudo_label_table(df, agg)
    if pseudo:
        out += ["## Pseudo masks", "",
                "Methods trained from weaker supervision than pixel labels make masks for their training "
                "images; the harness scores them against the true masks after training (evaluation only). "
                "Coverage: share of valid pixels the pseudo masks label; \"labelled pixels\" scores those, "
                "\"all pixels\" counts unlabelled ones as misses.", "", pseudo, ""]
    out += ["## Paired comparisons against `ce`", ""]
    if comparisons:
        out += [BOOTSTRAP_NOTE.format(n_boot=n_boot, min_seeds=MIN_SEEDS), "", COMPARISON_HEADER,
                *[format_comparison(c) for c in comparisons], ""]
        if "paired_differences" in figures:
            out += [f"![paired differences]({rel(figures['paired_differences'])})", ""]
    else:
        out += ["None yet: a protocol needs `ce` and another method run on the same seeds and protocol settings.", ""]
    out += ["## Figures", ""]
    for key, path in figures.items():
        if key.startswith(("label_efficiency_", "miou_vs_")):
            out += [f"![{key}]({rel(path)})", ""]
    if left_out:
        out += ["## Records left out", "", "These records cannot be read; fix or delete them:", ""]
        out += [f"- {message.replace(str(path), f'`{rel(path)}`')}" for path, message in left_out] + [""]
    text = "\n".join(out).rstrip() + "\n"
    write_text_atomic(output, text)
    return text
