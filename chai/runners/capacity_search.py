"""The arithmetic of mode=capacity, free of torch: how much memory a batch needs (K,V cache + workspace), the largest
batch predicted to fit, and the search for the largest batch that really fits.

Memory model of one cell (a static cache of `seq_len + new_tokens` tokens per sequence, a whole-batch prefill, then
decode steps): need(B) = K,V(B) + workspace(B) + reserve, with
- K,V(B): the method's analytic `kv_bytes` (exact: the tests and the bench check it against the cache tensors);
- workspace(B) = fixed + per_seq x B: what the run allocates beyond the cache (prefill activations, which grow with
  the batch; the step's buffers, a compiled step's graph pool). Measured on CUDA by probe runs (the allocator's peak,
  or its reserved peak when larger: segments split between prefill tensors of different sizes are held but not
  allocated; the first H200 run ran out of memory at 82 sequences when 81 peaked at 114 GB allocated of a 136 GB
  budget), minus the K,V the cache holds, fitted by least squares (`fit_workspace`), or configured;
- reserve: configured room for memory outside the caching allocator (CUDA context, cuBLAS and Triton workspaces).
A batch fits when need(B) <= the budget: the device memory free after the model loaded, or a configured number.
"""

from dataclasses import asdict, dataclass


@dataclass
class Trial:
    """One candidate batch judged: does it fit, and why (an allocator peak, an out-of-memory error, an analytic
    need against the budget)."""

    batch: int
    fits: bool
    reason: str
    peak_bytes: int | None = None  # allocator peak of the run, over what was allocated before it (CUDA)
    kv_bytes: int | None = None  # K,V the cache held (measured from its tensors)
    seconds: float | None = None  # wall time of the trial
    reserved_bytes: int | None = None  # allocator's reserved peak over what it reserved before (CUDA): fragmentation

    def as_record(self) -> dict:
        return asdict(self)


class Logged:
    """A judge whose every trial is also appended to `log`: a cell that fails midway still records what it tried."""

    def __init__(self, judge, log: list[Trial]):
        self.judge, self.log = judge, log

    def __call__(self, batch: int) -> Trial:
        trial = self.judge(batch)
        self.log.append(trial)
        return trial


@dataclass
class Workspace:
    fixed: int  # bytes that do not grow with the batch
    per_seq: int  # bytes per sequence of the batch
    source: str  # how they were found

    def at(self, batch: int) -> int:
        return self.fixed + self.per_seq * batch


def fit_workspace(points: list[tuple[int, int]]) -> Workspace:
    """Workspace from probes [(batch, bytes beyond the cache)]. One probe: proportional to the batch (prefill
    activations dominate; any fixed part is then over-counted, so the prediction errs low and the search climbs).
    Two or more: fixed + per_seq x batch by least squares, neither part below zero."""
    if not points:
        raise ValueError("fit_workspace needs at least one probe")
    batches = {b for b, _ in points}
    if len(batches) == 1:
        batch = points[0][0]
        return Workspace(0, max(0, round(max(w for _, w in points) / batch)), f"1 probe (batch {batch}): per sequence")
    n = len(points)
    mean_b, mean_w = sum(b for b, _ in points) / n, sum(w for _, w in points) / n
    slope = (sum((b - mean_b) * (w - mean_w) for b, w in points)
             / sum((b - mean_b) ** 2 for b, _ in points))
    fixed = mean_w - slope * mean_b
    if slope < 0:  # noise on a flat workspace
        slope, fixed = 0.0, mean_w
    if fixed < 0:  # through the origin instead
        slope, fixed = sum(b * w for b, w in points) / sum(b * b for b, _ in points), 0.0
    shown = ", ".join(str(b) for b in sorted(batches))
    return Workspace(max(0, round(fixed)), max(0, round(slope)), f"{n} probes (batches {shown}): least squares")


def predict(budget: int, reserve: int, kv_per_seq: int, workspace: Workspace, max_batch: int) -> dict:
    """The largest batch predicted to fit, and its parts: (budget - reserve - fixed workspace) over (K,V +
    workspace) per sequence; `kv_only_max_batch` ignores the workspace (the bound a K,V saving alone would give)."""
    available = budget - reserve - workspace.fixed
    per_seq = kv_per_seq + workspace.per_seq
    batch = max(0, min(max_batch, available // per_seq)) if per_seq > 0 else max_batch
    kv_only = max(0, min(max_batch, (budget - reserve) // kv_per_seq)) if kv_per_seq > 0 else max_batch
    return {"max_batch": int(batch), "kv_only_max_batch": int(kv_only), "budget_bytes": budget,
            "reserve_bytes": reserve, "workspace_fixed_bytes": workspace.fixed,
            "workspace_per_seq_bytes": workspace.per_seq, "workspace_source": workspace.source,
            "kv_per_seq_bytes": kv_per_seq, "per_seq_bytes": per_seq, "available_bytes": available}


def tolerance(batch: int, resolution: float) -> int:
    """How close the bracket must close around `batch`: `resolution` of it, and never below one sequence."""
    return max(1, int(resolution * batch))


def search(fits, start: int, max_batch: int, resolution: float, max_trials: int,
           known: list[Trial] = ()) -> tuple[int, int | None, list[Trial]]:
    """The largest batch in [1, max_batch] for which `fits(batch) -> Trial` says yes, assuming that a batch that
    does not fit has no larger one that fits. Starts at `start` (the prediction), steps up while every trial fits (or
    down while none does) by a step that starts at twice the tolerance and doubles, then bisects until the bracket is
    within `tolerance`, in at most `max_trials` calls. `known`: trials already made (the workspace probes): they bound
    the bracket, but the steps stay near the prediction rather than bisecting at once between a small probe and it (the
    first H200 run, predicted 96, tried 52 next and needed 7 more trials to climb back to 81).

    Returns (lo, hi, trials): lo the largest batch seen to fit (0: none), hi the smallest seen not to (None: none
    up to max_batch), the calls made. Resolved when hi is None and lo == max_batch, or hi - lo <= tolerance."""
    lo, hi = 0, max_batch + 1  # hi beyond the cap: nothing yet seen not to fit
    for trial in known:
        lo, hi = (max(lo, trial.batch), hi) if trial.fits else (lo, min(hi, trial.batch))
    trials, step = [], 2 * tolerance(start, resolution)
    candidate = min(max(start, lo + 1, 1), hi - 1, max_batch)
    while len(trials) < max_trials and hi - lo > tolerance(lo, resolution):
        trial = fits(candidate)
        trials.append(trial)
        lo, hi = (candidate, hi) if trial.fits else (lo, candidate)
        fitted, failed = any(t.fits for t in trials), not all(t.fits for t in trials)
        if not failed:  # climbing
            candidate, step = min(max_batch, lo + step), 2 * step
        elif not fitted:  # descending
            candidate, step = hi - step, 2 * step
        if (fitted and failed) or not lo < candidate < hi:  # bracketed, or the step left the bracket: bisect
            candidate = (lo + hi) // 2
    return lo, (None if hi > max_batch else hi), trials


def resolved(lo: int, hi: int | None, max_batch: int, resolution: float) -> bool:
    return lo == max_batch if hi is None else hi - lo <= tolerance(lo, resolution)
