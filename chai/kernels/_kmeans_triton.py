"""The Triton kernel behind `chai.kernels.fused_kmeans.fused_kmeans` (see there for the contract); a module of its own
so that triton is imported only when the kernel is first used.

One program per problem (request) runs `chai.clustering.kmeans(features, k)` with its defaults, step for step: the
centring, farthest-point seeding, Lloyd with the empty-cluster refill, the early stop and the canonical numbering.
Everything lives in registers (larger tiles spill some, see there): the points x [BN, BF], the centers [BK, BF] and
the distances [BN, BK]. Loops run as while loops, as the interpreter cannot loop to a runtime bound. Padded heads
(n >= N) are zero rows that never take part in a mean, an argmax or a canonical number; padded clusters (j >= k)
are at distance +inf from every point and so never win an argmin. Distances use the reference's matmul form
|x|^2 + |c|^2 - 2 x.c, clamped at 0, so that rounding (and hence tie-breaking) follows it as closely as it can.
The kernel's body is three jit functions, `centre`, `lloyd` and `canonical`, which the fused membership kernel
(`_membership_triton`) runs too.
"""

import triton
import triton.language as tl


@triton.jit
def _row(x, i, BN: tl.constexpr):
    """Row i of x [BN, F] as [F], exactly (a masked sum adds only zeros to it)."""
    return tl.sum(tl.where(tl.arange(0, BN)[:, None] == i, x, 0.0), axis=0)


@triton.jit
def _to_point(x, xx, p):
    """Squared distances [BN] of x [BN, BF] (squared norms xx [BN]) to one point p [BF]."""
    return tl.maximum(xx + tl.sum(p * p, axis=0) - 2 * tl.sum(x * p[None, :], axis=1), 0.0)


@triton.jit
def _sqdist(x, xx, centers, k, BK: tl.constexpr):
    """Squared distances [BN, BK] of x [BN, BF] to centers [BK, BF]; padded clusters (>= k) at +inf."""
    cross = tl.dot(x, tl.trans(centers), input_precision="ieee")
    cc = tl.sum(centers * centers, axis=1)
    dist = tl.maximum(xx[:, None] + cc[None, :] - 2 * cross, 0.0)
    return tl.where(tl.arange(0, BK)[None, :] < k, dist, float("inf"))


@triton.jit
def _assign(x, xx, centers, k, row_ok, BK: tl.constexpr):
    """Nearest center of each point [BN] (lowest index on ties); padded heads get BK, a cluster nobody has."""
    nearest = tl.argmin(_sqdist(x, xx, centers, k, BK), axis=1, tie_break_left=True)
    return tl.where(row_ok, nearest, BK)


@triton.jit
def _means(x, labels, old, BK: tl.constexpr):
    """Cluster means [BK, BF] (an empty cluster keeps its old center) and sizes [BK], as onehot^T @ x."""
    onehot = (labels[:, None] == tl.arange(0, BK)[None, :]).to(tl.float32)  # [BN, BK]
    sizes = tl.sum(onehot, axis=0)
    sums = tl.dot(tl.trans(onehot), x, input_precision="ieee")
    return tl.where(sizes[:, None] > 0, sums / tl.maximum(sizes, 1.0)[:, None], old), sizes


@triton.jit
def _any_empty(sizes, k, BK: tl.constexpr):
    return tl.sum(((sizes == 0) & (tl.arange(0, BK) < k)).to(tl.int32), axis=0) > 0


@triton.jit
def _seed(x, xx, row_ok, k, tol, BN: tl.constexpr, BK: tl.constexpr):
    """Farthest-point seeding: head 0, then the point farthest from every chosen center (distances within the
    tolerance count as 0; first index on ties) -> centers [BK, BF] (padded ones 0)."""
    first = _row(x, 0, BN)
    clusters = tl.arange(0, BK)[:, None]
    centers = tl.where(clusters == 0, first[None, :], 0.0)
    nearest = _to_point(x, xx, first)
    i = 1
    while i < k:  # not range(1, k): the interpreter cannot loop to a runtime bound
        nearest = tl.where(nearest > tol, nearest, 0.0)
        pick = tl.argmax(tl.where(row_ok, nearest, -1.0), axis=0, tie_break_left=True)
        point = _row(x, pick, BN)
        centers = tl.where(clusters == i, point[None, :], centers)
        nearest = tl.minimum(nearest, _to_point(x, xx, point))
        i += 1
    return centers


@triton.jit
def _refill(x, xx, labels, centers, sizes, row_ok, k, tol, BN: tl.constexpr, BK: tl.constexpr):
    """While a cluster is empty (at most k times): move the movable point (its cluster has >= 2 members) farthest
    from its own center into the first empty cluster, if it lies beyond the tolerance; recompute the means."""
    heads = tl.arange(0, BN)
    clusters = tl.arange(0, BK)
    rounds = 0
    going = _any_empty(sizes, k, BK)
    while going & (rounds < k):
        mine = labels[:, None] == clusters[None, :]  # [BN, BK]
        own = tl.sum(tl.where(mine, _sqdist(x, xx, centers, k, BK), 0.0), axis=1)
        movable = tl.sum(tl.where(mine, sizes[None, :], 0.0), axis=1) > 1
        own = tl.where(row_ok, tl.where(movable, own, 0.0), -1.0)  # a padded head is never the farthest
        point = tl.argmax(own, axis=0, tie_break_left=True)
        fix = tl.max(own, axis=0) > tol
        target = tl.min(tl.where((sizes == 0) & (clusters < k), clusters, BK), axis=0)  # the first empty cluster
        labels = tl.where(heads == tl.where(fix, point, -1), target, labels)
        moved, moved_sizes = _means(x, labels, centers, BK)
        centers = tl.where(fix, moved, centers)
        sizes = tl.where(fix, moved_sizes, sizes)
        going = fix & _any_empty(sizes, k, BK)
        rounds += 1
    return labels, centers


@triton.jit
def canonical(labels, N, BN: tl.constexpr, BK: tl.constexpr):
    """Renumber clusters by their lowest member head, empty ones last (by index): labels [BN] -> [BN]."""
    heads = tl.arange(0, BN)
    clusters = tl.arange(0, BK)
    mine = labels[:, None] == clusters[None, :]
    lowest = tl.min(tl.where(mine, heads[:, None], N), axis=0)  # [BK]: N if empty
    before = (lowest[None, :] < lowest[:, None]) | ((lowest[None, :] == lowest[:, None])
                                                    & (clusters[None, :] < clusters[:, None]))
    rank = tl.sum(before.to(tl.int32), axis=1)  # [BK]: clusters sorted before each
    return tl.sum(tl.where(mine, rank[None, :], 0), axis=1)


@triton.jit
def centre(x, ok, N):
    """Points x [BN, BF] (zeros outside `ok`) minus their mean (as the reference: sum, then / N), their squared norms
    xx [BN] and the tolerance below which a squared distance counts as rounding."""
    x = tl.where(ok, x - (tl.sum(x, axis=0) / N)[None, :], 0.0)
    xx = tl.sum(x * x, axis=1)
    tol = 1e-5 * tl.maximum(tl.sum(xx, axis=0) / N, 1e-30)
    return x, xx, tol


@triton.jit
def lloyd(x, xx, tol, row_ok, k, iters, BN: tl.constexpr, BK: tl.constexpr):
    """K-Means of the centred points x [BN, BF] from farthest-point seeds: labels [BN] (not yet canonical) and the
    centers [BK, BF] they were last assigned to."""
    centers = _seed(x, xx, row_ok, k, tol, BN, BK)
    labels = _assign(x, xx, centers, k, row_ok, BK)
    step = 0
    moving = step < iters
    while moving:  # Lloyd until the labels stop changing, at most `iters` updates
        centers, sizes = _means(x, labels, centers, BK)
        labels, centers = _refill(x, xx, labels, centers, sizes, row_ok, k, tol, BN, BK)
        new = _assign(x, xx, centers, k, row_ok, BK)
        step += 1
        moving = (tl.sum((new != labels).to(tl.int32), axis=0) > 0) & (step < iters)
        labels = new
    return labels, centers


@triton.jit(do_not_specialize=["k"])  # k changes from layer to layer: one compile serves every k up to BK
def kmeans_kernel(X, Labels, Inertia, N, F, k, iters,
                  BN: tl.constexpr, BF: tl.constexpr, BK: tl.constexpr):
    """One program per problem b: X [B, N, F] float32 contiguous -> Labels [B, N] int64 (canonical), Inertia [B]."""
    b = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, BN)
    feats = tl.arange(0, BF)
    row_ok = heads < N
    ok = row_ok[:, None] & (feats[None, :] < F)
    x = tl.load(X + b * N * F + heads[:, None] * F + feats[None, :], mask=ok, other=0.0)
    x, xx, tol = centre(x, ok, N)
    labels, centers = lloyd(x, xx, tol, row_ok, k, iters, BN, BK)

    centers, _ = _means(x, labels, centers, BK)
    own = tl.sum(tl.where(labels[:, None] == tl.arange(0, BK)[None, :], _sqdist(x, xx, centers, k, BK), 0.0), axis=1)
    tl.store(Inertia + b, tl.sum(own, axis=0))
    tl.store(Labels + b * N + heads, canonical(labels, N, BN, BK).to(tl.int64), mask=row_ok)
