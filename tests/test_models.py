import pytest
import timm
import torch

from bench import BenchError
from bench.models import Segmenter, load_backbone_weights


@pytest.mark.parametrize("output_stride", [8, 16])
def test_segmenter_shapes(output_stride):
    model = Segmenter(5, "resnet18", output_stride, head_channels=32).eval()
    x = torch.randn(2, 3, 64, 48)
    assert model(x).shape == (2, 5, 64, 48)
    assert model.features(x).shape == (2, 32, 16, 12)  # decoder features at stride 4


def test_local_weights_file_is_loaded(tmp_path):
    torch.manual_seed(1)
    classifier = timm.create_model("resnet18", pretrained=False, num_classes=10)
    path = tmp_path / "resnet18.pth"
    torch.save(classifier.state_dict(), path)  # a classifier checkpoint: the fc.* keys are dropped
    model = Segmenter(3, "resnet18", 16, 16, weights=str(path))
    assert torch.equal(model.backbone.conv1.weight, classifier.conv1.weight)
    assert torch.equal(model.backbone.layer4[1].conv2.weight, classifier.layer4[1].conv2.weight)


def test_weights_for_another_backbone_are_refused(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save(timm.create_model("resnet34", pretrained=False).state_dict(), path)
    backbone = Segmenter(3, "resnet18", 16, 16).backbone
    with pytest.raises(BenchError, match="does not fit the backbone"):
        load_backbone_weights(backbone, str(path))
    path = tmp_path / "wide.pth"
    torch.save(timm.create_model("wide_resnet50_2", pretrained=False).state_dict(), path)
    with pytest.raises(BenchError, match="does not fit the backbone"):  # same keys, other shapes
        load_backbone_weights(Segmenter(3, "resnet50", 16, 16).backbone, str(path))
    with pytest.raises(BenchError, match="does not exist"):
        load_backbone_weights(backbone, str(tmp_path / "missing.pth"))


def test_unknown_backbone_is_named():
    with pytest.raises(BenchError, match="unknown timm backbone 'resnet_nope'"):
        Segmenter(3, "resnet_nope")
