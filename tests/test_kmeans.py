"""bench.kmeans: recovers separated blobs, survives empty clusters, is deterministic, and the
mini-batch update is the running mean."""
import torch
import torch.nn.functional as F

from bench.kmeans import KMeans


def _blobs(seed=0, n=200, spread=0.05):
    g = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0], [-5.0, -5.0, 0.0]])
    truth = torch.arange(4).repeat_interleave(n)
    return centres[truth] + spread * torch.randn(len(truth), 3, generator=g), truth, centres


def _same_partition(a, b):
    """Labels equal up to a permutation of cluster ids."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_recovers_well_separated_blobs_euclidean_and_spherical():
    x, truth, centres = _blobs()
    for spherical in (False, True):
        km = KMeans(4, spherical=spherical, seed=0).fit(x, iters=10)
        labels, _ = km.assign(x)
        assert _same_partition(labels, truth)
        expected = F.normalize(centres, dim=1) if spherical else centres
        # every true centre has a centroid next to it
        assert torch.cdist(expected, km.centroids).min(1).values.max() < 0.1


def test_empty_clusters_are_reseeded_and_nothing_is_nan():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])  # 3 distinct points
    km = KMeans(5, spherical=False, seed=0).fit(x, iters=5)
    assert torch.isfinite(km.centroids).all() and km.centroids.shape == (5, 2)
    labels, dists = km.assign(x)
    assert labels.max() < 5 and torch.allclose(dists, torch.zeros(5))  # each point sits on a centroid
    km = KMeans(3, seed=1).partial_fit(x[:2])  # a first batch with one distinct point, spherical
    km.partial_fit(x)
    assert torch.isfinite(km.centroids).all()


def test_deterministic_for_a_seed():
    x, _, _ = _blobs(seed=3, spread=1.0)
    a = KMeans(6, seed=7).fit(x, 5).centroids
    b = KMeans(6, seed=7).fit(x, 5).centroids
    c = KMeans(6, seed=8).fit(x, 5).centroids
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_partial_fit_keeps_the_running_mean_of_assigned_points():
    x, truth, _ = _blobs(spread=0.3)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, truth = x[perm], truth[perm]
    km = KMeans(4, spherical=False, seed=0).fit(x[:100], iters=10)
    first_labels, _ = km.assign(x[:100])
    first_counts = km.counts.clone()
    for part in x[100:].split(150):
        km.partial_fit(part)
    labels, _ = km.assign(x)
    assert _same_partition(labels, truth)
    # blob means after all batches, from the seed centroid (mean of the first 100) and the rest
    for k in range(4):
        members = x[100:][km.assign(x[100:])[0] == k]
        first = x[:100][first_labels == k]
        expected = torch.cat([first, members]).mean(0)
        assert torch.allclose(km.centroids[k], expected, atol=1e-4)
    assert km.counts.sum() == first_counts.sum() + len(x) - 100


def test_faiss_backend_gives_the_same_clusters_on_separable_data():
    """faiss's Lloyd rounds from the same k-means++ seeds: the same partition and centroids as
    the torch rounds, Euclidean and spherical (skipped without faiss-cpu)."""
    import pytest

    pytest.importorskip("faiss")
    x, truth, _ = _blobs(seed=1, n=300, spread=0.3)
    for spherical in (False, True):
        ours = KMeans(4, spherical=spherical, seed=0).fit(x, iters=10)
        theirs = KMeans(4, spherical=spherical, seed=0, backend="faiss").fit(x, iters=10)
        assert torch.equal(ours.assign(x)[0], theirs.assign(x)[0]) and _same_partition(ours.assign(x)[0], truth)
        assert torch.allclose(ours.centroids, theirs.centroids, atol=1e-5)
        assert torch.equal(ours.counts, theirs.counts)
        # the mini-batch update carries on from either
        assert torch.allclose(ours.partial_fit(x[:50]).centroids, theirs.partial_fit(x[:50]).centroids, atol=1e-5)


def test_unknown_or_missing_backend_is_a_clear_error(monkeypatch):
    import pytest

    import bench.kmeans as kmeans

    with pytest.raises(ValueError, match="backend 'sklearn'"):
        KMeans(4, backend="sklearn")
    monkeypatch.setattr(kmeans, "faiss_available", lambda: False)
    with pytest.raises(ImportError, match=r"bench\[faiss\]"):
        KMeans(4, backend="faiss")
