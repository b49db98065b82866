"""``picie``: unsupervised segmentation by clustering with photometric invariance and geometric
equivariance (Cho et al., CVPR 2021). No labels: the output is K clusters, matched to classes
by the harness at evaluation (Hungarian over the whole evaluation set).

Each epoch every training image gets fixed parameters: photometric A and B, geometric G (random
resized crop of side [0.5, 1] of the image side + horizontal flip). View 1 = G(A(x)) through the
network; view 2 = B(x) through the network, then G applied to its feature map, so both live on the
same grid. A clustering pass (k-means per view on the unit features, on the device) gives
centroids C1, C2 and pixel labels y1, y2, kept in memory; training then uses the frozen centroids
as classifier weights (logits = z . C, no bias):
loss = 1/4 [ CE(C1 z1, y1) + CE(C2 z2, y2) + CE(C2 z1, y2) + CE(C1 z2, y1) ], each CE weighted by
its clustering's cluster sizes. After training, k-means once more on the plain training images
gives the evaluation centroids.

Defaults follow the reference code (janghyuncho/PiCIE); the README's "differences from the
reference" table lists every switch. Fixed against the reference because it is broken there:
grayscale is really applied (the reference asks for 'grey' and tests for 'gray'), and the blur
sigma is drawn from [0.1, 2] (the reference's formula gives a negative radius).
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import field_validator

from bench.augment import apply_photometric, crop_theta, draw_photometric, warp
from bench.data.views import mix_seed, whole_set_loader
from bench.kmeans import KMeans, faiss_available
from bench.method import Method, MethodConfig, Stage
from bench.registry import register_method

PHOTOMETRIC = dict(jitter_p=0.8, brightness=0.3, contrast=0.3, saturation=0.3, hue=0.1, gray_p=0.2, blur_p=0.5,
                   blur_sigma=(0.1, 2.0))


class PiCIEConfig(MethodConfig):
    feature_dim: int = 128
    num_clusters: Optional[int] = None  # K; None = the number of classes (K > C: over-clustering)
    # G: random resized crop. The range is a fraction of the image SIDE by default (the reference's
    # min_scale: side ~ U(0.5, 1), mean area 0.58); crop_range_of="area" draws the area uniformly
    # (mean 0.75). The field keeps its first name so that records keep their config hash.
    crop_area: tuple[float, float] = (0.5, 1.0)
    crop_range_of: Literal["side", "area"] = "side"
    fpn_smoothing: bool = False  # a 3x3 conv on the FPN's stride-4 sum (the reference has none)
    # "euclidean": k-means on the unit features with Euclidean means, the raw centroids as
    # classifier weights (the reference, faiss IndexFlatL2); "spherical": cosine k-means, unit centroids
    kmeans_metric: Literal["euclidean", "spherical"] = "euclidean"
    # who runs the Lloyd rounds of each clustering (seeds and mini-batch updates are always torch's):
    # "torch" on the run's device; "faiss" faiss-cpu from the same seeds, faster on a CPU, but it
    # refills empty clusters its own way, so its clusters may differ (opt-in; pip install bench[faiss])
    kmeans_backend: Literal["torch", "faiss"] = "torch"
    # CE class weights per clustering: "frequency" = cluster size / total (the reference's
    # counts / counts.sum()); "inverse_frequency" = 1 / size, mean 1 over non-empty clusters
    cluster_weights: Literal["frequency", "inverse_frequency"] = "frequency"
    # colour jitter: brightness, contrast, saturation, hue each on with p 0.8 on its own
    # ("per_operation", the reference) or all four together with one p 0.8 ("joint")
    jitter_draw: Literal["per_operation", "joint"] = "per_operation"
    blur_kernel: int = 13  # covers 3 sigma of the largest blur
    cluster_batch_size: int = 32  # images per forward pass while clustering
    kmeans_init_batches: int = 8  # k-means (Lloyd, kmeans_iters rounds) on these first batches, then
    kmeans_iters: int = 20  # mini-batch updates with every later batch, as the reference does
    feature_cache_mb: int = 2048  # keep the clustering pass's features for the labeling pass if they fit
    random_init_baseline: bool = False  # no training: cluster the features of the initial network

    @field_validator("kmeans_backend")
    @classmethod
    def _faiss_installed(cls, value: str) -> str:
        if value == "faiss" and not faiss_available():
            raise ValueError("faiss is not installed (pip install 'bench[faiss]', or faiss-cpu)")
        return value


def geometric_params(n: int, crop: tuple[float, float], generator: torch.Generator,
                     range_of: str = "side") -> dict[str, torch.Tensor]:
    """Square crop whose side (``range_of="side"``) or area (``"area"``) is a uniform fraction in
    ``crop`` of the image's, uniformly placed, resized back; flip p 0.5."""
    u = torch.rand(n, 4, generator=generator)
    fraction = crop[0] + (crop[1] - crop[0]) * u[:, 0]
    zoom = 1.0 / (fraction if range_of == "side" else torch.sqrt(fraction))
    return {"scale": zoom, "top": u[:, 1] * (zoom - 1), "left": u[:, 2] * (zoom - 1), "flip": u[:, 3] < 0.5}


def apply_geometry(x: torch.Tensor, g: dict[str, torch.Tensor], mode: str = "bilinear") -> torch.Tensor:
    """G on an image batch or a feature map: the same crop in relative coordinates, any resolution."""
    theta = crop_theta(*(g[k].to(x.device) for k in ("scale", "top", "left", "flip")))
    return warp(x, theta, mode=mode)


def frequency_weights(counts: torch.Tensor) -> torch.Tensor:
    """w_k = n_k / sum n: the reference's weights (larger clusters weigh more)."""
    counts = counts.float()
    return counts / counts.sum().clamp(min=1)


def inverse_frequency_weights(counts: torch.Tensor) -> torch.Tensor:
    """w_k proportional to 1 / n_k over non-empty clusters (mean 1 over them), 0 for empty ones."""
    counts = counts.float()
    inv = torch.where(counts > 0, 1.0 / counts.clamp(min=1), torch.zeros_like(counts))
    nonempty = (counts > 0).sum().clamp(min=1)
    return inv * nonempty / inv.sum().clamp(min=1e-12)


@register_method
class PiCIE(Method):
    name = "picie"
    needs = frozenset()
    code_revision = 1  # 1: four-term average, crop range of the side, reference switches by default (issue 14)
    output = "clusters"
    Config = PiCIEConfig
    augment_in_loader = False  # picie draws and keeps its own per-image views for a whole epoch

    def __init__(self, cfg: PiCIEConfig, ctx):
        super().__init__(cfg, ctx)
        self.net = ctx.build_fpn(cfg.feature_dim, smoothing=cfg.fpn_smoothing)
        self.k = cfg.num_clusters or ctx.num_classes
        self.epoch = -1
        self.state: dict[str, torch.Tensor] = {}  # labels, centroids, weights of the epoch; eval centroids
        self._params_key, self._params = None, None

    def stages(self):
        cluster = Stage("cluster", iterations=0)  # k-means on the plain training images, for evaluation
        return [cluster] if self.cfg.random_init_baseline else [Stage("train"), cluster]

    @property
    def num_outputs(self) -> int:
        return self.k

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(images).float(), dim=1)

    # per-epoch views ----------------------------------------------------------------------------

    def epoch_params(self, epoch: int, n: int) -> dict[str, dict[str, torch.Tensor]]:
        """A, B and G of every training image for ``epoch``: a function of (run seed, epoch) only,
        drawn once per epoch (every training step of the epoch reads them; a resumed run redraws
        the same values, so they need no checkpoint)."""
        if self._params_key != (epoch, n):
            gen = torch.Generator().manual_seed(mix_seed(self.ctx.seed, "picie", epoch))
            per_op = self.cfg.jitter_draw == "per_operation"
            self._params = {"A": draw_photometric(n, gen, jitter_per_operation=per_op, **PHOTOMETRIC),
                            "B": draw_photometric(n, gen, jitter_per_operation=per_op, **PHOTOMETRIC),
                            "G": geometric_params(n, self.cfg.crop_area, gen, self.cfg.crop_range_of)}
            self._params_key = (epoch, n)
        return self._params

    def views(self, images: torch.Tensor, index: torch.Tensor, params) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised features of both views on the same (G-transformed) grid."""
        pick = lambda p: {k: v[index.cpu()] for k, v in p.items()}  # noqa: E731
        a, b, g = pick(params["A"]), pick(params["B"]), pick(params["G"])
        z1 = self.embed(apply_geometry(apply_photometric(images, a, self.cfg.blur_kernel), g))
        # as the reference: G on the raw feature map, then normalised
        z2 = F.normalize(apply_geometry(self.net(apply_photometric(images, b, self.cfg.blur_kernel)).float(), g), dim=1)
        return z1, z2

    # clustering ---------------------------------------------------------------------------------

    @torch.no_grad()
    def cluster(self, features_of, seed_tag) -> list[dict[str, torch.Tensor]]:
        """k-means for each of the views that ``features_of(images, index)`` returns, over the whole
        training set; then every pixel's cluster. Returns per view: centroids, labels [N, h, w], weights."""
        dataset = self.ctx.datasets["images"]
        n = len(dataset)
        loader = whole_set_loader(dataset, self.cfg.cluster_batch_size)
        device = self.ctx.device
        was_training = self.training
        self.eval()
        kms, pending, cache, cache_bytes, shape = None, None, [], 0, None
        for b, batch in enumerate(loader):
            images, index = batch["image"].to(device), batch["index"]
            feats = features_of(images, index)
            if kms is None:
                spherical = self.cfg.kmeans_metric == "spherical"
                kms = [KMeans(self.k, spherical=spherical, seed=mix_seed(self.ctx.seed, "picie-kmeans", seed_tag, v),
                              backend=self.cfg.kmeans_backend)
                       for v in range(len(feats))]
                pending = [[] for _ in feats]
                shape = feats[0].shape[-2:]
            flat = [f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]) for f in feats]
            if b < self.cfg.kmeans_init_batches:
                for p, x in zip(pending, flat):
                    p.append(x)
                if b + 1 == min(self.cfg.kmeans_init_batches, len(loader)):
                    for km, p in zip(kms, pending):
                        km.fit(torch.cat(p), self.cfg.kmeans_iters)
                    pending = None
            else:
                for km, x in zip(kms, flat):
                    km.partial_fit(x)
            if cache is not None:
                cache_bytes += sum(x.numel() * x.element_size() for x in flat)
                if cache_bytes <= self.cfg.feature_cache_mb * 2**20:
                    cache.append((index, flat))
                else:  # too big to keep: the labeling pass recomputes the features
                    cache = None
        dtype = torch.uint8 if self.k <= 256 else torch.int16
        labels = [torch.zeros(n, *shape, dtype=dtype) for _ in kms]
        counts = [torch.zeros(self.k, dtype=torch.long, device=device) for _ in kms]
        batches = cache if cache is not None else (
            (batch["index"], [f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
                              for f in features_of(batch["image"].to(device), batch["index"])]) for batch in loader)
        for index, flat in batches:
            for v, (km, x) in enumerate(zip(kms, flat)):
                y, _ = km.assign(x)
                counts[v] += torch.bincount(y, minlength=self.k)
                labels[v][index] = y.view(len(index), *shape).to("cpu", dtype)
        self.train(was_training)
        weights = frequency_weights if self.cfg.cluster_weights == "frequency" else inverse_frequency_weights
        return [{"centroids": km.centroids, "labels": lab, "weights": weights(c)}
                for km, lab, c in zip(kms, labels, counts)]

    def on_epoch_start(self, epoch: int) -> None:
        params = self.epoch_params(epoch, len(self.ctx.datasets["images"]))
        view1, view2 = self.cluster(lambda x, i: self.views(x, i, params), f"epoch{epoch}")
        self.epoch = epoch
        for name, view in (("1", view1), ("2", view2)):
            for key, value in view.items():
                self.state[f"{key}{name}"] = value

    def on_stage_end(self, stage: str) -> None:
        if stage == "cluster":
            [plain] = self.cluster(lambda x, i: (self.embed(x),), "eval")
            self.state["eval_centroids"] = plain["centroids"]

    # training -----------------------------------------------------------------------------------

    def training_step(self, batch, step, stage="train"):
        images, index = batch["images"]["image"], batch["images"]["index"]
        params = self.epoch_params(self.epoch, len(self.ctx.datasets["images"]))
        z1, z2 = self.views(images, index, params)
        s = self.state
        y1, y2 = s["labels1"][index.cpu()].to(images.device).long(), s["labels2"][index.cpu()].to(images.device).long()
        c1, c2, w1, w2 = (s[k].to(images.device) for k in ("centroids1", "centroids2", "weights1", "weights2"))

        def ce(z, centroids, target, weight):
            return F.cross_entropy(torch.einsum("bdhw,kd->bkhw", z, centroids), target, weight=weight)

        within = ce(z1, c1, y1, w1) + ce(z2, c2, y2, w2)
        cross = ce(z1, c2, y2, w2) + ce(z2, c1, y1, w1)
        loss = (within + cross) / 4  # the reference: mean of the within mean and the cross mean
        return {"loss": loss, "within": within.detach(), "cross": cross.detach()}

    @torch.no_grad()
    def predict(self, images):
        if "eval_centroids" not in self.state:
            raise RuntimeError("picie: no evaluation centroids yet (the 'cluster' stage has not run)")
        z = self.embed(images)
        logits = torch.einsum("bdhw,kd->bkhw", z, self.state["eval_centroids"].to(z.device))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)

    # checkpointing: the epoch's labels and centroids are part of the run's state ----------------

    def get_extra_state(self):
        return {"epoch": self.epoch, **{k: v.cpu() for k, v in self.state.items()}}

    def set_extra_state(self, state):
        state = dict(state)
        self.epoch = int(state.pop("epoch"))
        self.state = {k: v.to(self.ctx.device) if v.is_floating_point() else v for k, v in state.items()}
