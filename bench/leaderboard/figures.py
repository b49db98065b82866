"""The leaderboard's figures: one fixed colour-blind-safe colour per method, label-efficiency and
annotation-cost plots, the forest plot of paired differences, training curves, prediction overlays."""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

from bench.leaderboard.records import given
from bench.leaderboard.statistics import MIN_SEEDS, TOO_FEW_SEEDS
from bench.predict import colour_mask, load_npz, overlay
from bench.telemetry import read_metrics

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


def write_figures(df: pd.DataFrame, agg: pd.DataFrame, comparisons: list[dict], fig_dir: Path,
                  real_photos: bool = False) -> dict[str, Path]:
    """Every figure, by key: ``label_efficiency_<dataset>``, ``miou_vs_annotation_hours``,
    ``paired_differences``, ``training_curves_<protocol>``, ``predictions_<protocol>`` (for a
    real-data protocol only with ``real_photos``: its overlays are copies of the dataset's images)."""
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
        curve_styles = _variant_styles(curves.assign(label=curves["curve_label"]))
        for label, part in curves.groupby("curve_label", sort=True):
            part = part.sort_values("labeled_fraction")
            ls, marker = curve_styles[label]
            colour = colours[part["method"].iloc[0]]
            ax.errorbar(part["labeled_fraction"], part["miou_mean"], yerr=part["miou_std"].fillna(0), color=colour,
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
            few = c["verdict"] == TOO_FEW_SEEDS
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
            lines = read_metrics(r["metrics_path"]) if given(r["metrics_path"]) else []
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

    # prediction overlays per protocol: image, ground truth, each row's first seed, in the table's
    # order (``aggregate`` puts rows at the protocol's settings before those with settings of their own)
    for protocol, runs in df.groupby("protocol"):
        if runs["dataset"].iloc[0] != "synth" and not real_photos:
            continue
        shown = []
        for _, row in agg[agg["protocol"] == protocol].iterrows():
            for _, r in runs[runs["group"] == row["group"]].sort_values("seed").iterrows():
                preds = load_npz(Path(r["predictions_path"])) if given(r["predictions_path"]) else None
                samples = load_npz(Path(r["samples_path"])) if given(r["samples_path"]) else None
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
