"""The records a results folder holds, as pandas rows: one per run, then one per config group (seeds
pooled), with what each group's config differs in from its protocol file and method defaults."""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from bench import BenchError, supervision
from bench.diagnostics import collapse_check
from bench.record import RunRecord, read_record
from bench.results import RESULT_FILE, config_hash, identity, load_per_image


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
                                          record.split.n_train, record.split.n_labeled) / 3600


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
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    # a section is one protocol: two datasets under one name would share its rows and pairs, so such a
    # protocol is an error, or, with ``on_bad_record``, reported once and left out like a bad record
    datasets = df.groupby("protocol")["dataset"].unique()
    for protocol, names in datasets[datasets.map(len) > 1].items():
        message = (f"results dir {results_dir}: protocol {protocol} has records of several datasets "
                   f"({', '.join(sorted(names))}); give each dataset its own protocol file "
                   f"(extends: _folder, name: <dataset>_<split>) or its own --results-dir")
        if on_bad_record is None:
            raise BenchError(message)
        on_bad_record(Path(results_dir) / protocol, message)
        df = df[df["protocol"] != protocol]
    return df.reset_index(drop=True)


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
            "n_labeled": r.split.n_labeled, "n_train": r.split.n_train,
            "labeled_fraction": r.split.n_labeled / r.split.n_train,
            "annotation_hours": annotation_hours(r),
            "train_time_s": r.train_time_s, "images_per_s": r.train_images_per_s,
            "dataset": dataset_label(r.config.protocol["dataset"]),
            "class_names": r.dataset.class_names or list(m.per_class_iou),
            "group": config_hash(flat)[:10], "flat_config": flat,
            "path": str(path), "per_image": str(path.parent / (r.per_image_file or "")),
            "eval_ids": r.dataset.eval_ids_sha256,
            "command_overrides": r.overrides, "preset": preset_of(r.overrides, r.protocol),
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
    labeled = sum(v for k, v in by_view.items() if k in LABELED_VIEWS)
    unlabeled = sum(v for k, v in by_view.items() if k not in LABELED_VIEWS)
    best = r.best_validation or {}
    run = path.parent
    return {
        "cpu_time_s": r.train_cpu_time_s,
        "load_mean": load.get("mean_1min"), "cpu_count": load.get("cpu_count"), "own_threads": _own_threads(r),
        "labeled_images_per_s": labeled if any(k in LABELED_VIEWS for k in by_view) else None,
        "unlabeled_images_per_s": unlabeled if any(k not in LABELED_VIEWS for k in by_view) else None,
        "best_val_miou": best.get("miou"), "best_val_n": best.get("n_evaluations"),
        "metrics_path": str(run / r.metrics_file) if r.metrics_file else None,
        "predictions_path": str(run / r.predictions_file) if r.predictions_file else None,
        "samples_path": str(run.parent.parent / r.samples_file) if r.samples_file else None,
        "random_init_baseline": bool(r.config.method.get("random_init_baseline")),
    }


# views whose images carry labels (pixel masks or image tags); the others are unlabeled images
LABELED_VIEWS = supervision.labeled_views()


def _images_by_view_from_config(r: RunRecord) -> dict[str, float]:
    sizes = supervision.batch_sizes(r.supervision, r.config.protocol["train"])
    total = sum(sizes.values())
    return {k: r.train_images_per_s * v / total for k, v in sizes.items()}


def _most_common(configs: dict[str, dict], weights: dict[str, int]) -> dict:
    """The config shared by the most runs (ties: the smallest group id)."""
    def runs_sharing(g):
        return sum(weights[h] for h in configs if configs[h] == configs[g])
    return configs[min(configs, key=lambda g: (-runs_sharing(g), g))]


@functools.lru_cache(maxsize=None)
def _preset_pairs(name: str, protocol: str) -> tuple:
    from bench.protocol import preset_overrides

    try:
        pairs = preset_overrides(name, protocol)
    except BenchError:  # a protocol given as a path elsewhere: the preset alone
        pairs = preset_overrides(name)
    return tuple((".".join(k), v) for k, v in pairs)


def preset_of(overrides: dict, protocol: str) -> str | None:
    """The preset whose every key (the protocol's refinement included) a record's command overrides
    set: a ``--preset cpu`` run (or the same keys typed out). A later override of one of its keys
    keeps the preset; the row names that value as a difference from the protocol at the preset."""
    from bench.protocol import load_presets

    for name in sorted(load_presets()):
        pairs = _preset_pairs(name, protocol)
        if pairs and all(k in overrides for k, _ in pairs):
            return name
    return None


def _at_preset(protocol: str, preset: str | None) -> dict | None:
    """Overrides that resolve ``protocol`` at ``preset`` (None: the file as it is)."""
    return {tuple(k.split(".")): v for k, v in _preset_pairs(preset, protocol)} if preset else None


def _method_defaults(method: str, protocol: str, preset: str | None = None) -> dict | None:
    """The method's config as the protocol file (at ``preset``) sets it (its defaults under the
    protocol's ``methods`` settings), as a record's comparable config holds it."""
    from bench.protocol import load_protocol
    from bench.registry import get_method_class

    try:
        cls = get_method_class(method)
    except BenchError:  # a method no longer in methods/: compare with its most common setting
        return None
    try:
        settings = load_protocol(protocol, _at_preset(protocol, preset)).methods.get(method, {})
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


def _protocol_defaults(protocol: str, preset: str | None = None) -> dict | None:
    """The protocol file's resolved config (at ``preset``), as a record's comparable config holds
    it; None when no protocol file of that name exists (a protocol given as a path elsewhere)."""
    from bench.protocol import load_protocol

    try:
        resolved = load_protocol(protocol, _at_preset(protocol, preset)).model_dump(mode="json")
    except BenchError:
        return None
    return _flatten(identity({"protocol": resolved}, with_seed=False))


def section_presets(df: pd.DataFrame) -> dict[str, str | None]:
    """Per protocol, the preset its rows are compared at: the one the most of its runs were made at
    (ties: no preset, then by name). Real-data rows at ``--preset cpu`` then name what they differ
    in from the CPU setting, not the preset's dozen fields in every row."""
    out = {}
    for protocol, part in df.groupby("protocol"):
        counts = part["preset"].fillna("").value_counts()
        out[protocol] = min(counts.index, key=lambda name: (-counts[name], name)) or None
    return out


def config_difference_fields(df: pd.DataFrame, presets: dict[str, str | None] | None = None) -> dict[str, dict]:
    """For each config group, the fields where it differs from its protocol file's resolved config
    (at the section's preset, ``section_presets``) and from its method's defaults ("" for a group
    that differs in nothing), as ``{field: value}`` in field order (``protocol.`` dropped from the
    names). A protocol with no file of its name is compared with its most common setting among the
    records instead. ``presets``: ``section_presets(df)``, when the caller has it."""
    out = {}
    runs_per_group = df.groupby("group").size().to_dict()
    presets = section_presets(df) if presets is None else presets
    for protocol, part in df.groupby("protocol"):
        groups = part.drop_duplicates("group").set_index("group")["flat_config"].to_dict()
        protocol_cfgs = {g: {k: v for k, v in c.items() if k.startswith("protocol.") and k not in NOT_A_SETTING}
                         for g, c in groups.items()}
        ref = _protocol_defaults(protocol, presets[protocol])
        if ref is None:
            ref = _most_common(protocol_cfgs, runs_per_group)
        ref = {k: v for k, v in ref.items() if k not in NOT_A_SETTING}
        for method, mpart in part.groupby("method"):
            method_groups = mpart["group"].unique()
            method_cfgs = {g: {k: v for k, v in groups[g].items() if k.startswith("method.")} for g in method_groups}
            method_ref = (_method_defaults(method, protocol, presets[protocol])
                          or _most_common(method_cfgs, runs_per_group))
            for g in method_groups:
                cfg = {**protocol_cfgs[g], **method_cfgs[g]}
                base = {**ref, **method_ref}
                out[g] = {k.removeprefix("protocol."): cfg.get(k) for k in sorted(set(cfg) | set(base))
                          if cfg.get(k) != base.get(k)}
    return out


def format_differences(fields: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in fields.items())


def config_differences(df: pd.DataFrame, presets: dict[str, str | None] | None = None) -> dict[str, str]:
    """``config_difference_fields`` as the text tables show: "train.iterations=200, ..."."""
    return {g: format_differences(f) for g, f in config_difference_fields(df, presets).items()}


def protocol_settings(df: pd.DataFrame) -> dict[str, str]:
    """Per config group, its protocol-level settings only (the key that pairs a row with a ce row)."""
    return {g: json.dumps({k: v for k, v in c.items() if k.startswith("protocol.") and k not in NOT_A_SETTING},
                          sort_keys=True, default=str)
            for g, c in df.drop_duplicates("group").set_index("group")["flat_config"].items()}


def row_label(method: str, differs: str) -> str:
    """A row's name in tables and figures: the method, with its settings where they differ."""
    return f"{method} [{differs.replace('method.', '')}]" if differs else method


def given(path) -> bool:
    """A file column holds a path, not None or the NaN pandas puts where older records lack it."""
    return isinstance(path, str) and bool(path)


# another process's runnable threads, on average over the run, beyond which its timing is "under load"
OTHER_LOAD_LIMIT = 0.5


def _under_load(load_mean, own_threads) -> bool | None:
    """Timing taken under load: the 1-minute load average (mean over the run) less the run's own
    busy threads above half a thread, i.e. something else ran beside it for much of the run. (The
    load against the core count alone called a one-thread run beside another one-thread run on 2
    cores loaded at a mean load of 2.02 and not at 1.90.)"""
    if load_mean is None or own_threads is None or pd.isna(load_mean) or pd.isna(own_threads):
        return None
    return bool(load_mean - own_threads > OTHER_LOAD_LIMIT)


def _own_threads(r: RunRecord) -> float:
    """Threads a run kept busy on average: its CPU time, loader workers' included, over its training
    time, where the record has both; older records, and those without the workers' time: torch's
    threads per process on CPU (from ``device``, "cpu (N threads)"), one per process on a GPU, plus
    its loader workers, as if all were busy all the time (mostly idle workers hid another run beside
    a run that loads little)."""
    processes = r.processes or 1
    if r.train_worker_cpu_time_s is not None and r.train_cpu_time_s is not None and r.train_time_s > 0:
        return (r.train_cpu_time_s + r.train_worker_cpu_time_s) / r.train_time_s * processes
    match = re.fullmatch(r"cpu \((\d+) threads?(?:, .*)?\)", r.device or "")
    workers = (r.loader_workers or {}).get("used") or 0
    return (int(match.group(1)) if match else 1) * processes + workers


def _collapse(df: pd.DataFrame) -> list[bool | None]:
    """Per run: collapsed (from its per-image matrices, so older records are checked too), None
    without a per-image file."""
    out = []
    for _, r in df.iterrows():
        mats = read_per_image(r)
        if mats is None:
            out.append(None)
            continue
        check = collapse_check(mats.sum(0), r["miou"], r["cluster_to_class"])
        out.append(check["collapsed"])
    return out


def read_per_image(row) -> np.ndarray | None:
    path = Path(row["per_image"])
    if not path.is_file():
        return None
    try:
        return load_per_image(path)
    except BenchError:
        return None


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (protocol, method, comparable config): mean and std over seeds."""
    presets = section_presets(df)
    fields = config_difference_fields(df, presets)
    diffs = {g: format_differences(f) for g, f in fields.items()}
    df = df.copy()
    df["collapsed"] = _collapse(df)
    df["under_load"] = [_under_load(r["load_mean"], r["own_threads"]) for _, r in df.iterrows()]
    rows = []
    for (protocol, method, group), part in df.groupby(["protocol", "method", "group"], sort=True):
        times = part["train_time_s"]
        best = part["best_val_miou"].dropna()
        preset = part["preset"].iloc[0] if isinstance(part["preset"].iloc[0], str) else None
        rows.append({
            "protocol": protocol, "method": method, "group": group,
            "label": row_label(method, diffs.get(group, "")),
            # its label-efficiency curve: the labeled split is the curve's x, so a run that differs
            # from its protocol only in ``labeled.*`` (e.g. labeled.ratio=0.03125) is a point on the
            # method's default curve, not a curve of its own
            "curve_label": row_label(method, format_differences(
                {k: v for k, v in fields.get(group, {}).items() if not k.startswith("labeled.")})),
            "supervision": part["supervision"].iloc[0],
            "miou_mean": part["miou"].mean(), "miou_std": part["miou"].std(ddof=1) if len(part) > 1 else np.nan,
            "pixel_acc_mean": part["pixel_acc"].mean(),
            "pixel_acc_std": part["pixel_acc"].std(ddof=1) if len(part) > 1 else np.nan,
            "seeds": len(part), "seed_list": ",".join(str(s) for s in sorted(part["seed"])),
            "labeled_fraction": part["labeled_fraction"].iloc[0], "n_labeled": part["n_labeled"].iloc[0],
            "annotation_hours": part["annotation_hours"].iloc[0], "dataset": part["dataset"].iloc[0],
            "train_time_s": times.mean(), "train_time_min": times.min(), "train_time_max": times.max(),
            "cpu_time_s": part["cpu_time_s"].mean() if part["cpu_time_s"].notna().all() else np.nan,
            "images_per_s": part["images_per_s"].mean(),
            "labeled_images_per_s": part["labeled_images_per_s"].mean(),
            "unlabeled_images_per_s": part["unlabeled_images_per_s"].mean(),
            "best_val_miou": best.mean() if len(best) == len(part) else np.nan,
            "best_val_n": part["best_val_n"].min() if len(best) == len(part) else np.nan,
            "collapsed": int(sum(c is True for c in part["collapsed"])),
            "stale": int(part["stale"].sum()),
            "under_load": int(sum(u is True for u in part["under_load"])),
            "load_known": int(sum(u is not None for u in part["under_load"])),
            "context": "random-init baseline" if part["random_init_baseline"].all() else "",
            "differs": diffs.get(group, ""),
            "preset": preset, "section_preset": presets[protocol],
            "overrides": command_flags(part["command_overrides"].iloc[0], protocol, preset),
        })
    return pd.DataFrame(rows).sort_values(["protocol", "differs", "miou_mean", "method"],
                                          ascending=[True, True, False, True], ignore_index=True)


def command_flags(overrides: dict, protocol: str, preset: str | None) -> str:
    """A record's command-line overrides as `bench run` takes them: its preset as ``--preset``,
    the data folder as ``--data-root`` (the recording machine's path, which is no setting, is
    replaced by a placeholder ending in the folder's name), the rest as sorted key=value."""
    held = dict(_preset_pairs(preset, protocol)) if preset else {}
    rest = {k: v for k, v in overrides.items() if k not in held or held[k] != v}
    flags = [f"--preset {preset}"] if preset else []
    root = rest.pop("dataset.root", None)
    if root:
        flags.append(f"--data-root /path/to/{Path(str(root).rstrip('/')).name}")
    return " ".join(flags + [f"{k}={v}" for k, v in sorted(rest.items())])


def dataset_label(dataset: dict) -> str:
    """What the page calls a record's dataset: its reader's name, or for the generic folder reader the
    dataset folder's name (stanford_background and msrc_v2 are both read by ``folder``)."""
    if dataset["name"] == "folder" and dataset.get("root"):
        return Path(dataset["root"]).name
    return dataset["name"]


def protocol_order(agg: pd.DataFrame, protocols) -> list[str]:
    """Protocols by dataset, real photographs first and the generated synth scenes last, then by
    labeled fraction (1/16 before 1/8 before full), then name."""
    keys = agg.groupby("protocol").agg(dataset=("dataset", "first"), fraction=("labeled_fraction", "first"))
    return sorted(set(protocols), key=lambda p: (keys.loc[p, "dataset"] == "synth", keys.loc[p, "dataset"],
                                                 keys.loc[p, "fraction"], p))
