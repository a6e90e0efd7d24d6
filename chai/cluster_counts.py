"""Rules that turn the calibration artifact into CHAI's cluster count per layer (the offline phase's decision).

- `kneedle`: the paper's elbow, read by the kneedle rule (Satopaa et al., 2011): each layer's inertia curve is
  rescaled to [0, 1] and the count farthest below the chord is taken. The rescaling discards how much a layer's
  heads actually differ, and on 9 structureless points it picks 3-5 as well (the artifact stores that noise curve).
- `threshold`: the smallest count whose inertia is at most `tau` of the layer's one-cluster inertia. Every layer is
  read on one scale: the share of the head-to-head spread left unexplained.
- `budget`: the counts that reach a saving target at the least measured cost. The artifact's sensitivity table holds,
  per layer and count, the increase in C4 next-token loss when only that layer is clustered at that count; the
  allocation minimising the summed increase (additivity across layers is the assumption, as in mixed-precision
  allocation) subject to the saving is found exactly by dynamic programming over the saved units.

Savings are counted in units of one head of one layer: `kv_bytes` counts K heads no longer stored against all K and
V heads (V is always kept; online membership keeps K for min(clusters, KV heads) heads per layer, the cache's bound),
`qk_work` counts score matrices no longer computed against all of them.
"""

import math
from typing import TYPE_CHECKING

from chai.errors import ChaiError, did_you_mean

if TYPE_CHECKING:  # plain arithmetic on 9-point curves: no torch, so the report can draw Fig. 8 without it
    from chai.attention import AttnShape

RULES = ("kneedle", "threshold", "budget")
SAVINGS = ("kv_bytes", "qk_work")


def kneedle(curve: list[float]) -> int:
    """The count at the paper-style elbow of one layer's inertia curve (index 0 = one cluster)."""
    span = curve[0] - curve[-1]
    if len(curve) == 1 or span <= 0:
        return 1
    below_chord = [(1 - i / (len(curve) - 1)) - (c - curve[-1]) / span for i, c in enumerate(curve)]
    return max(range(len(curve)), key=below_chord.__getitem__) + 1  # first index on ties


def threshold(curve: list[float], tau: float) -> int:
    """The smallest count whose inertia is at most tau times the one-cluster inertia."""
    return next((k for k, c in enumerate(curve, start=1) if c <= tau * curve[0]), len(curve))


def saved_units(shape: "AttnShape", count: int, saving: str) -> int:
    """Heads' worth of K (kv_bytes) or score matrices (qk_work) one layer at `count` clusters no longer holds."""
    if saving == "kv_bytes":
        return shape.kv_heads - min(count, shape.kv_heads)
    return shape.heads - count


def total_units(shape: "AttnShape", saving: str) -> int:
    """Everything a dense model holds (K and V heads) or computes (score matrices), in the same units."""
    return shape.layers * (2 * shape.kv_heads if saving == "kv_bytes" else shape.heads)


def saving_of(counts: list[int], shape: "AttnShape", saving: str) -> float:
    return sum(saved_units(shape, c, saving) for c in counts) / total_units(shape, saving)


def allocate(costs: list[list[float]], shape: "AttnShape", target: float, saving: str,
             first_layer: int = 0) -> list[int]:
    """Exact minimum-cost counts per layer with saving >= target. costs[layer][k-1]: loss increase at k clusters
    (k = heads costs 0: dense). A measured decrease is calibration noise, counted as free, never as a gain (else a
    count that saves nothing would be picked for it). Layers before `first_layer` stay dense. Ties go to more
    clusters."""
    need = math.ceil(target * total_units(shape, saving) - 1e-9)
    best = {0: (0.0, 0, [])}  # saved units (capped at need) -> (cost, -clusters, counts so far)
    for layer in range(shape.layers):
        options = range(1, shape.heads + 1) if layer >= first_layer else [shape.heads]
        step = {}
        for saved, (cost, fewer, counts) in best.items():
            for k in options:
                units = min(need, saved + saved_units(shape, k, saving))
                value = (cost + (max(0.0, costs[layer][k - 1]) if k < shape.heads else 0.0), fewer - k, counts + [k])
                if units not in step or value[:2] < step[units][:2]:
                    step[units] = value
        best = step
    if need not in best:
        most = saving_of([1] * shape.layers, shape, saving) if first_layer == 0 else None
        raise ChaiError(f"a {saving} saving of {target:.0%} is out of reach on this model"
                        + (f" (at most {most:.0%}, one cluster everywhere)" if most is not None else "")
                        + ": lower method.budget.")
    return best[need][2]


def choose(artifact: dict, shape: "AttnShape", rule: str, tau: float = 0.1, budget: float = 0.3,
           saving: str = "kv_bytes", first_layer: int = 0) -> tuple[list[int], str]:
    """(counts per layer, a one-line description of how they were chosen) from a calibration artifact."""
    if rule not in RULES:
        raise did_you_mean("method.count_rule", rule, RULES)
    curves = artifact["elbow"]["inertia"]
    if rule == "kneedle":
        return [kneedle(c) for c in curves], "calibration: kneedle elbow (the paper's)"
    if rule == "threshold":
        return [threshold(c, tau) for c in curves], f"calibration: inertia <= {tau} x one-cluster inertia"
    table = artifact.get("sensitivity")
    if table is None:
        raise ChaiError("the calibration artifact has no sensitivity table (made before the budget rule): rerun "
                        "`python run.py mode=calibrate model=...`.")
    counts = allocate(table["delta_loss"], shape, budget, saving, first_layer)
    return counts, f"calibration: least measured loss for a {budget:.0%} {saving} saving"
