"""Methods from other installed packages: the ``bench.methods`` entry-point group.

Each test installs a tiny package the way pip leaves one (a module plus a ``.dist-info`` folder
with ``entry_points.txt``) into a folder put on ``sys.path``, so ``importlib.metadata`` finds it.
"""
import sys
import textwrap

import pytest

from bench import BenchError, registry
from bench.cli import main

PLUGIN = '''
import torch
from bench.method import Method, MethodConfig
from bench.registry import register_method


@register_method
class {cls}(Method):
    name = "{name}"
    needs = frozenset({{"pixel_labels"}})

    class Config(MethodConfig):
        weight: float = 1.0

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.model = ctx.build_segmenter()

    def training_step(self, batch, step, stage="train"):
        return {{"loss": self.model(batch["labeled"]["image"]).mean() * self.cfg.weight}}

    @torch.no_grad()
    def predict(self, images):
        return self.model(images)
'''


def _install(site, module: str, source: str, entry: str, name: str = "mine") -> None:
    (site / f"{module}.py").write_text(source)
    info = site / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[bench.methods]\n{name} = {entry}\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A copy of the registry holding methods/, whose next lookup reads the entry points again, and a site folder."""
    folder = tmp_path / "site"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    registry.list_methods()  # methods/ registered in the registry this test starts from
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    monkeypatch.setattr(registry, "_DISCOVERED", False)
    yield folder
    for module in [m for m in sys.modules if m.startswith("bench_test_plugin")]:
        del sys.modules[module]


def test_an_installed_package_adds_a_method(site, capsys):
    _install(site, "bench_test_plugin_a", PLUGIN.format(cls="Mine", name="mine"), "bench_test_plugin_a")
    assert "mine" in registry.list_methods()
    assert registry.get_method_class("mine").__module__ == "bench_test_plugin_a"
    assert main(["list"]) == 0
    assert "mine" in capsys.readouterr().out


def test_an_entry_point_may_name_the_class(site):
    source = PLUGIN.format(cls="Mine", name="mine_class").replace("@register_method\n", "")
    _install(site, "bench_test_plugin_b", source, "bench_test_plugin_b:Mine", name="mine_class")
    assert registry.get_method_class("mine_class").__name__ == "Mine"


def test_a_plugin_taking_a_name_already_taken_is_one_clear_line(site):
    _install(site, "bench_test_plugin_c", PLUGIN.format(cls="NotCE", name="ce"), "bench_test_plugin_c", name="ce")
    with pytest.raises(BenchError) as err:
        registry.list_methods()
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("entry point 'ce' (bench_test_plugin_c) of group bench.methods in package "
                              "bench_test_plugin_c: method name 'ce' registered twice")


def test_a_plugin_that_fails_to_load_is_one_clear_line(site, capsys):
    _install(site, "bench_test_plugin_d", "import no_such_module_here\n", "bench_test_plugin_d")
    expected = ("entry point 'mine' (bench_test_plugin_d) of group bench.methods in package bench_test_plugin_d "
                "cannot be loaded: ModuleNotFoundError: No module named 'no_such_module_here'")
    with pytest.raises(BenchError, match=f"^{expected}$".replace("(", r"\(").replace(")", r"\)")):
        registry.get_method_class("ce")
    assert main(["list"]) == 2  # every command that looks a method up says so, not only the first
    assert textwrap.dedent(capsys.readouterr().err).strip() == f"bench: error: {expected}"
