"""k-means on the device, for methods that cluster features (picie; others may).

``KMeans.fit`` is Lloyd's algorithm on a tensor of points (assignment in chunks, centroid update
as a one-hot matrix product); ``KMeans.partial_fit`` is the mini-batch update used when the points
stream past in batches: each centroid moves to the running mean of every point ever assigned to
it (per-cluster rate n_batch / n_total, as PiCIE's reference does in a per-cluster Python loop).
``spherical=True`` works with cosine similarity on the unit sphere (centroids renormalised).
No Python loop over clusters or points anywhere.

``backend="faiss"`` runs ``fit``'s Lloyd rounds with faiss-cpu (``pip install bench[faiss]``) from
the same k-means++ seeds: on CPU it is faster than the torch rounds at the same threads. Empty
clusters are refilled differently (faiss splits a large cluster, torch takes the farthest
points), and the float sums differ, so the two can part on data where that matters: an opt-in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


BACKENDS = ("torch", "faiss")


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


class KMeans:
    def __init__(self, k: int, spherical: bool = True, seed: int = 0, chunk: int = 1 << 17, backend: str = "torch"):
        if backend not in BACKENDS:
            raise ValueError(f"k-means backend {backend!r}: expected one of {BACKENDS}")
        if backend == "faiss" and not faiss_available():
            raise ImportError("k-means backend 'faiss' needs faiss-cpu: pip install 'bench[faiss]'")
        self.k, self.spherical, self.seed, self.chunk, self.backend = k, spherical, seed, chunk, backend
        self.centroids: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None  # points assigned so far, for partial_fit

    def _generator(self, device) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed)

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return F.normalize(x, dim=1) if self.spherical else x

    def assign(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest centroid of every point and its squared distance (1 - cosine for spherical)."""
        return self._assign(self._prep(x))

    def _assign(self, x: torch.Tensor, x_sq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``x_sq``: the points' squared norms [N, 1] (Euclidean), computed once by ``fit`` for
        all its rounds instead of once a round."""
        labels, dists = [], []
        c_sq = (self.centroids ** 2).sum(1)
        if not self.spherical and x_sq is None:
            x_sq = (x ** 2).sum(1, keepdim=True)
        for i, part in enumerate(x.split(self.chunk)):
            sim = part @ self.centroids.T
            if self.spherical:
                best, idx = sim.max(1)
                dist = 1 - best
            else:
                part_sq = x_sq[i * self.chunk:(i + 1) * self.chunk]
                dist, idx = (part_sq - 2 * sim + c_sq[None]).min(1)
            labels.append(idx)
            dists.append(dist.clamp_(min=0))
        if len(labels) == 1:
            return labels[0], dists[0]
        return torch.cat(labels), torch.cat(dists)

    def _init(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """k-means++ seeding: each next centre drawn with probability proportional to D^2."""
        n = len(x)
        first = torch.randint(n, (1,), generator=gen, device=x.device)
        centres = [x[first]]
        d2 = torch.full((n,), float("inf"), device=x.device)
        for _ in range(1, self.k):
            c = centres[-1]
            new = (1 - x @ c.T).squeeze(1) if self.spherical else ((x - c) ** 2).sum(1)
            d2 = torch.minimum(d2, new.clamp(min=0))
            total = d2.sum()
            if total <= 0:  # fewer distinct points than k: repeat points
                idx = torch.randint(n, (1,), generator=gen, device=x.device)
            else:
                idx = torch.multinomial(d2 / total, 1, generator=gen)
            centres.append(x[idx])
        return torch.cat(centres)

    def _update(self, x, labels):
        """Per-cluster sums and counts. A one-hot [K, chunk] matrix product: dense BLAS, several
        times faster than scatter_add (index_add_) on CPU, and the same on GPU."""
        sums = torch.zeros(self.k, x.shape[1], device=x.device, dtype=x.dtype)
        for part, lab in zip(x.split(self.chunk), labels.split(self.chunk)):
            onehot = (lab[None] == torch.arange(self.k, device=x.device)[:, None]).to(x.dtype)
            sums += onehot @ part
        return sums, torch.bincount(labels, minlength=self.k)

    def _reseed_empty(self, x, centroids, counts, dists):
        """Empty clusters take the points farthest from their centroids (deterministic)."""
        empty = (counts == 0).nonzero().squeeze(1)
        if empty.numel():
            far = torch.topk(dists, min(empty.numel(), len(x))).indices
            centroids[empty[:len(far)]] = x[far]
        return centroids

    def _normalise(self, c):
        return F.normalize(c, dim=1) if self.spherical else c

    def fit(self, x: torch.Tensor, iters: int = 20) -> "KMeans":
        """Lloyd's algorithm from k-means++ seeds; ``iters`` assignment + update rounds."""
        x = self._prep(x)
        gen = self._generator(x.device)
        self.centroids = self._normalise(self._init(x, gen))
        if self.backend == "faiss":
            return self._fit_faiss(x, iters)
        x_sq = None if self.spherical else (x ** 2).sum(1, keepdim=True)
        for _ in range(iters):
            labels, dists = self._assign(x, x_sq)
            sums, counts = self._update(x, labels)
            new = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], self.centroids)
            self.centroids = self._normalise(self._reseed_empty(x, new, counts, dists))
        self.counts = torch.bincount(self._assign(x, x_sq)[0], minlength=self.k)
        return self

    def _fit_faiss(self, x: torch.Tensor, iters: int) -> "KMeans":
        """faiss's Lloyd rounds from the k-means++ seeds in ``self.centroids``, on every point (no
        subsampling), on the CPU; the centroids come back to ``x``'s device."""
        import faiss

        faiss.omp_set_num_threads(torch.get_num_threads())  # the threads torch would use
        # faiss takes a 32-bit seed; from given seeds it draws only to refill empty clusters
        km = faiss.Kmeans(x.shape[1], self.k, niter=iters, seed=self.seed % 2**31, spherical=self.spherical,
                          max_points_per_centroid=len(x), min_points_per_centroid=1)
        km.train(x.detach().cpu().numpy(), init_centroids=self.centroids.cpu().numpy())
        self.centroids = torch.from_numpy(km.centroids).to(x.device)
        self.counts = torch.bincount(self._assign(x)[0], minlength=self.k)
        return self

    def partial_fit(self, x: torch.Tensor) -> "KMeans":
        """One mini-batch step; the first call seeds the centroids with ``fit`` on this batch."""
        x = self._prep(x)
        if self.centroids is None:
            return self.fit(x)
        labels, _ = self._assign(x)
        sums, counts = self._update(x, labels)
        self.counts = self.counts + counts
        rate = (counts / self.counts.clamp(min=1))[:, None]  # n_batch / n_total per cluster
        mean = sums / counts.clamp(min=1)[:, None]
        self.centroids = self._normalise(torch.where(counts[:, None] > 0,
                                                     (1 - rate) * self.centroids + rate * mean, self.centroids))
        return self
