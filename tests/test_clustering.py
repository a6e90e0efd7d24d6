"""chai.clustering on hand-made features: the properties CHAI's membership relies on."""

import pytest
import torch

from chai.clustering import (
    Membership,
    agglomerative,
    canonical,
    cluster_heads,
    kmeans,
    labels_from_groups,
    random_labels,
    representatives,
)
from chai.errors import ChaiError


def features(batch=4, heads=8, dim=15, seed=0):
    return torch.rand(batch, heads, dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("algo", ["kmeans", "agglomerative"])
def test_identical_heads_always_share_a_cluster(algo):
    x = features(batch=6)
    x[:, 5] = x[:, 2]
    for k in range(1, 9):
        labels = cluster_heads(x, k, algo)
        assert torch.equal(labels[:, 5], labels[:, 2]), k


@pytest.mark.parametrize("algo", ["kmeans", "agglomerative"])
def test_separated_blobs_are_recovered(algo):
    truth = torch.tensor([0, 1, 0, 2, 1, 2, 0, 1])
    centers = torch.eye(3) * 10
    x = centers[truth][None] + 0.01 * features(batch=3, dim=3)
    labels = cluster_heads(x, 3, algo)
    assert torch.equal(labels, canonical(truth[None], 3).expand(3, -1))


def test_kmeans_is_deterministic_canonical_and_fills_every_cluster():
    x = features(batch=16, heads=12, dim=6, seed=3)
    for k in range(1, 13):
        labels, inertia = kmeans(x, k)
        again, _ = kmeans(x.clone(), k)
        assert torch.equal(labels, again)
        # canonical: clusters numbered by first appearance, all k used (distinct random points)
        assert torch.equal(labels, canonical(labels, k))
        assert (labels.max(1).values == k - 1).all()
        assert labels[:, 0].eq(0).all()
    _, one = kmeans(x, 1)
    torch.testing.assert_close(one, (x - x.mean(1, keepdim=True)).pow(2).sum((1, 2)))
    assert kmeans(x, 12)[1].abs().max() < 1e-5


def test_inertia_curve_falls_for_an_elbow():
    x = features(batch=8, heads=10, dim=8, seed=1)
    curve = torch.stack([kmeans(x, k)[1].sum() for k in range(1, 11)])
    assert (curve[1:] <= curve[:-1] + 1e-6).all()


def test_representatives_first_and_medoid():
    x = torch.tensor([[[0.0], [5.0], [1.0], [2.0], [6.0]]])  # cluster A = heads 0, 2, 3; B = 1, 4
    labels = torch.tensor([[0, 1, 0, 0, 1]])
    assert representatives(x, labels, 2, "first").tolist() == [[0, 1]]
    assert representatives(x, labels, 2, "medoid").tolist() == [[2, 1]]  # 1.0 is the middle of 0, 1, 2


def test_membership_keeps_only_kv_heads_that_representatives_read():
    labels = torch.tensor([[0, 0, 1, 1, 2, 2, 2, 2], [0, 1, 1, 1, 1, 1, 1, 2]])
    reps = representatives(None, labels, 3, "first")  # [[0, 2, 4], [0, 1, 7]]
    m = Membership.build(labels, reps, groups=2, kv_heads=4)  # query h reads KV head h // 2
    assert m.kept_kv() == [3, 2]  # KV heads {0, 1, 2} and {0, 3}
    assert m.kv_keep.tolist() == [[0, 1, 2], [0, 3, 0]]  # ascending, padded to the batch maximum
    assert torch.equal(m.kv_keep.gather(1, m.rep_slot), reps // 2)
    assert m.groups(1) == [[0], [1, 2, 3, 4, 5, 6], [7]]


def test_bad_counts_and_groups_fail_with_one_line():
    for k in (0, 9):
        with pytest.raises(ChaiError, match="cannot cluster 8 heads"):
            cluster_heads(features(), k)
    with pytest.raises(ChaiError, match="unknown cluster_algo"):
        cluster_heads(features(), 2, "dbscan")
    with pytest.raises(ChaiError, match="exactly once"):
        labels_from_groups([[0, 1], [1, 2]], 3)


def test_random_labels_have_exactly_the_count():
    gen = torch.Generator().manual_seed(0)
    for k in range(1, 9):
        labels = random_labels(8, k, gen)
        assert len(set(labels.tolist())) == k


def test_agglomerative_matches_reference_linkage():
    """Same partition as the reference code's call (sklearn on scipy cosine distances) up to numbering."""
    from scipy.spatial.distance import cdist
    from sklearn.cluster import AgglomerativeClustering

    x = features(batch=2, heads=9)
    ours = agglomerative(x, 4)
    for row in range(2):
        ref = AgglomerativeClustering(n_clusters=4, metric="precomputed", linkage="average")
        ref_labels = torch.as_tensor(ref.fit(cdist(x[row].numpy(), x[row].numpy(), metric="cosine")).labels_)
        assert torch.equal(ours[row], canonical(ref_labels[None].long(), 4)[0])


def _partitions(n):
    """Every partition of range(n) as restricted growth strings (labels[0] = 0, labels[i] <= max(labels[:i]) + 1)."""
    def grow(prefix, top):
        if len(prefix) == n:
            yield prefix
            return
        for label in range(top + 2):
            yield from grow(prefix + [label], max(top, label))
    yield from grow([0], 0)


def _optimal_inertia(x: torch.Tensor, k: int) -> torch.Tensor:
    """The exact K-Means optimum of each problem, by enumerating every partition into at most k groups. x [B, N, F]."""
    x = x.double()
    best = torch.full((x.shape[0],), float("inf"), dtype=torch.float64)
    for labels in _partitions(x.shape[1]):
        if max(labels) >= k:
            continue
        onehot = torch.nn.functional.one_hot(torch.tensor(labels), k).double()  # [N, k]
        sizes = onehot.sum(0).clamp(min=1)
        means = torch.einsum("nk,bnf->bkf", onehot, x) / sizes[None, :, None]
        inertia = (x - means[:, torch.tensor(labels)]).pow(2).sum((1, 2))
        best = torch.minimum(best, inertia)
    return best


def test_restarts_reach_the_optimal_partition_that_one_seeding_misses():
    """Attention-like features (causal rows of 5 tokens, Dirichlet) for 8 heads: the calibration's K-Means with
    restarts is within 1% of the exact optimum on average and never worse than one seeding."""
    torch.manual_seed(0)
    rows = [torch.distributions.Dirichlet(torch.ones(t)).sample((24, 8)) for t in range(1, 6)]
    x = torch.cat(rows, dim=-1)  # [24, 8, 15]
    for k in (2, 3, 4):
        optimum = _optimal_inertia(x, k)
        one = kmeans(x, k)[1].double()
        many = kmeans(x, k, restarts=20)[1].double()  # the calibration default (conf/calibration)
        assert (many <= one + 1e-6).all()
        assert (many / optimum).mean() < 1.01, k
        assert (one / optimum).mean() > (many / optimum).mean()  # the restarts are what closes the gap


def test_restarts_keep_the_first_start_when_it_is_optimal():
    x = features(batch=6, heads=8, dim=4, seed=5)
    labels, inertia = kmeans(x, 8, restarts=5)  # one head per cluster: inertia 0 from the first start
    assert torch.equal(labels, kmeans(x, 8)[0]) and inertia.abs().max() < 1e-5
