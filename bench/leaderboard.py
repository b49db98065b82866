"""The leaderboard: every result record, read with pandas, turned into ``leaderboard.md`` and figures.

Never edited by hand; regenerating from the same records gives the same bytes (no timestamps,
sorted rows, fixed number formats, PNGs without software metadata).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from bench import BenchError
from bench.results import RESULT_FILE, config_hash, identity, load_per_image, read_record, write_text_atomic

SUPERVISION_KIND = {
    (): "none",
    ("pixel_labels",): "pixel labels",
    ("pixel_labels", "unlabeled_images"): "pixel labels + unlabelled",
    ("image_tags",): "image tags",
}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = json.dumps(value, sort_keys=True) if isinstance(value, list) else value
    return out


def annotation_hours(record: dict) -> float:
    """Estimated annotation time of the training set a run used (protocol's cost model, seconds/image)."""
    cost = record["config"]["protocol"]["annotation_cost_s"]
    split = record["split"]
    needs = set(record["supervision"])
    seconds = 0.0
    if "pixel_labels" in needs:
        seconds += split["n_labelled"] * cost["pixel_labels"]
    if "image_tags" in needs:
        seconds += split["n_train"] * cost["image_tags"]
    if "unlabeled_images" in needs:
        seconds += (split["n_train"] - split["n_labelled"]) * cost["unlabeled_images"]
    return seconds / 3600


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
    try:
        flat = _flatten(identity(r["config"], with_seed=False))
        m = r["metrics"]
        return {
            "protocol": r["protocol"], "method": r["method"], "seed": r["seed"],
            "supervision": SUPERVISION_KIND.get(tuple(sorted(r["supervision"])), "+".join(r["supervision"])),
            "miou": m["miou"], "pixel_acc": m["pixel_acc"], "mean_class_acc": m["mean_class_acc"],
            "per_class_iou": m["per_class_iou"], "matching": m.get("matching", "direct"),
            "cluster_to_class": m.get("cluster_to_class") if m.get("matching") == "hungarian" else None,
            "n_labelled": r["split"]["n_labelled"], "n_train": r["split"]["n_train"],
            "labelled_fraction": r["split"]["n_labelled"] / r["split"]["n_train"],
            "annotation_hours": annotation_hours(r),
            "train_time_s": r["train_time_s"], "images_per_s": r["train_images_per_s"],
            "dataset": r["config"]["protocol"]["dataset"]["name"],
            "class_names": r.get("dataset", {}).get("class_names") or list(m["per_class_iou"]),
            "group": config_hash(flat)[:10], "flat_config": flat,
            "path": str(path), "per_image": str(path.parent / r.get("per_image_file", "")),
            "eval_ids": r.get("dataset", {}).get("eval_ids_sha256"),
            "command_overrides": r.get("overrides", {}),
            "pseudo_labels": r.get("pseudo_labels"), "method_summary": r.get("method_summary") or {},
        }
    except (KeyError, TypeError, AttributeError, ZeroDivisionError) as exc:
        raise BenchError(f"result record {path} lacks field {exc} or holds a malformed one") from None


def _most_common(configs: dict[str, dict], weights: dict[str, int]) -> dict:
    """The config shared by the most runs (ties: the smallest group id)."""
    def runs_sharing(g):
        return sum(weights[h] for h in configs if configs[h] == configs[g])
    return configs[min(configs, key=lambda g: (-runs_sharing(g), g))]


def _method_defaults(method: str) -> dict | None:
    from bench.registry import get_method_class

    try:
        cls = get_method_class(method)
    except BenchError:  # a method no longer in methods/: compare with its most common setting
        return None
    # model_dump(mode="json"): tuples become lists, as in the records read back from JSON
    return _flatten({"method": {"name": method, **cls.Config().model_dump(mode="json")}})


def _differences(df: pd.DataFrame) -> dict[str, str]:
    """For each config group, the fields where it differs from its protocol's most common
    protocol setting and from its method's defaults ("" for a group that differs in nothing)."""
    out = {}
    runs_per_group = df.groupby("group").size().to_dict()
    for _, part in df.groupby("protocol"):
        groups = part.drop_duplicates("group").set_index("group")["flat_config"].to_dict()
        protocol_cfgs = {g: {k: v for k, v in c.items() if k.startswith("protocol.")} for g, c in groups.items()}
        ref = _most_common(protocol_cfgs, runs_per_group)
        for method, mpart in part.groupby("method"):
            method_groups = mpart["group"].unique()
            method_cfgs = {g: {k: v for k, v in groups[g].items() if k.startswith("method.")} for g in method_groups}
            method_ref = _method_defaults(method) or _most_common(method_cfgs, runs_per_group)
            for g in method_groups:
                cfg = {**protocol_cfgs[g], **method_cfgs[g]}
                base = {**ref, **method_ref}
                out[g] = ", ".join(f"{k.removeprefix('protocol.')}={cfg.get(k)}" for k in sorted(set(cfg) | set(base))
                                   if cfg.get(k) != base.get(k))
    return out


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (protocol, method, comparable config): mean and std over seeds."""
    diffs = _differences(df)
    rows = []
    for (protocol, method, group), part in df.groupby(["protocol", "method", "group"], sort=True):
        rows.append({
            "protocol": protocol, "method": method, "group": group,
            "supervision": part["supervision"].iloc[0],
            "miou_mean": part["miou"].mean(), "miou_std": part["miou"].std(ddof=1) if len(part) > 1 else np.nan,
            "pixel_acc_mean": part["pixel_acc"].mean(),
            "pixel_acc_std": part["pixel_acc"].std(ddof=1) if len(part) > 1 else np.nan,
            "seeds": len(part), "seed_list": ",".join(str(s) for s in sorted(part["seed"])),
            "labelled_fraction": part["labelled_fraction"].iloc[0], "n_labelled": part["n_labelled"].iloc[0],
            "annotation_hours": part["annotation_hours"].iloc[0], "dataset": part["dataset"].iloc[0],
            "train_time_s": part["train_time_s"].mean(), "images_per_s": part["images_per_s"].mean(),
            "differs": diffs.get(group, ""),
            "overrides": " ".join(f"{k}={v}" for k, v in sorted(part["command_overrides"].iloc[0].items())),
        })
    return pd.DataFrame(rows).sort_values(["protocol", "differs", "miou_mean", "method"],
                                          ascending=[True, True, False, True], ignore_index=True)


def _pm(mean: float, std: float) -> str:
    return f"{mean:.2f} ± {std:.2f}" if np.isfinite(std) else f"{mean:.2f}"


def protocol_table(agg: pd.DataFrame, protocol: str) -> str:
    part = agg[agg["protocol"] == protocol]
    lines = ["| method | supervision | mIoU (%) | pixel acc (%) | seeds | annotation (h) | train time (s) "
             "| images/s | differs from protocol |",
             "|---|---|---|---|---|---|---|---|---|"]
    for _, r in part.iterrows():
        lines.append(f"| {r['method']} | {r['supervision']} | {_pm(r['miou_mean'], r['miou_std'])} | "
                     f"{_pm(r['pixel_acc_mean'], r['pixel_acc_std'])} | {r['seeds']} | {r['annotation_hours']:.2f} | "
                     f"{r['train_time_s']:.0f} | {r['images_per_s']:.1f} | {r['differs'] or '—'} |")
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


def paired_bootstrap(df: pd.DataFrame, protocol: str, method_a: str, method_b: str, n_boot: int = 2000,
                     seed: int = 0, group_b: str | None = None) -> dict:
    """mIoU(b) - mIoU(a) on one protocol, runs paired by seed, with a 95% bootstrap interval over
    evaluation images (the same resampled images for both methods and every seed).

    Both sides are the runs of the protocol's usual setting, unless ``group_b`` names another
    config group of b (an ablation row)."""
    rows = df[(df["protocol"] == protocol)]
    ref_rows = rows[rows["group"].isin(_reference_groups(df))]
    a = ref_rows[ref_rows["method"] == method_a].set_index("seed")
    b_rows = ref_rows if group_b is None else rows[rows["group"] == group_b]
    b = b_rows[b_rows["method"] == method_b].set_index("seed")
    seeds = sorted(set(a.index) & set(b.index))
    if not seeds:
        raise BenchError(f"no seed has results for both {method_a} and {method_b} on {protocol}")
    mats_a, mats_b = [], []
    for s in seeds:
        for side, out in ((a.loc[s], mats_a), (b.loc[s], mats_b)):
            if not Path(side["per_image"]).is_file():
                raise BenchError(f"{side['path']}: no per-image file, cannot bootstrap over images")
            out.append(_square_per_image(load_per_image(Path(side["per_image"])), side["cluster_to_class"]))
        if a.loc[s]["eval_ids"] != b.loc[s]["eval_ids"]:
            raise BenchError(f"{method_a} and {method_b} seed {s} were evaluated on different images")
    n = mats_a[0].shape[0]
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.full(n, 1 / n), size=n_boot)  # [B, N] resampling weights

    def boot(mats):
        full = np.mean([_miou_batch(m.sum(0, keepdims=True))[0] for m in mats])
        resampled = np.mean([_miou_batch(np.einsum("bn,nij->bij", counts, m)) for m in mats], axis=0)
        return full, resampled

    full_a, boot_a = boot(mats_a)
    full_b, boot_b = boot(mats_b)
    diff = boot_b - boot_a
    per_seed = [float(b.loc[s]["miou"] - a.loc[s]["miou"]) for s in seeds]
    label_b = method_b if group_b is None else f"{method_b} ({_differences(df).get(group_b, '')})"
    return {"protocol": protocol, "a": method_a, "b": label_b, "seeds": seeds, "n_images": n,
            "diff": full_b - full_a, "ci_low": float(np.percentile(diff, 2.5)),
            "ci_high": float(np.percentile(diff, 97.5)), "per_seed_diff": per_seed, "n_boot": n_boot}


def format_comparison(c: dict) -> str:
    verdict = "better" if c["ci_low"] > 0 else "worse" if c["ci_high"] < 0 else "not distinguishable"
    seeds = ", ".join(f"{d:+.2f}" for d in c["per_seed_diff"])
    return (f"| {c['protocol']} | {c['b']} − {c['a']} | {c['diff']:+.2f} | [{c['ci_low']:+.2f}, {c['ci_high']:+.2f}] "
            f"| {seeds} | {verdict} |")


def _reference_groups(df: pd.DataFrame) -> set[str]:
    diffs = _differences(df)
    return {g for g in df["group"].unique() if not diffs.get(g)}


# ---------------------------------------------------------------- figures


def _figures(df: pd.DataFrame, agg: pd.DataFrame, fig_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns
    from matplotlib.ticker import FuncFormatter

    sns.set_theme(style="whitegrid", context="notebook")
    fig_dir.mkdir(parents=True, exist_ok=True)
    written = []
    ref = agg[agg["differs"] == ""]
    ref_runs = df[df["group"].isin(set(ref["group"]))]
    methods = sorted(ref["method"].unique())
    palette = dict(zip(methods, sns.color_palette("tab10", len(methods))))

    def save(fig, name):
        path = fig_dir / name
        fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
        plt.close(fig)
        written.append(path)

    # label-efficiency curve per dataset
    for dataset, runs in ref_runs.groupby("dataset"):
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        curves = runs[runs["supervision"].str.startswith("pixel labels")]
        if not curves.empty:
            sns.lineplot(data=curves, x="labelled_fraction", y="miou", hue="method", palette=palette,
                         marker="o", errorbar="sd", ax=ax)
        for method, part in runs[~runs["supervision"].str.startswith("pixel labels")].groupby("method"):
            mean = part.groupby("protocol")["miou"].mean().mean()
            ax.axhline(mean, ls="--", color=palette[method], label=f"{method} ({part['supervision'].iloc[0]})")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: "all" if v >= 1 else f"1/{round(1 / v)}"))
        ax.set_xlabel("fraction of training images with pixel labels")
        ax.set_ylabel("mIoU (%)")
        ax.set_title(f"{dataset}: label efficiency (band = std over seeds)")
        ax.legend(fontsize=8)
        save(fig, f"label_efficiency_{dataset}.png")

    # mIoU against the estimated annotation effort, all supervision kinds together
    if not ref.empty:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        sns.scatterplot(data=ref, x="annotation_hours", y="miou_mean", hue="method", style="supervision",
                        palette=palette, s=70, ax=ax)
        ax.errorbar(ref["annotation_hours"], ref["miou_mean"], yerr=ref["miou_std"].fillna(0), fmt="none",
                    ecolor="grey", alpha=0.6)
        for method, part in ref.sort_values("annotation_hours").groupby("method"):
            ax.plot(part["annotation_hours"], part["miou_mean"], color=palette[method], lw=1, alpha=0.5)
        # symlog: unsupervised runs cost 0 hours and still get a place on the axis
        ax.set_xscale("symlog", linthresh=1)
        top = max(1.0, float(ref["annotation_hours"].max()))
        ax.set_xticks([t for t in (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000) if t <= top * 1.5])
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("estimated annotation time of the training set (hours)")
        ax.set_ylabel("mIoU (%)")
        ax.set_title("what each hour of annotation buys")
        ax.legend(fontsize=7)
        save(fig, "miou_vs_annotation_hours.png")

    # per-class IoU heatmap per protocol
    for protocol, runs in ref_runs.groupby("protocol"):
        table = pd.DataFrame([{"method": r["method"], **{k: (np.nan if v is None else v)
                                                         for k, v in r["per_class_iou"].items()}}
                              for _, r in runs.iterrows()]).groupby("method").mean()
        table = table[[c for c in runs["class_names"].iloc[0] if c in table.columns]]  # class-index order
        fig, ax = plt.subplots(figsize=(1.0 + 0.6 * table.shape[1], 1.2 + 0.45 * len(table)))
        sns.heatmap(table, annot=True, fmt=".0f", vmin=0, vmax=100, cmap="viridis", cbar=False, ax=ax)
        ax.set_title(f"{protocol}: per-class IoU (%), mean over seeds")
        ax.set_ylabel("")
        save(fig, f"per_class_iou_{protocol}.png")
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


def render(results_dir: Path, output: Path, n_boot: int = 2000) -> str:
    df = load_records(results_dir)
    if df.empty:
        raise BenchError(f"no result records under {results_dir}; run `python -m bench run ...` first")
    agg = aggregate(df)
    fig_dir = Path(results_dir) / "figures"
    figures = _figures(df, agg, fig_dir)
    rel = lambda p: Path(p).resolve().relative_to(Path(output).resolve().parent).as_posix() \
        if Path(p).resolve().is_relative_to(Path(output).resolve().parent) else str(p)  # noqa: E731

    out = ["# Leaderboard", "",
           "Generated by `python -m bench leaderboard` from the records in "
           f"`{rel(results_dir)}/`; do not edit by hand. The runs behind it:", "", "```bash",
           *_commands(agg), "```", "",
           "mIoU and pixel accuracy: final checkpoint, whole evaluation split, mean ± std over seeds. "
           "Annotation time: the protocol's cost model (seconds per image: pixel labels, image tags, "
           "unlabelled) times the images each method's supervision used. Rows whose resolved config "
           "differs from the protocol's usual setting name the difference and are never pooled with it.", ""]
    for protocol in _protocol_order(agg, agg["protocol"]):
        out += [f"## {protocol}", "", protocol_table(agg, protocol), ""]
        heat = fig_dir / f"per_class_iou_{protocol}.png"
        if heat in figures:
            out += [f"![per-class IoU on {protocol}]({rel(heat)})", ""]
    pseudo = pseudo_label_table(df, agg)
    if pseudo:
        out += ["## Pseudo masks", "",
                "Methods trained from weaker supervision than pixel labels make masks for their training "
                "images; the harness scores them against the true masks after training (evaluation only). "
                "Coverage: share of valid pixels the pseudo masks label; \"labelled pixels\" scores those, "
                "\"all pixels\" counts unlabelled ones as misses.", "", pseudo, ""]
    comparisons = []
    ref_groups = _reference_groups(df)
    for protocol in _protocol_order(agg, agg["protocol"]):
        rows = agg[agg["protocol"] == protocol]
        if not ((rows["method"] == "ce") & rows["group"].isin(ref_groups)).any():
            continue
        for _, row in rows[rows["method"] != "ce"].sort_values(["method", "differs"]).iterrows():
            ablation = None if row["group"] in ref_groups else row["group"]
            comparisons.append(paired_bootstrap(df, protocol, "ce", row["method"], n_boot, group_b=ablation))
    out += ["## Paired comparisons against `ce`", ""]
    if comparisons:
        out += ["Difference in mIoU (points), runs paired by seed; 95% interval from a bootstrap over "
                f"evaluation images ({n_boot} resamples, the same images for both methods): it covers the "
                "uncertainty of the evaluation set; the per-seed column shows the training noise.", "",
                "| protocol | difference | mIoU diff | 95% CI | per seed | verdict |", "|---|---|---|---|---|---|",
                *[format_comparison(c) for c in comparisons], ""]
    else:
        out += ["None yet: a protocol needs `ce` and another method run on the same seeds.", ""]
    out += ["## Figures", ""]
    for path in figures:
        if not path.name.startswith("per_class_iou_"):
            out += [f"![{path.stem}]({rel(path)})", ""]
    text = "\n".join(out).rstrip() + "\n"
    write_text_atomic(Path(output), text)
    return text
