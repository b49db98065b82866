"""Print each benchmark's median as a ratio to its group's reference (``extra_info["reference"]``),
both measured in the same run; the synth context and batch the step benchmarks share."""
import pytest
import torch

from bench.data import synth
from bench.data.views import normalize
from bench.method import RunContext
from bench.protocol import ModelSpec


def synth_ctx() -> RunContext:
    """The synth protocols' model (ResNet-18, OS 16, 128-channel head) on the CPU, 8 classes."""
    return RunContext(8, [str(i) for i in range(8)], 255, torch.device("cpu"),
                      ModelSpec(backbone="resnet18", output_stride=16, head_channels=128), 800, 0, 0.01, (0.5, 2.0))


@pytest.fixture(scope="module")
def semi_batch():
    """8 labeled + 8 unlabeled synth scenes at 96 px (the synth protocols' crop and batch), and
    the unlabeled images' true masks (for floors that train on them)."""
    pairs = [synth.make_image(0, i, 96) for i in range(16)]
    images = torch.stack([normalize(torch.from_numpy(img).permute(2, 0, 1)) for img, _ in pairs])
    masks = torch.stack([torch.from_numpy(mask).long() for _, mask in pairs])
    return {"labeled": {"image": images[:8], "mask": masks[:8]}, "unlabeled": {"image": images[8:], "valid": torch.ones(8, 96, 96, dtype=torch.bool)}}, masks[8:]


def method_step(method, data, step: int = 10):
    """One full training step of ``method`` on ``data`` (its step, backward, SGD, ``on_step_end``),
    as the engine runs it, for benchmarking."""
    opt = torch.optim.SGD([p for g in method.param_groups() for p in g["params"]], lr=0.01, momentum=0.9)
    method.train()

    def run():
        out = method.training_step(data, step)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        method.on_step_end(step)
        return float(out["loss"].detach())

    return run


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
