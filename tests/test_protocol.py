import copy

import pytest
import yaml

from bench import BenchError
from bench.protocol import PROTOCOLS_DIR, list_protocols, load_protocol, parse_override, preset_overrides
from tests.conftest import TINY, write_protocol


def test_every_shipped_protocol_validates():
    names = list_protocols()
    assert {"synth_1_16", "synth_1_8", "synth_1_4", "synth_full"} <= set(names)
    for name in names:
        assert load_protocol(name).name == name


def test_synth_protocols_share_everything_but_the_labeled_ratio():
    dumps = {n: load_protocol(n).model_dump() for n in ("synth_1_16", "synth_1_8", "synth_1_4", "synth_full")}
    ratios = {n: d.pop("labeled")["ratio"] for n, d in dumps.items()}
    assert ratios == {"synth_1_16": 0.0625, "synth_1_8": 0.125, "synth_1_4": 0.25, "synth_full": 1.0}
    for d in dumps.values():
        d.pop("name")
    first = next(iter(dumps.values()))
    assert all(d == first for d in dumps.values())


def test_unknown_protocol_names_valid_ones():
    with pytest.raises(BenchError, match=r"unknown protocol 'nope'; valid protocols: .*synth_1_8"):
        load_protocol("nope")


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["train"].update(iterations="many"), "train.iterations"),
    (lambda d: d["train"].update(itertions=5), "train.itertions"),
    (lambda d: d["labeled"].update(count=3), "labeled"),
    (lambda d: d["dataset"].update(name="imagenet"), "dataset.name"),
    (lambda d: d["eval"].update(mode="slide"), "eval"),
    (lambda d: d["model"].update(output_stride=4), "model.output_stride"),
])
def test_malformed_protocol_names_the_field(tmp_path, mutate, field):
    data = copy.deepcopy(TINY)
    mutate(data)
    path = write_protocol(tmp_path, data)
    with pytest.raises(BenchError) as info:
        load_protocol(str(path))
    assert f"field {field}" in str(info.value)
    assert str(path) in str(info.value)


def test_invalid_yaml_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(BenchError, match="not valid YAML"):
        load_protocol(str(path))


def test_yaml_is_parsed_without_executing_anything(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(BenchError, match="not valid YAML"):
        load_protocol(str(path))


def test_extends_merges_and_overrides_apply(tmp_path):
    write_protocol(tmp_path, TINY, "_base")
    child = tmp_path / "child.yaml"
    child.write_text("extends: _base\nname: child\nlabeled: {count: 3}\n")
    with pytest.raises(BenchError, match="exactly one of"):  # ratio from the base + count
        load_protocol(str(child))
    child.write_text("extends: _base\nname: child\nlabeled: {count: 3, ratio: null}\n")
    p = load_protocol(str(child), {"train.iterations": 2})
    assert (p.name, p.labeled.count, p.train.iterations, p.train.crop) == ("child", 3, 2, 32)


def test_parse_override_types():
    assert parse_override("train.iterations=100") == (("train", "iterations"), 100)
    assert parse_override("train.scale=[0.5, 1.5]") == (("train", "scale"), [0.5, 1.5])
    assert parse_override("model.pretrained=true") == (("model", "pretrained"), True)
    with pytest.raises(BenchError, match="key=value"):
        parse_override("train.iterations")


def test_sync_bn_unset_is_on_for_real_data_and_off_for_synth():
    """SyncBatchNorm (several GPUs) by default where the field trains with it; synth keeps false, the
    old default, which the config hash leaves out; --preset cpu turns it off (CPU has none)."""
    assert load_protocol("synth_1_8").train.sync_bn is False
    assert load_protocol("voc_1_16").train.sync_bn is True
    assert load_protocol("cityscapes_1_8", {"train.sync_bn": False}).train.sync_bn is False
    assert (("train", "sync_bn"), False) in preset_overrides("cpu")


def test_a_protocol_fixes_method_settings_under_the_command_line(tmp_path):
    from bench.results import config_hash, identity
    from bench.planning import plan_sweep

    [prcl, ce] = plan_sweep(["prcl", "ce"], "synth_1_8", [0], [], tmp_path)
    assert (prcl.method_cfg.num_queries, prcl.method_cfg.num_negatives) == (32, 64)  # synth's budget
    assert prcl.overrides == {}  # the protocol's, not an override
    [mine] = plan_sweep(["prcl"], "synth_1_8", [0], ["prcl.num_queries=8"], tmp_path)
    assert (mine.method_cfg.num_queries, mine.method_cfg.num_negatives) == (8, 64)  # the command line wins
    # the settings count once, through the method's config: a protocol that adds them keeps the hashes
    # of runs made with the same values as overrides, and of every other method
    bare = copy.deepcopy(prcl.resolved)
    bare["protocol"].pop("methods")
    assert config_hash(identity(bare)) == prcl.config_hash == config_hash(identity(prcl.resolved))


def test_protocol_method_settings_are_checked(tmp_path):
    from bench.planning import plan_sweep

    path = write_protocol(tmp_path, {**TINY, "name": "bad", "methods": {"nosuch": {"x": 1}}})
    with pytest.raises(BenchError, match="protocol bad: methods.nosuch: no such method; valid: .*prcl"):
        plan_sweep(["ce"], str(path), [0], [], tmp_path / "r")
    path = write_protocol(tmp_path, {**TINY, "name": "bad2", "methods": {"prcl": {"num_queries": "many"}}})
    with pytest.raises(BenchError, match=r"method prcl: config field num_queries: .* \(protocol bad2 sets methods.prcl\)"):
        plan_sweep(["prcl"], str(path), [0], [], tmp_path / "r")


def test_head_lr_mult_scales_named_non_backbone_groups():
    import torch

    from bench.trainer import build_optimizer
    from bench.protocol import TrainSpec

    p = [torch.nn.Parameter(torch.zeros(1)) for _ in range(5)]
    spec = TrainSpec(crop=8, iterations=1, head_lr_mult=10.0, optimizer={"lr": 0.001})
    opt = build_optimizer([{"params": [p[0]], "name": "backbone"}, {"params": [p[1]], "name": "head"},
                           {"params": [p[2]], "name": "classifier_backbone"},
                           {"params": [p[3]], "name": "variance_head", "lr_mult": 2.0}, {"params": [p[4]]}], spec)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.001, 0.01, 0.001, 0.02, 0.001])
    assert TrainSpec(crop=8, iterations=1).head_lr_mult == 1.0  # every other protocol: one LR


def test_overrides_travel_as_key_paths_and_values(tmp_path):
    """The command line's texts are parsed once; presets and flags hand over values as they are
    (a data root named "1e3" stays that string), and both routes plan the same runs."""
    from bench.protocol import load_presets, preset_overrides
    from bench.planning import plan_sweep

    cpu = preset_overrides("cpu")
    assert dict(cpu) == {tuple(k.split(".")): v for k, v in load_presets()["cpu"]["overrides"].items()}
    texts = ["train.iterations=7", "prcl.num_queries=4", "method.eval_network=student"]
    pairs = [parse_override(t) for t in texts]
    assert pairs[1] == (("prcl", "num_queries"), 4)
    a, b = plan_sweep(["prcl"], "synth_1_8", [0], texts, tmp_path), plan_sweep(["prcl"], "synth_1_8", [0], pairs, tmp_path)
    assert a[0].config_hash == b[0].config_hash
    assert a[0].overrides == {"train.iterations": 7, "prcl.num_queries": 4, "prcl.eval_network": "student"}
    [plan] = plan_sweep(["ce"], "synth_1_8", [0], [(("dataset", "root"), "1e3")], tmp_path)
    assert plan.protocol.dataset.root == "1e3" and plan.overrides == {"dataset.root": "1e3"}


def test_the_old_spelling_labelled_still_reads_and_plans_the_same_run(tmp_path):
    """Protocol files and overrides written with ``labelled`` (before the one spelling) load as
    ``labeled``, and the run they plan has the same config hash as under the new spelling."""
    from bench.planning import plan_sweep

    old = {k: v for k, v in TINY.items() if k != "labeled"} | {"labelled": TINY["labeled"]}
    new_path = write_protocol(tmp_path, TINY, "new")
    old_path = write_protocol(tmp_path, {**old, "name": "old"}, "old")
    assert load_protocol(str(old_path)).labeled == load_protocol(str(new_path)).labeled
    assert load_protocol(str(new_path), {"labelled.ratio": 0.5}).labeled.ratio == 0.5
    [by_old] = plan_sweep(["ce"], str(old_path), [0], ["labelled.count=3", "labelled.ratio=null"], tmp_path)
    [by_new] = plan_sweep(["ce"], str(new_path), [0], ["labeled.count=3", "labeled.ratio=null"], tmp_path)
    by_old.resolved["protocol"]["name"] = by_new.resolved["protocol"]["name"]
    assert by_old.overrides == by_new.overrides == {"labeled.count": 3, "labeled.ratio": None}
    assert by_old.resolved == by_new.resolved
    both = write_protocol(tmp_path, {**TINY, "labelled": TINY["labeled"], "name": "both"})
    with pytest.raises(BenchError, match=r"both.yaml: fields labelled and labeled are one field"):
        load_protocol(str(both))


def test_a_protocol_refines_a_preset_for_its_dataset(tmp_path):
    """``presets: {cpu: {...}}`` in a protocol (or a base it extends) adds to the preset's overrides
    for that protocol only, after them; the block is no setting of its own, and a malformed one is
    named."""
    (tmp_path / "_presets.yaml").write_text(yaml.safe_dump(
        {"cpu": {"description": "small", "overrides": {"train.iterations": 800, "model.backbone": "resnet18"}}}, sort_keys=False))
    synth = yaml.safe_load((PROTOCOLS_DIR / "_synth.yaml").read_text())
    base = {**synth, "presets": {"cpu": {"train.iterations": 2400, "dataset.resize": 240}}}
    (tmp_path / "_base.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
    (tmp_path / "child.yaml").write_text(yaml.safe_dump({"extends": "_base", "name": "child",
                                                         "labeled": {"ratio": 0.5, "seed": 0}}))
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump({**synth, "name": "plain", "labeled": {"ratio": 0.5, "seed": 0}}))
    assert preset_overrides("cpu", directory=tmp_path) == [(("train", "iterations"), 800), (("model", "backbone"), "resnet18")]
    assert preset_overrides("cpu", "plain", directory=tmp_path) == preset_overrides("cpu", directory=tmp_path)
    pairs = preset_overrides("cpu", "child", directory=tmp_path)
    assert pairs[2:] == [(("train", "iterations"), 2400), (("dataset", "resize"), 240)]
    assert dict(pairs)[("train", "iterations")] == 2400  # the protocol's refinement applies after the preset
    assert load_protocol("child", directory=tmp_path).train.iterations == synth["train"]["iterations"]
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**base, "name": "bad", "labeled": {"ratio": 0.5, "seed": 0},
                                                       "presets": {"cpu": ["train.iterations", 5]}}))
    with pytest.raises(BenchError, match=r"bad.yaml: field presets: must map a preset name"):
        load_protocol("bad", directory=tmp_path)
    with pytest.raises(BenchError, match=r"field presets: must map"):
        preset_overrides("cpu", "bad", directory=tmp_path)
