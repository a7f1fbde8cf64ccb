"""k-means (ssl_ops/kmeans.py): recovers separated clusters, deterministic per seed, chunking-invariant."""
import pytest
import torch

from ssl_ops.kmeans import kmeans


def _blobs(seed: int = 0, n_per: int = 200, k: int = 5, d: int = 8):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, d, generator=g) * 20  # far apart relative to unit noise
    y = torch.arange(k).repeat_interleave(n_per)
    return centers[y] + torch.randn(k * n_per, d, generator=g), y


@pytest.mark.parametrize("init", ["k-means++", "random"])
def test_lloyd_never_increases_inertia(init):
    # Lloyd's property: each iteration cannot raise the objective, whatever the init
    x, _ = _blobs()
    before = kmeans(x, 5, iters=0, seed=1, init=init).inertia
    after = kmeans(x, 5, iters=20, seed=1, init=init).inertia
    assert after <= before + 1e-3


def test_kmeanspp_purity_and_inertia():
    x, y = _blobs()
    res = kmeans(x, 5, iters=30, seed=3)
    pairs = set(zip(y.tolist(), res.labels.tolist()))
    assert len(pairs) == 5
    # inertia ~ N * d * noise variance (1.0) for the true partition
    assert res.inertia < 1.3 * x.shape[0] * x.shape[1]


def test_deterministic_for_seed_and_chunk_invariant():
    x, _ = _blobs(seed=2, k=7)
    a = kmeans(x, 7, iters=10, seed=5)
    b = kmeans(x, 7, iters=10, seed=5, chunk=37)
    assert torch.equal(a.labels, b.labels)
    assert torch.allclose(a.centers, b.centers, atol=1e-4)


def test_bad_input_names_problem():
    with pytest.raises(ValueError, match="N >= k"):
        kmeans(torch.zeros(3, 2), 5)
