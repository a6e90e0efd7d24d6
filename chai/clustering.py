"""Clustering attention heads: batched deterministic K-Means, agglomerative (the reference code's), representatives,
and the `Membership` a clustered layer runs with.

CHAI (Agarwal et al., ICML 2024) groups the heads of a layer whose attention-score distributions are alike,
computes softmax(QK^T) once per group and shares it. Features are per-head vectors (flattened causal attention
probabilities over a few tokens); every function here works on a batch of independent problems, one per request
(`features [B, H, F]`), because each request gets its own membership.

Labels are canonical: clusters are numbered by their lowest member head, so equal partitions have equal labels and
clusters that ended up empty (only when heads are duplicates, up to rounding) come last.
"""

from dataclasses import dataclass

import torch

from chai.errors import ChaiError, check_cluster_count
from chai.kernels.fused_kmeans import fused_kmeans, use_fused

ALGOS = ("kmeans", "agglomerative")
REPRESENTATIVES = ("first", "medoid")


def _sqdist(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """x [B, N, F], centers [B, K, F] -> squared Euclidean distances [B, N, K] (matmul form, clamped at 0; identical
    points get identical rows, so they always pick the same center)."""
    cross = x @ centers.transpose(1, 2)
    return (x.pow(2).sum(-1)[..., None] + centers.pow(2).sum(-1)[:, None, :] - 2 * cross).clamp(min=0)


def _tolerance(x: torch.Tensor) -> torch.Tensor:
    """[B, 1]: squared distances below this are rounding, not separation (points this close count as duplicates)."""
    return 1e-5 * x.pow(2).sum(-1).mean(-1, keepdim=True).clamp(min=1e-30)


def _farthest_point_init(x: torch.Tensor, k: int) -> torch.Tensor:
    """Deterministic maximin seeding: head 0, then repeatedly the point farthest from every chosen center
    (first index on ties). x [B, N, F] -> centers [B, k, F]."""
    rows = torch.arange(x.shape[0], device=x.device)
    centers = [x[:, 0]]
    nearest = _sqdist(x, x[:, :1]).squeeze(-1)  # [B, N]
    for _ in range(1, k):
        nearest = torch.where(nearest > _tolerance(x), nearest, torch.zeros_like(nearest))
        pick = nearest.argmax(dim=1)
        centers.append(x[rows, pick])
        nearest = torch.minimum(nearest, _sqdist(x, x[rows, pick][:, None]).squeeze(-1))
    return torch.stack(centers, dim=1)


def _means(x: torch.Tensor, labels: torch.Tensor, old: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster means [B, K, F] (an empty cluster keeps its old center) and sizes [B, K]."""
    k = old.shape[1]
    onehot = torch.nn.functional.one_hot(labels, k).to(x.dtype)  # [B, N, K]
    sizes = onehot.sum(1)
    sums = onehot.transpose(1, 2) @ x
    means = torch.where(sizes[..., None] > 0, sums / sizes.clamp(min=1)[..., None], old)
    return means, sizes


def _refill_empty(x, labels, centers, sizes):
    """Give each empty cluster the point farthest from its own center, taken from a cluster with two or more
    members (sklearn's rule, made deterministic). Rows where every point lies within rounding of its center keep
    the empty cluster: their heads are duplicates and cannot fill k distinct clusters."""
    rows = torch.arange(x.shape[0], device=x.device)
    for _ in range(centers.shape[1]):
        empty = sizes == 0
        if not empty.any():
            break
        own = _sqdist(x, centers).gather(2, labels[..., None]).squeeze(-1)  # [B, N]
        movable = sizes.gather(1, labels) > 1
        own = torch.where(movable, own, torch.zeros_like(own))
        far, point = own.max(dim=1)
        fix = empty.any(1) & (far > _tolerance(x)[:, 0])
        if not fix.any():
            break
        target = empty.float().argmax(1)  # the first empty cluster of each row
        b, p, t = rows[fix], point[fix], target[fix]
        centers[b, t] = x[b, p]
        labels[b, p] = t
        centers, sizes = _means(x, labels, centers)
    return labels, centers


def causal_features(probs: torch.Tensor, tokens: int) -> torch.Tensor:
    """probs [B, H, >=tokens, >=tokens] -> [B, H, tokens(tokens+1)/2]: each head's causal attention rows over the
    first `tokens` positions (the zeros above the diagonal carry no information), CHAI's clustering feature."""
    rows, cols = torch.tril_indices(tokens, tokens, device=probs.device)
    return probs[:, :, rows, cols]


def _plus_plus_init(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur and Vassilvitskii, 2007), one draw per problem: a uniform first center, then each
    next one with probability proportional to the squared distance to the nearest chosen center. x [B, N, F]."""
    batch, n, _ = x.shape
    rows = torch.arange(batch, device=x.device)
    first = torch.randint(0, n, (batch,), generator=generator).to(x.device)
    centers = [x[rows, first]]
    nearest = _sqdist(x, centers[0][:, None]).squeeze(-1)  # [B, N]
    for _ in range(1, k):
        weights = torch.where(nearest > _tolerance(x), nearest, torch.zeros_like(nearest))
        weights = torch.where(weights.sum(1, keepdim=True) > 0, weights, torch.ones_like(weights))  # all duplicates
        pick = torch.multinomial(weights.double().cpu(), 1, generator=generator)[:, 0].to(x.device)
        centers.append(x[rows, pick])
        nearest = torch.minimum(nearest, _sqdist(x, x[rows, pick][:, None]).squeeze(-1))
    return torch.stack(centers, dim=1)


def _lloyd(x: torch.Tensor, centers: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd iterations from `centers` on centred x [B, N, F] -> (labels [B, N], inertia [B])."""
    labels = _sqdist(x, centers).argmin(-1)
    for _ in range(iters):
        centers, sizes = _means(x, labels, centers)
        labels, centers = _refill_empty(x, labels, centers, sizes)
        new = _sqdist(x, centers).argmin(-1)
        if torch.equal(new, labels):
            break
        labels = new
    centers, _ = _means(x, labels, centers)
    return labels, _sqdist(x, centers).gather(2, labels[..., None]).squeeze(-1).sum(1)


def kmeans(features: torch.Tensor, k: int, iters: int = 100, restarts: int = 1,
           seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched Lloyd K-Means; deterministic.

    features [B, N, F] -> (canonical labels [B, N], inertia [B] = sum of squared distances to the centers).
    The first start is farthest-point seeding (what the online phase runs, once per request); `restarts` - 1 more
    start from k-means++ draws of a generator seeded with `seed`, and each problem keeps its lowest-inertia result
    (Lloyd only finds a local optimum: one seeding ends several percent above the best partition on 9 heads).
    Ties go to the lowest cluster index, so identical points always share a cluster.
    """
    x = features.float()
    x = x - x.mean(1, keepdim=True)  # distances are shift-invariant; centring keeps the matmul form's rounding small
    labels, inertia = _lloyd(x, _farthest_point_init(x, k), iters)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(1, restarts):
        other, other_inertia = _lloyd(x, _plus_plus_init(x, k, generator), iters)
        better = other_inertia < inertia * (1 - 1e-6)  # strictly better beyond rounding: keep the first otherwise
        labels = torch.where(better[:, None], other, labels)
        inertia = torch.where(better, other_inertia, inertia)
    return canonical(labels, k), inertia


def cosine_distances(features: torch.Tensor) -> torch.Tensor:
    """features [B, N, F] -> 1 - cosine similarity [B, N, N] in float64, clipped at 0."""
    x = torch.nn.functional.normalize(features.double(), dim=-1)
    return (1 - x @ x.transpose(1, 2)).clamp(min=0)


def agglomerative(features: torch.Tensor, k: int) -> torch.Tensor:
    """The reference code's clustering: cosine distance, average linkage (sklearn, one problem at a time on the
    CPU). features [B, N, F] -> canonical labels [B, N]. Exact duplicate points always share a cluster (so a row
    with fewer distinct points than k gets fewer clusters, as K-Means gives it)."""
    from sklearn.cluster import AgglomerativeClustering

    dist = cosine_distances(features.detach()).cpu().numpy()  # outside no_grad too
    out = []
    for row, points in zip(dist, features.detach().cpu()):
        # Exact duplicate heads share a cluster, as in K-Means: at most as many clusters as distinct heads.
        distinct = torch.unique(points, dim=0).shape[0]
        if min(k, distinct) == row.shape[0]:
            out.append(torch.arange(row.shape[0]))
            continue
        fit = AgglomerativeClustering(n_clusters=min(k, distinct), metric="precomputed", linkage="average").fit(row)
        out.append(torch.as_tensor(fit.labels_, dtype=torch.long))
    return canonical(torch.stack(out).to(features.device), k)


def cluster_heads(features: torch.Tensor, n_clusters: int, algo: str = "kmeans") -> torch.Tensor:
    """Cluster the heads of a batch of requests. features [B, H, F] -> canonical labels [B, H] (LongTensor).

    `algo`: "kmeans" (the paper: batched Lloyd, farthest-point seeding) or "agglomerative" (the released code:
    cosine distance, average linkage). `n_clusters` must be in 1..H. K-Means runs as one fused kernel launch where
    `use_fused` allows (a GPU, or Triton's interpreter), else as `kmeans`: the same labels, up to float32 rounding
    ties (see `chai.kernels.fused_kmeans`).
    """
    heads = features.shape[1]
    check_cluster_count(heads, n_clusters)
    if algo == "kmeans":
        return fused_kmeans(features, n_clusters) if use_fused(features) else kmeans(features, n_clusters)[0]
    if algo == "agglomerative":
        return agglomerative(features, n_clusters)
    raise ChaiError(f"unknown cluster_algo '{algo}'. Valid: {', '.join(ALGOS)}.")


def canonical(labels: torch.Tensor, k: int) -> torch.Tensor:
    """Renumber clusters by their lowest member (empty ones last). labels [B, N] -> [B, N]."""
    batch, n = labels.shape
    heads = torch.arange(n, device=labels.device).expand(batch, n)
    lowest = torch.full((batch, k), n, device=labels.device, dtype=torch.long)
    lowest = lowest.scatter_reduce(1, labels, heads, reduce="amin")  # [B, K]: lowest member (n if empty)
    order = lowest.argsort(dim=1, stable=True)
    ranks = torch.arange(k, device=labels.device).expand(batch, k).contiguous()
    rank = torch.empty_like(lowest).scatter_(1, order, ranks)
    return rank.gather(1, labels)


def representatives(features: torch.Tensor, labels: torch.Tensor, n_clusters: int, how: str = "first") -> torch.Tensor:
    """The head whose attention scores stand in for each cluster. labels [B, H] (canonical) -> reps [B, C].

    `first`: the lowest-index member (the reference code). `medoid`: the member with the smallest summed Euclidean
    distance to the other members (first index on ties). An empty cluster gets cluster 0's representative, which no
    head reads.
    """
    if how not in REPRESENTATIVES:
        raise ChaiError(f"unknown representative '{how}'. Valid: {', '.join(REPRESENTATIVES)}.")
    batch, heads = labels.shape
    if how == "first":
        cost = torch.arange(heads, device=labels.device, dtype=torch.float64).expand(batch, heads)
    else:
        x = features.double()
        same = labels[:, :, None] == labels[:, None, :]
        cost = (torch.cdist(x, x) * same).sum(-1)  # [B, H]
    member = labels[:, None, :] == torch.arange(n_clusters, device=labels.device)[None, :, None]  # [B, C, H]
    scored = torch.where(member, cost[:, None, :], torch.full_like(cost[:, None, :], float("inf")))
    reps = scored.argmin(-1)
    return torch.where(member.any(-1), reps, reps[:, :1])


@dataclass
class Membership:
    """Who represents whom in one layer, for every request of a batch.

    labels [B, H]: cluster of each query head. reps [B, C]: the query head whose scores each cluster uses.
    kv_keep [B, S]: KV heads whose K stays in the cache (those some representative reads), ascending, padded
    with repeats to the batch maximum. rep_slot [B, C]: the entry of kv_keep each representative reads.
    """

    labels: torch.Tensor
    reps: torch.Tensor
    kv_keep: torch.Tensor
    rep_slot: torch.Tensor

    @classmethod
    def build(cls, labels: torch.Tensor, reps: torch.Tensor, groups: int, kv_heads: int,
              width: int | None = None) -> "Membership":
        """`width`: entries of kv_keep, at least the most KV heads any request uses (a cache of fixed size passes
        its slot count, which spares the host sync of finding the batch maximum)."""
        used_clusters = torch.zeros_like(reps, dtype=torch.bool).scatter_(1, labels, True)  # [B, C]
        rep_kv = reps // groups  # GQA: query head h reads KV head h // groups
        used = torch.zeros(reps.shape[0], kv_heads, dtype=torch.bool, device=reps.device)
        used.scatter_(1, torch.where(used_clusters, rep_kv, rep_kv[:, :1]), True)  # [B, Hkv]
        width = int(used.sum(1).max()) if width is None else width
        order = (~used).to(torch.int8).argsort(dim=1, stable=True)[:, :width]  # used heads first, ascending
        filled = torch.arange(width, device=reps.device)[None] < used.sum(1, keepdim=True)
        kv_keep = torch.where(filled, order, order[:, :1])
        slot_of_kv = used.long().cumsum(1) - 1  # rank of each used KV head = its slot
        return cls(labels, reps, kv_keep, slot_of_kv.gather(1, rep_kv))

    @property
    def n_clusters(self) -> torch.Tensor:
        """[B] non-empty clusters per request."""
        return torch.zeros_like(self.reps, dtype=torch.bool).scatter_(1, self.labels, True).sum(1)

    def kept_kv(self) -> list[int]:
        """Distinct KV heads whose K each request keeps."""
        return [len(set(row)) for row in self.kv_keep.tolist()]

    def index(self, rows: torch.Tensor) -> "Membership":
        """Select or reorder requests (beam search, batch filtering). rows [B'] of request indices."""
        return Membership(*(t[rows.to(t.device)] for t in (self.labels, self.reps, self.kv_keep, self.rep_slot)))

    def groups(self, row: int = 0) -> list[list[int]]:
        """One request's partition as lists of head indices (non-empty clusters, numbered order)."""
        found: dict[int, list[int]] = {}
        for head, cluster in enumerate(self.labels[row].tolist()):
            found.setdefault(cluster, []).append(head)
        return [found[c] for c in sorted(found)]


def labels_from_groups(groups: list[list[int]], heads: int) -> torch.Tensor:
    """A partition given as head-index lists -> canonical labels [H]."""
    labels = torch.full((heads,), -1, dtype=torch.long)
    for cluster, members in enumerate(groups):
        labels[torch.as_tensor(members, dtype=torch.long)] = cluster
    if (labels < 0).any() or sum(len(g) for g in groups) != heads:
        raise ChaiError(f"a static grouping must cover each of the {heads} heads exactly once, got {groups}.")
    return canonical(labels[None], len(groups))[0]


def random_labels(heads: int, n_clusters: int, generator: torch.Generator) -> torch.Tensor:
    """A random partition of `heads` heads into exactly `n_clusters` non-empty groups -> labels [H]: a random
    head opens each group, every other head joins a group drawn uniformly."""
    perm = torch.randperm(heads, generator=generator)
    labels = torch.randint(0, n_clusters, (heads,), generator=generator)
    labels[perm[:n_clusters]] = torch.arange(n_clusters)
    return canonical(labels[None], n_clusters)[0]
