"""Print each benchmark's median as a ratio to its group's reference (``extra_info["reference"]``),
both measured in the same run."""


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or session.disabled or not session.benchmarks:
        return
    groups = {}
    for bench in session.benchmarks:
        groups.setdefault(bench.group, []).append(bench)
    lines = []
    for group, benches in sorted(groups.items(), key=lambda kv: str(kv[0])):
        refs = [b for b in benches if b.extra_info.get("reference")]
        if not refs:
            continue
        ref = refs[0]
        for b in benches:
            ratio = b.stats.median / ref.stats.median
            lines.append(f"{group:<26} {b.name:<44} median {b.stats.median * 1e3:9.2f} ms   "
                         f"{ratio:6.3f}x {ref.name}   ({1 / ratio:.1f}x faster)" if ratio < 1 else
                         f"{group:<26} {b.name:<44} median {b.stats.median * 1e3:9.2f} ms   {ratio:6.3f}x {ref.name}")
    if lines:
        terminalreporter.write_sep("-", "ratios to each group's reference (same run)")
        for line in lines:
            terminalreporter.write_line(line)
