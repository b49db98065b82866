"""The leaderboard: every result record, read with pandas, turned into ``leaderboard.md`` and figures.

``records`` (records -> rows -> config groups), ``statistics`` (bootstrap, verdicts),
``figures``, ``render`` (the page). Never edited by hand; regenerating from the same records gives
the same bytes (no timestamps, sorted rows, fixed number formats, PNGs without software metadata).
"""
from bench.leaderboard.figures import method_colours
from bench.leaderboard.records import aggregate, annotation_hours, load_records
from bench.leaderboard.render import COMPARISON_HEADER, format_comparison, protocol_table, render
from bench.leaderboard.statistics import MIN_SEEDS, hierarchical_bootstrap, paired_bootstrap, verdict

__all__ = ["COMPARISON_HEADER", "MIN_SEEDS", "aggregate", "annotation_hours", "format_comparison",
           "hierarchical_bootstrap", "load_records", "method_colours", "paired_bootstrap", "protocol_table", "render",
           "verdict"]
