"""``ce``: the supervised baseline. Cross-entropy (ignore label) on the labeled split only."""
import torch

from bench.losses import masked_cross_entropy
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

    def training_step(self, batch, step, stage="train"):
        labeled = batch["labeled"]
        logits = self.model(labeled["image"])
        return {"loss": masked_cross_entropy(logits, labeled["mask"], self.ctx.ignore_index)}

    @torch.no_grad()
    def predict(self, images):
        return self.model(images)
