"""``leaderboard.md``: tables per protocol, per-class IoU, pseudo masks, paired comparisons, figures
and the commands behind the records. Regenerating from the same records gives the same bytes."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from bench import BenchError
from bench.leaderboard.figures import write_figures
from bench.leaderboard.records import aggregate, load_records, protocol_order
from bench.leaderboard.statistics import MIN_SEEDS, TOO_FEW_SEEDS, comparisons_against, majority_rows
from bench.results import write_text_atomic


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
             "| labeled img/s | unlabeled img/s | notes | differs from protocol |",
             "|---|---|---|" + ("---|" if best else "") + "---|---|---|---|---|---|---|---|---|"]
    for _, r in part.iterrows():
        best_cell = (f"{_num(r['best_val_miou'], '.2f')}" + (f" (N={r['best_val_n']:.0f})" if pd.notna(r["best_val_n"])
                                                             else "") + " | ") if best else ""
        lines.append(f"| {r['method']} | {r['supervision']} | {_pm(r['miou_mean'], r['miou_std'])} | {best_cell}"
                     f"{_pm(r['pixel_acc_mean'], r['pixel_acc_std'])} | {r['seeds']} | {r['annotation_hours']:.2f} | "
                     f"{_train_time(r)} | {_num(r['cpu_time_s'], '.0f')} | {_num(r['labeled_images_per_s'], '.1f')} | "
                     f"{_num(r['unlabeled_images_per_s'], '.1f')} | {_notes(r)} | {r['differs'] or '—'} |")
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
    lines = ["| protocol | method | seed | pseudo-mask coverage (%) | pseudo-mask mIoU, labeled pixels (%) "
             "| pseudo-mask mIoU, all pixels (%) | final mIoU (%) | facts | differs from protocol |",
             "|---|---|---|---|---|---|---|---|---|"]
    for _, r in part.iterrows():
        p, facts = r["pseudo_labels"], r["method_summary"]
        shown = ", ".join(f"{k}={v}" for k, v in facts.items() if isinstance(v, (bool, int, float)) and v is not None)
        lines.append(f"| {r['protocol']} | {r['method']} | {r['seed']} | {p['coverage']:.1f} | "
                     f"{p['labeled_pixels']['miou']:.2f} | {p['all_pixels']['miou']:.2f} | {r['miou']:.2f} | "
                     f"{shown or '—'} | {differs.get((r['protocol'], r['group'])) or '—'} |")
    return "\n".join(lines)


def glance_table(agg: pd.DataFrame, comparisons: list[dict], baseline: str = "ce") -> str | None:
    """Every method at its defaults (rows that differ from nothing; no context rows) across the
    protocols where at least two such methods ran: mIoU mean ± std (seeds), and for the others
    their paired difference to ``baseline`` with its verdict. Rows by supervision: most annotation
    first, the baseline first among its kind."""
    rows = agg[(agg["differs"] == "") & (agg["context"] == "")]
    protocols = [p for p in protocol_order(agg, rows["protocol"]) if (rows["protocol"] == p).sum() >= 2]
    if not protocols:
        return None
    rows = rows[rows["protocol"].isin(protocols)]
    verdicts = {(c["protocol"], c["b"]): c for c in comparisons if c["a"] == baseline}
    # annotation as a share of the most any row of the protocol used: comparable across protocols
    share = rows["annotation_hours"] / rows.groupby("protocol")["annotation_hours"].transform("max").clip(lower=1e-12)
    kinds = rows.assign(share=share).groupby("method").agg(share=("share", "mean"), supervision=("supervision", "first"))
    methods = sorted(kinds.index, key=lambda m: (-round(kinds.loc[m, "share"], 6), kinds.loc[m, "supervision"],
                                                 m != baseline, m))
    n_labeled = rows.groupby("protocol")["n_labeled"].first()
    lines = ["| method | supervision | " + " | ".join(f"{p} ({n_labeled[p]:.0f} labeled)" for p in protocols) + " |",
             "|---|---|" + "---|" * len(protocols)]
    for m in methods:
        cells = []
        for p in protocols:
            r = rows[(rows["protocol"] == p) & (rows["method"] == m)]
            if r.empty:
                cells.append("—")
                continue
            r = r.iloc[0]
            cell = f"{_pm(r['miou_mean'], r['miou_std'])} ({r['seeds']})" + "".join(
                f" **{flag}**" for flag in ("collapsed", "stale") if r[flag])
            c = verdicts.get((p, m))
            if c is not None:
                cell += f" · {c['diff']:+.2f}, {c['verdict']}"
            cells.append(cell)
        lines.append(f"| {m} | {kinds.loc[m, 'supervision']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


GLANCE_NOTE = (
    "Each method at its defaults on every protocol where at least two methods ran at theirs: mIoU (%), "
    "mean ± std over seeds (the number of seeds in brackets), then the paired difference to `{baseline}` in "
    "points and its verdict (\"Paired comparisons\" below: a verdict needs {min_seeds} paired seeds and counts "
    "the seed-to-seed and the evaluation-image noise). Ablations and other settings are in the sections per "
    "protocol.")


COMPARISON_HEADER = ("| protocol | difference | mIoU diff | 95% CI | per seed | verdict |\n"
                     "|---|---|---|---|---|---|")


def format_comparison(c: dict) -> str:
    seeds = ", ".join(f"{d:+.2f}" for d in c["per_seed_diff"])
    why = f" ({len(c['seeds'])} < {MIN_SEEDS})" if c["verdict"] == TOO_FEW_SEEDS else ""
    return (f"| {c['protocol']} | {c['b']} − {c['a']} | {c['diff']:+.2f} | [{c['ci_low']:+.2f}, {c['ci_high']:+.2f}] "
            f"| {seeds} | {c['verdict']}{why} |")


BOOTSTRAP_NOTE = (
    "Difference in mIoU (points), runs paired by seed, each row against the `ce` row run under the same protocol "
    "settings. 95% interval from a hierarchical bootstrap ({n_boot} resamples): each resample draws the paired seeds "
    "with replacement, then, within each drawn seed, the evaluation images with replacement; both methods get the "
    "same draws, so the interval carries the training noise (seeds) and the evaluation-set noise (images). With "
    "fewer than {min_seeds} paired seeds the seed-to-seed spread cannot be estimated: the verdict is then "
    "\"too few seeds\", whatever the interval.")


def _commands(agg: pd.DataFrame) -> list[str]:
    """The `bench run` commands that reproduce the records, derived from the records themselves:
    one per set of (methods, seeds, overrides), listing every protocol it was run on."""
    per_protocol = agg.groupby(["protocol", "seed_list", "overrides"])["method"].apply(
        lambda m: ",".join(sorted(set(m)))).reset_index()
    cmds = []
    for (methods, seeds, overrides), part in per_protocol.groupby(["method", "seed_list", "overrides"]):
        protocols = ",".join(protocol_order(agg, part["protocol"]))
        cmds.append(f"python -m bench run --methods {methods} --protocol {protocols} --seeds {seeds}"
                    + (f" {overrides}" if overrides else ""))
    return sorted(cmds)


def render(results_dir: Path, output: Path | None = None, n_boot: int = 2000, on_bad_record=None,
           real_photos: bool = False) -> str:
    """Write ``output`` (default ``<results_dir>/leaderboard.md``; the CLI passes the project's
    top-level page for ``results/``) and the figures in ``<results_dir>/figures/``; links are
    relative to the page. A record that cannot be read is left out, named on the page under
    "Records left out" and passed to ``on_bad_record(path, message)``. ``real_photos``: prediction
    overlays for real-data protocols too (they show the dataset's images)."""
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
    figures = write_figures(df, agg, comparisons, fig_dir, real_photos)
    majority = majority_rows(df, dict(zip(agg["group"], agg["differs"])))
    page_dir = output.resolve().parent
    rel = lambda p: os.path.relpath(Path(p).resolve(), page_dir).replace(os.sep, "/")  # noqa: E731

    out = ["# Leaderboard", "",
           "Generated by `python -m bench leaderboard` from the records in "
           f"{'this folder' if rel(results_dir) == '.' else f'`{rel(results_dir)}/`'}; do not edit by hand. "
           "The commands behind the records and how to read the tables: \"Runs and columns\".", ""]
    glance = glance_table(agg, comparisons)
    if glance:
        out += ["## At a glance", "", GLANCE_NOTE.format(baseline="ce", min_seeds=MIN_SEEDS), "", glance, ""]
    out += ["## Runs and columns", "", "The runs behind the records:", "", "```bash", *_commands(agg), "```", "",
           "mIoU and pixel accuracy: final checkpoint, whole evaluation split, mean ± std over seeds. "
           "Annotation time: the protocol's cost model (seconds per image: pixel labels, image tags, "
           "unlabeled) times the images each method's supervision used. \"differs from protocol\": every field "
           "where the row's resolved config differs from the protocol file and the method's defaults; such rows "
           "are never pooled with others. Train time: wall time of the training loop (a range where the seeds' "
           "times differ by more than half); CPU time: the process's CPU seconds in it; \"timed under load\": the "
           "machine's mean 1-minute load average during the run, less the threads the run kept busy (its CPU time, "
           "loader workers' included, over its train time; in records without the workers' time, its threads "
           "and workers), was above 0.5: something else ran beside it for much of the run. Images/s count labeled images "
           "(pixel labels or tags) and unlabeled ones separately. Context rows: the majority class predicted "
           "everywhere (from the evaluation masks alone) and random-init baselines; a run is **collapsed** when one "
           "class takes more than 95% of its predicted pixels or its mIoU is not more than 1 point above the "
           "majority-class row. A **stale** row was made by an older revision of its method's code (a change "
           "since then alters its numbers, e.g. a correction towards the reference); it is kept until re-run. "
           "A best-of-N validation column appears where runs set `eval.report=best`: the best "
           "of N evaluations on the evaluation split during training, optimistic by construction (the field's "
           "U2PL/CPS/UniMatch convention). Records written before telemetry lack some of these facts (\"—\") and "
           "have no training curves (`metrics.jsonl`) or prediction overlays (`predictions.npz`).", ""]
    for protocol in protocol_order(agg, agg["protocol"]):
        preset = agg.loc[agg["protocol"] == protocol, "section_preset"].iloc[0]
        setting = ([f"Setting: the protocol file at `--preset {preset}` (`protocols/_presets.yaml`, and the "
                    "protocol's `presets:` block where it has one); \"differs from protocol\" is against that.", ""]
                   if isinstance(preset, str) else [])
        out += [f"## {protocol}", "", *setting, protocol_table(agg, protocol, majority.get(protocol)), "",
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
                "Coverage: share of valid pixels the pseudo masks label; \"labeled pixels\" scores those, "
                "\"all pixels\" counts unlabeled ones as misses.", "", pseudo, ""]
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
