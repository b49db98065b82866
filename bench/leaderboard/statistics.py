"""Statistics over the per-image confusion matrices: the hierarchical (seeds, then images) paired
bootstrap of mIoU differences, verdicts, comparisons against a baseline, the majority-class rows."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from bench import BenchError
from bench.diagnostics import majority_baseline
from bench.leaderboard.records import config_differences, protocol_order, protocol_settings, read_per_image, row_label
from bench.results import load_per_image


def majority_rows(df: pd.DataFrame, differs: dict[str, str] | None = None) -> dict[str, dict]:
    """Per protocol: the scores of predicting the majority class everywhere, from the evaluation
    masks alone (any run's per-image matrices hold the ground-truth counts). ``differs``: each config
    group's differences from the section's setting (``aggregate``'s column); a run that changes the
    data or the evaluation (``dataset.resize``: other masks) gives it only where no run at the
    setting does."""
    differs = differs or {}
    at_setting = lambda group: not any(f.startswith(("dataset.", "eval.")) for f in differs.get(group, "").split(", "))  # noqa: E731
    out = {}
    for protocol, part in df.sort_values("path").groupby("protocol"):
        common = part["eval_ids"].mode()
        part = part[part["eval_ids"] == common.iloc[0]] if len(common) else part
        part = part.assign(_other=[not at_setting(g) for g in part["group"]]).sort_values("_other", kind="stable")
        for _, r in part.iterrows():
            mats = read_per_image(r)
            if mats is not None:
                out[protocol] = majority_baseline(mats.sum(0), r["class_names"])
                break
    return out


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
TOO_FEW_SEEDS = "too few seeds"  # the verdict below MIN_SEEDS


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
    settings = protocol_settings(rows)
    diffs = config_differences(rows)
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
    diffs = config_differences(df)
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
    label_b = row_label(method_b, diffs.get(group_b, ""))
    label_a = row_label(method_a, diffs.get(group_a, ""))
    return {"protocol": protocol, "a": label_a, "b": label_b, "method_a": method_a, "method_b": method_b,
            "group_a": group_a, "group_b": group_b, "seeds": seeds, "n_images": mats_a[0].shape[0],
            "diff": float(np.mean(per_seed)), "ci_low": float(np.percentile(diff, 2.5)),
            "ci_high": float(np.percentile(diff, 97.5)), "per_seed_diff": per_seed, "n_boot": n_boot,
            "verdict": verdict(len(seeds), float(np.percentile(diff, 2.5)), float(np.percentile(diff, 97.5)))}


def verdict(n_seeds: int, low: float, high: float) -> str:
    """One of four words, kept short so tables can show it as is; the comparison table says why
    "too few seeds" (its per-seed column counts them)."""
    if n_seeds < MIN_SEEDS:
        return TOO_FEW_SEEDS
    return "better" if low > 0 else "worse" if high < 0 else "not distinguishable"


def comparisons_against(df: pd.DataFrame, agg: pd.DataFrame, baseline: str = "ce", n_boot: int = 2000) -> list[dict]:
    """Every row of every protocol against the baseline row run under the same protocol settings."""
    out = []
    for protocol in protocol_order(agg, agg["protocol"]):
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
