"""Command line: ``bench run``, ``bench leaderboard``, ``bench compare``, ``bench eval``, ``bench predict``,
``bench data check``, ``bench list``."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench import BenchError


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line (``bench run: error: ...``) like every other error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _csv(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:  # an empty list would make a sweep of nothing and exit 0
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in _csv(text)]
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"seeds must be integers separated by commas, got {text!r}") from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bench", description="Label-efficiency benchmark for semantic segmentation.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="train and evaluate methods on a protocol",
                         description="Train and evaluate methods on a protocol. Finished runs (same resolved "
                                     "config) are skipped, checkpointed ones resume.")
    run.add_argument("--methods", required=True, type=_csv, help="comma-separated method names (see `bench list`)")
    run.add_argument("--protocol", required=True, type=_csv,
                     help="comma-separated protocol names (see `bench list`) or paths to .yaml files")
    run.add_argument("--seeds", type=_seeds, default=[0], help="comma-separated seeds (default: 0)")
    run.add_argument("--results-dir", type=Path, default=Path("results"), help="where result records go (default: results/)")
    run.add_argument("--cache-dir", type=Path, default=None,
                     help="generated data and checkpoints (default: $BENCH_CACHE_DIR or .bench_cache/)")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    run.add_argument("--data-root", default=None, help="dataset folder (sets dataset.root)")
    run.add_argument("--pretrained", action="store_true", help="ask timm for pretrained backbone weights (needs the network)")
    run.add_argument("--weights", default=None, help="local backbone weights file (a state dict)")
    run.add_argument("--preset", default=None,
                     help="a named set of overrides from protocols/_presets.yaml (e.g. cpu), recorded in the result")
    run.add_argument("--split-file", default=None,
                     help="your own list of labeled ids (one per line, e.g. a U2PL/UniMatch list) instead of the "
                          "protocol's seeded selection; its sha256 and path go into every record")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--launcher", choices=["inline", "local", "slurm"], default="inline",
                     help="inline: one run after another here; local: a process per run, one per GPU at a time "
                          "(or --workers CPU workers); slurm: a submitit job array (default: inline)")
    run.add_argument("--workers", type=_positive, default=None, help="local launcher: number of workers")
    run.add_argument("--slurm-partition", default=None)
    run.add_argument("--slurm-time", type=_positive, default=240, help="minutes per run (default: 240)")
    run.add_argument("--slurm-gpus", type=_positive, default=1, help="GPUs per run (default: 1)")
    run.add_argument("--slurm-cpus", type=_positive, default=8, help="CPUs per run (default: 8)")
    run.add_argument("--slurm-array-parallelism", type=_positive, default=64)
    run.add_argument("--slurm-folder", type=Path, default=Path("slurm_logs"), help="submitit logs (default: slurm_logs/)")
    run.add_argument("--slurm-cluster", default=None, help=argparse.SUPPRESS)  # "local"/"debug": tests without Slurm
    run.add_argument("--wait", action="store_true", help="slurm: wait for the jobs and print the results")
    run.add_argument("--keep-checkpoint", action="store_true",
                     help="keep each finished run's final checkpoint in the cache (weights and method state; its "
                          "path goes into the record), for `bench eval` and `bench predict`")
    run.add_argument("--tensorboard", action="store_true",
                     help="also log the telemetry of metrics.jsonl to <run dir>/tensorboard/ (needs tensorboard)")
    run.add_argument("overrides", nargs="*", metavar="key=value",
                     help="config overrides, recorded in the result: protocol fields (train.iterations=100), "
                          "method.x=v for every method, <method>.x=v for one")

    board = sub.add_parser("leaderboard", help="regenerate leaderboard.md and its figures from the result records",
                           description="Regenerate leaderboard.md (tables, paired comparisons) and the figures "
                                       "in <results-dir>/figures/ from every result record.")
    board.add_argument("--results-dir", type=Path, default=Path("results"), help="records to read (default: results/)")
    board.add_argument("--output", type=Path, default=None,
                       help="default: leaderboard.md for results/ (the project's page), else <results-dir>/leaderboard.md")
    board.add_argument("--bootstrap", type=_positive, default=2000, help="bootstrap resamples for comparisons (default: 2000)")
    board.add_argument("--real-photos", action="store_true",
                       help="draw the prediction overlays of real-data protocols too: they show the dataset's "
                            "photographs and true masks (off by default, so a page you publish holds no copies "
                            "of a dataset whose licence forbids them; synth's are always drawn)")

    cmp = sub.add_parser("compare", help="paired comparison of two methods on one protocol",
                         description="mIoU(b) - mIoU(a) on one protocol, runs paired by seed, with a 95%% "
                                     "hierarchical bootstrap interval (seeds, then evaluation images).")
    cmp.add_argument("--protocol", required=True)
    cmp.add_argument("--methods", required=True, type=_csv, help="a,b: the difference reported is b - a")
    cmp.add_argument("--results-dir", type=Path, default=Path("results"))
    cmp.add_argument("--bootstrap", type=_positive, default=2000)

    ev = sub.add_parser("eval", help="evaluate a finished run's kept checkpoint",
                        description="Evaluate the final checkpoint a run kept (bench run --keep-checkpoint) on a "
                                    "split; prints its metrics next to the recorded ones.")
    ev.add_argument("--run", required=True, type=Path, help="the run folder (holding result.json)")
    ev.add_argument("--split", default=None, help="default: the record's evaluation split")
    ev.add_argument("--cache-dir", type=Path, default=None,
                    help="where the checkpoint was kept (default: as bench run)")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--no-progress", action="store_true")

    pred = sub.add_parser("predict", help="predict masks for image files with a finished run's kept checkpoint",
                          description="Write, for each image, <stem>_mask.png (class indices, palette PNG), "
                                      "<stem>_colour.png and <stem>_overlay.png, and classes.json.")
    pred.add_argument("--run", required=True, type=Path, help="the run folder (holding result.json)")
    pred.add_argument("--images", required=True, nargs="+", type=Path, help="image files")
    pred.add_argument("--out", required=True, type=Path, help="output folder")
    pred.add_argument("--cache-dir", type=Path, default=None,
                      help="where the checkpoint was kept (default: as bench run)")
    pred.add_argument("--device", default="auto")

    data = sub.add_parser("data", help="dataset tools", description="Dataset tools.")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    check = data_sub.add_parser("check", help="check a local dataset folder",
                                description="Open every image and mask of the named splits, validate the masks "
                                            "and count them; the first missing or malformed file is named.")
    check.add_argument("--dataset", help="layout: folder, voc, cityscapes, cityscapes27, cocostuff27, camvid")
    check.add_argument("--protocol", help="or: the dataset of this protocol (name or .yaml; needed for hf sources)")
    check.add_argument("--data-root", type=Path, help="the dataset folder")
    check.add_argument("--splits", type=_csv, default=None,
                       help="comma-separated splits (default: the layout's usual ones that exist)")
    check.add_argument("--workers", type=int, default=None,
                       help="processes decoding and validating files (default: the cores available here)")
    check.add_argument("--no-progress", action="store_true")

    lst = sub.add_parser("list", help="list methods and protocols", description="List methods and protocols.")
    lst.add_argument("pattern", nargs="?", default="*", help="wildcard filter on names (default: *)")
    return parser


def cmd_list(args) -> int:
    from bench.protocol import list_protocols, load_protocol
    from bench.registry import get_method_class, list_methods

    print("methods:")
    for name in list_methods(args.pattern):
        cls = get_method_class(name)
        print(f"  {name:<14} supervision: {', '.join(sorted(cls.needs)) or 'none'}; output: {cls.output}")
    print("protocols:")
    import fnmatch

    for name in list_protocols():
        if not fnmatch.fnmatch(name, args.pattern):
            continue
        p = load_protocol(name)
        ratio = (f"ratio {p.labeled.ratio:g}" if p.labeled.ratio else
                 f"count {p.labeled.count}" if p.labeled.count else f"split file {p.labeled.split_file}")
        print(f"  {name:<22} dataset: {p.dataset.name}; labeled: {ratio}; iterations: {p.train.iterations}")
    return 0


def cmd_run(args) -> int:
    from bench.protocol import parse_override, preset_overrides
    from bench.planning import plan_sweep
    from bench.sweep import DEFAULT_CACHE, run_sweep

    # (key path, value) pairs, in the order they apply: the preset (with each protocol's refinement
    # of it), the flags, then key=value texts
    if args.preset:
        preset_overrides(args.preset)  # an unknown name fails before any protocol is read
    overrides = []
    if args.split_file:
        overrides += [(("labeled", "split_file"), str(Path(args.split_file).resolve())),
                      (("labeled", "ratio"), None), (("labeled", "count"), None), (("labeled", "split_sha256"), None)]
    overrides += [parse_override(text) for text in args.overrides]
    if args.data_root:
        overrides.append((("dataset", "root"), str(args.data_root)))
    if args.pretrained:
        overrides.append((("model", "pretrained"), True))
    if args.weights:
        overrides.append((("model", "weights"), str(args.weights)))
    plans = [plan for protocol in args.protocol
             for plan in plan_sweep(args.methods, protocol, args.seeds,
                                    (preset_overrides(args.preset, protocol) if args.preset else []) + overrides,
                                    args.results_dir)]
    cache_dir = args.cache_dir or DEFAULT_CACHE
    from bench import distributed

    distributed.setup(args.device)  # under torchrun: join the group (one run on several processes)
    if distributed.active() and args.launcher != "inline":
        raise BenchError("under torchrun use the inline launcher: the processes share each run")
    if args.launcher == "inline":
        outcomes = run_sweep(plans, args.results_dir, args.device, cache_dir, progress=not args.no_progress,
                             keep_checkpoint=args.keep_checkpoint, tensorboard=args.tensorboard)
        if not distributed.is_main():
            return 1 if any(o.status == "failed" for o in outcomes) else 0
    elif args.launcher == "local":
        from bench.launch import launch_local

        outcomes = launch_local(plans, args.results_dir, cache_dir, args.device, args.workers)
    else:
        from bench.launch import launch_slurm

        outcomes = launch_slurm(plans, args.results_dir, cache_dir, args.device, args.slurm_folder,
                                args.slurm_partition, args.slurm_time, args.slurm_gpus, args.slurm_cpus,
                                args.slurm_array_parallelism, args.slurm_cluster, wait=args.wait)
        if not args.wait:
            print("re-run the same command (it skips finished runs) or `bench leaderboard` when the jobs end")
            return 0
    print()
    print(summary_table(outcomes))
    done = [o for o in outcomes if o.record is not None]
    if done:
        # the updated leaderboard rows for what was run (every seed on record, not only this sweep's)
        from bench.leaderboard import aggregate, load_records, protocol_table

        def skip(path, message):  # a record of another run never decides this command's exit status
            print(f"bench: warning: {message}; left out of these rows", file=sys.stderr)

        agg = aggregate(load_records(args.results_dir, on_bad_record=skip))
        for protocol in dict.fromkeys(o.plan.protocol.name for o in done):
            part = agg[(agg["protocol"] == protocol) & agg["method"].isin(set(args.methods))]
            print(f"\nleaderboard rows, {protocol} (all seeds in {args.results_dir}):\n")
            print(protocol_table(part, protocol))
    return 1 if any(o.status == "failed" for o in outcomes) else 0


DEFAULT_SPLITS = {"voc": ["train", "val", "train_aug"], "cityscapes": ["train", "val"],
                  "cityscapes27": ["train", "val"], "camvid": ["train", "val", "test"],
                  "cocostuff27": ["curated_train2017", "curated_val2017", "train2017", "val2017"]}


def cmd_data(args) -> int:
    from bench.data.readers import open_source

    if bool(args.dataset) == bool(args.protocol):
        raise BenchError("bench data check: give --dataset LAYOUT --data-root PATH, or --protocol NAME")
    if args.protocol:
        from bench.protocol import load_protocol

        spec = load_protocol(args.protocol, {"dataset.root": str(args.data_root)} if args.data_root else {}).dataset
        args.dataset = spec.name
        source = open_source(spec.name, spec.root, spec.hf)
        default = [spec.train_split, spec.eval_split]
    else:
        source = open_source(args.dataset, args.data_root)
        default = None
    splits = args.splits or default
    if splits is None:
        if args.dataset == "folder":
            splits = sorted(p.stem for p in (source.root / "splits").glob("*.txt"))
        else:
            splits = []
            for split in DEFAULT_SPLITS[args.dataset]:
                try:
                    source.split_ids(split)
                    splits.append(split)
                except BenchError:
                    continue
        if not splits:
            raise BenchError(f"{args.dataset} dataset at {source.root}: no split found")
    from bench.device import available_cores

    workers = available_cores() if args.workers is None else args.workers
    if workers < 1:
        raise BenchError(f"--workers must be at least 1, got {workers}")
    t0 = time.perf_counter()
    counts = source.check(splits, progress=not args.no_progress, workers=workers)
    seconds = time.perf_counter() - t0
    print(f"{args.dataset} dataset at {source.root}: OK, {source.num_classes} classes, ignore {source.ignore_index}")
    for name, n in counts.items():
        print(f"  {name:<24} {n}")
    n = counts["distinct images checked"]
    print(f"  checked in {seconds:.1f} s: {n / max(seconds, 1e-9):.1f} images/s (image + mask) "
          f"with {workers} worker{'s' if workers > 1 else ''}")
    return 0


def cmd_leaderboard(args) -> int:
    from bench.leaderboard import render

    output = args.output or leaderboard_path(args.results_dir)

    def skip(path, message):
        print(f"bench: warning: {message}; left out of the leaderboard", file=sys.stderr)

    try:
        render(args.results_dir, output, args.bootstrap, on_bad_record=skip, real_photos=args.real_photos)
    except OSError as exc:
        raise BenchError(f"cannot write the leaderboard ({output}, figures in {args.results_dir / 'figures'}): "
                         f"{exc.filename or ''}{': ' if exc.filename else ''}{exc.strerror or exc}") from None
    print(f"wrote {output} and figures in {args.results_dir / 'figures'}")
    return 0


def leaderboard_path(results_dir: Path) -> Path:
    """The committed records' page is the project's top-level leaderboard.md; any other results dir
    gets its own page inside it, so a scratch sweep never overwrites the committed page."""
    if Path(results_dir).resolve() == Path("results").resolve():
        return Path("leaderboard.md")
    return Path(results_dir) / "leaderboard.md"


def cmd_eval(args) -> int:
    from bench.predict import eval_run
    from bench.sweep import DEFAULT_CACHE

    record, metrics = eval_run(args.run, args.cache_dir or DEFAULT_CACHE, args.split, args.device,
                               progress=not args.no_progress)
    recorded_split = record.config.protocol["dataset"]["eval_split"]
    split = args.split or recorded_split
    recorded = record.metrics
    print(f"{record.method} / {record.protocol} / seed {record.seed} on split {split}: "
          f"mIoU {metrics['miou']:.2f}  pixel acc {metrics['pixel_acc']:.2f}  mean class acc "
          f"{metrics['mean_class_acc']:.2f}  ({metrics['n_images']} images)")
    if split == recorded_split:
        print(f"recorded: mIoU {recorded.miou:.2f}  pixel acc {recorded.pixel_acc:.2f}")
    for name, iou in metrics["per_class_iou"].items():
        print(f"  {name:<20} {'—' if iou is None else f'{iou:.2f}'}")
    return 0


def cmd_predict(args) -> int:
    from bench.predict import predict_files
    from bench.sweep import DEFAULT_CACHE

    written = predict_files(args.run, args.images, args.out, args.cache_dir or DEFAULT_CACHE, args.device)
    print(f"wrote {len(written)} files to {args.out}")
    return 0


def cmd_compare(args) -> int:
    from bench.leaderboard import COMPARISON_HEADER, MIN_SEEDS, format_comparison, load_records, paired_bootstrap

    if len(args.methods) != 2:
        raise BenchError(f"--methods takes exactly two methods a,b; got {','.join(args.methods)}")
    c = paired_bootstrap(load_records(args.results_dir), args.protocol, *args.methods, n_boot=args.bootstrap)
    print(COMPARISON_HEADER)
    print(format_comparison(c))
    print(f"\n95% interval: hierarchical bootstrap ({args.bootstrap} resamples; seeds, then evaluation images within "
          f"each, the same draws for both methods); no verdict below {MIN_SEEDS} paired seeds.")
    return 0


def summary_table(outcomes) -> str:
    header = f"{'method':<12} {'protocol':<14} {'seed':>4} {'status':<8} {'mIoU':>7} {'pix acc':>8} {'train s':>8}"
    lines = [header, "-" * len(header)]
    for o in outcomes:
        if o.record:
            m = o.record.metrics
            collapse = o.record.collapse or {}
            lines.append(f"{o.plan.method:<12} {o.plan.protocol.name:<14} {o.plan.seed:>4} {o.status:<8} "
                         f"{m.miou:>7.2f} {m.pixel_acc:>8.2f} {o.record.train_time_s:>8.1f}"
                         + (f"  COLLAPSED: {'; '.join(collapse['reasons'])}" if collapse.get("collapsed") else ""))
        else:
            lines.append(f"{o.plan.method:<12} {o.plan.protocol.name:<14} {o.plan.seed:>4} {o.status:<8} "
                         f"{'-':>7} {'-':>8} {'-':>8}  {o.error or ''}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        commands = {"run": cmd_run, "list": cmd_list, "leaderboard": cmd_leaderboard, "compare": cmd_compare,
                    "eval": cmd_eval, "predict": cmd_predict, "data": cmd_data}
        return commands[args.command](args)
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file the command had to read or write: named, on one line
        print(f"bench: error: {exc.filename or ''}{': ' if exc.filename else ''}{exc.strerror or exc}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted; checkpoints are kept, re-run the same command to resume", file=sys.stderr)
        return 130
