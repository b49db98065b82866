"""``ce``: the supervised baseline. Cross-entropy (ignore label) on the labelled split only."""
import torch
import torch.nn.functional as F

from bench.method import Method
from bench.registry import register_method


@register_method
class CE(Method):
    name = "ce"
    needs = frozenset({"pixel_labels"})
    output = "classes"

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.model = ctx.build_segmenter()

    def param_groups(self):
        return self.model.param_groups()

    def training_step(self, batch, step):
        labeled = batch["labeled"]
        logits = self.model(labeled["image"])
        mask = labeled["mask"]
        # sum / #valid rather than reduction="mean": a crop with only ignore pixels gives 0, not NaN
        n_valid = (mask != self.ctx.ignore_index).sum().clamp(min=1)
        loss = F.cross_entropy(logits, mask, ignore_index=self.ctx.ignore_index, reduction="sum") / n_valid
        return {"loss": loss}

    @torch.no_grad()
    def predict(self, images):
        return self.model(images)
