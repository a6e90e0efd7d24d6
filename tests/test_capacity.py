"""mode=capacity on the CPU: the search finds exactly the largest batch a memory budget allows (checked against bytes
counted here from the model's shape), a method that stores fewer K heads fits more sequences than MHA under the same
budget, out of memory means too large (in a trial and in the measurement at the largest batch), cells are recorded
and resumed, bad settings fail in one line before any model loads, and the report draws its table and figure."""

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf, open_dict

from chai.attention import to_output
from chai.cli import run_mode
from chai.errors import ChaiError
from chai.methods import Method, build_method, register
from chai.preflight import preflight
from chai.records import read_jsonl, run_key
from chai.report.capacity_table import capacity_frame, write_capacity_table
from chai.report.figures_capacity import capacity_figures
from chai import bench
from chai.runners import bench_measure, capacity, capacity_measure
from chai.runners.capacity_search import Trial, fit_workspace, search
from tests.helpers import assert_one_line_error, compose_cfg, kept_k_bytes, kept_k_static_cache

KEPT = [0, 3, 6]  # heads whose K the stand-in stores
SHARED = [0, 0, 0, 1, 1, 1, 2, 2]  # query head -> the stored K it scores with
BUDGET, FIXED, PER_SEQ, RESERVE = 1_000_000, 20_000, 1_000, 10_000
SEQ_LENS, NEW = (16, 32), 4
# PyTorch's whole out-of-memory message, as the first H200 run raised it (the figures after "Including" were cut off)
OOM_MESSAGE = ("CUDA out of memory. Tried to allocate 3.44 GiB. GPU 0 has a total capacity of 139.80 GiB of which "
               "2.56 GiB is free. Including non-PyTorch memory, this process has 137.23 GiB memory in use. Of the "
               "allocated memory 107.31 GiB is allocated by PyTorch, and 17.92 GiB is reserved by PyTorch but "
               "unallocated. If reserved but unallocated memory is large try setting "
               "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.")


@register
@dataclass
class FewerK(Method):
    """A CHAI-like cache for the capacity tests: 3 of tiny_llama's 8 K heads stored, each shared by a group."""

    name = "capacity_fewer_k"

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        shared = key[:, SHARED]  # [B, 3, T, D] -> [B, 8, T, D]
        return to_output(F.scaled_dot_product_attention(query, shared, value, attn_mask=attention_mask,
                                                        scale=scaling)), None

    def static_cache(self, model, batch_size, max_cache_len):
        return kept_k_static_cache(model, max_cache_len, KEPT)

    def kv_bytes(self, config, batch, tokens, dtype_bytes):
        return kept_k_bytes(config, batch, tokens, dtype_bytes, len(KEPT))


def capacity_cfg(results, *overrides, method=None):
    cfg = compose_cfg([
        f"results_dir={results}", "logger.wandb.mode=disabled", "device=cpu", "mode=capacity", "model=tiny_llama",
        "experiment_name=capacity", f"capacity.seq_lens=[{SEQ_LENS[0]},{SEQ_LENS[1]}]", f"capacity.new_tokens={NEW}",
        f"capacity.memory_bytes={BUDGET}", f"capacity.workspace_bytes={FIXED}",
        f"capacity.workspace_per_seq_bytes={PER_SEQ}", f"capacity.reserve_bytes={RESERVE}", "capacity.resolution=0",
        "capacity.warmup=0", "bench.bandwidth_bytes=1048576", *overrides,
    ])
    if method:
        with open_dict(cfg):
            cfg.method = OmegaConf.create({"name": method})
    return cfg


def largest_batch(k_heads: int, seq_len: int) -> int:
    """Counted here from tiny_llama's shape (3 layers, 8 heads of 8 float32 values): the largest batch whose K,V,
    workspace and reserve stay within the budget."""
    per_seq = (seq_len + NEW) * 3 * (k_heads + 8) * 8 * 4 + PER_SEQ
    batch = 0
    while (batch + 1) * per_seq + FIXED + RESERVE <= BUDGET:
        batch += 1
    return batch


def cells(results) -> list[dict]:
    return [r for r in read_jsonl(results / "capacity" / "runs.jsonl") if r.get("kind") == "capacity_cell"]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """One capacity run of the stand-in (its static path and MHA's) on tiny_llama: (results dir, run record)."""
    results = tmp_path_factory.mktemp("capacity")
    return results, run_mode(capacity_cfg(results, method="capacity_fewer_k"), overrides=[])


def test_search_finds_the_largest_batch_from_any_start():
    for truth in (1, 37, 500):
        for start in (1, 10, truth, 3 * truth):
            judge = lambda b: Trial(b, b <= truth, "stand-in")  # noqa: E731
            lo, hi, trials = search(judge, start, 4096, 0.0, 30)
            assert (lo, hi) == (truth, truth + 1) and len(trials) <= 20, (truth, start)
            lo, hi, _ = search(judge, start, 4096, 0.05, 30)
            assert lo <= truth < hi and hi - lo <= max(1, int(0.05 * lo))
    assert search(lambda b: Trial(b, False, ""), 50, 4096, 0.0, 30)[:2] == (0, 1)  # nothing fits
    assert search(lambda b: Trial(b, True, ""), 50, 64, 0.0, 30)[:2] == (64, None)  # the cap fits
    lo, hi, trials = search(lambda b: Trial(b, b <= 300, ""), 10, 4096, 0.0, 3)
    assert len(trials) == 3 and lo < 300 and hi is None  # out of trials: what was learned so far


def test_the_search_stays_near_a_prediction_that_errs_high():
    """A probe at 8 fits, the prediction (96) errs a few percent high: the search steps down from the prediction
    instead of bisecting between the probe and it (the first H200 run tried 52 next), and closes within 5 trials."""
    for truth in range(84, 97):
        judge = lambda b: Trial(b, b <= truth, "stand-in")  # noqa: E731
        lo, hi, trials = search(judge, 96, 4096, 0.03, 12, known=[Trial(8, True, "probe")])
        assert lo <= truth < hi and hi - lo <= 2 and len(trials) <= 5, (truth, [t.batch for t in trials])
        assert min(t.batch for t in trials) >= 80, (truth, [t.batch for t in trials])


def test_workspace_model_from_probes():
    assert fit_workspace([(1, 500)]).at(8) == 4000  # one probe: proportional to the batch
    two = fit_workspace([(1, 1300), (8, 6900)])  # 500 + 800 per sequence
    assert (two.fixed, two.per_seq) == (500, 800)
    flat = fit_workspace([(1, 1000), (4, 900)])
    assert (flat.fixed, flat.per_seq) == (950, 0)
    # On a GPU each probe runs the cell: its allocator peak less the K,V its cache held is the workspace.
    probe = lambda b: Trial(b, True, "probe", peak_bytes=10_000 * b + 500 + 300 * b, kv_bytes=10_000 * b)  # noqa: E731
    measured = capacity.measure_workspace(capacity_cfg("/tmp/unused", "capacity.workspace_bytes=null",
                                                       "capacity.workspace_per_seq_bytes=null").capacity,
                                          torch.device("cuda"), probe)
    assert (measured.fixed, measured.per_seq) == (500, 300) and "2 probes" in measured.source
    # Memory the allocator reserved but could not hand out (fragmentation) counts when it is the larger peak.
    held = lambda b: Trial(b, True, "probe", peak_bytes=10_000 * b + 800 * b, kv_bytes=10_000 * b,  # noqa: E731
                           reserved_bytes=10_000 * b + 1_000 * b)
    measured = capacity.measure_workspace(capacity_cfg("/tmp/unused", "capacity.workspace_bytes=null",
                                                       "capacity.workspace_per_seq_bytes=null").capacity,
                                          torch.device("cuda"), held)
    assert (measured.fixed, measured.per_seq) == (0, 1_000)


def test_the_largest_batch_is_the_budget_s_and_fewer_k_bytes_fit_more(recorded):
    results, run = recorded
    by_cell = {(r["capacity"]["seq_len"], r["capacity"]["path"]): r for r in cells(results)}
    assert run["capacity_summary"]["measured"] == 4 == len(by_cell) and run["capacity_summary"]["errors"] == 0
    for seq_len in SEQ_LENS:
        mha, fewer = by_cell[(seq_len, "static_compiled")], by_cell[(seq_len, "method_static")]
        assert mha["method"] == "mha" and fewer["method"] == "capacity_fewer_k"
        assert mha["capacity"]["measured_max_batch"] == largest_batch(8, seq_len)
        assert fewer["capacity"]["measured_max_batch"] == largest_batch(len(KEPT), seq_len)
        assert fewer["capacity"]["measured_max_batch"] > mha["capacity"]["measured_max_batch"]
        for rec in (mha, fewer):
            c = rec["capacity"]
            assert rec["error"] is None and c["resolved"] and c["predicted_max_batch"] == c["measured_max_batch"]
            assert c["trials"] and all(t["fits"] == (t["batch"] <= c["measured_max_batch"]) for t in c["trials"])
            assert c["kv_bytes"]["analytic"] == c["kv_bytes"]["measured_cache"]  # the cache the batch held
            assert c["kv_bytes"]["tokens"] == seq_len + NEW and c["ttnt_ms"]["n"] == NEW
            assert c["tokens_per_s"] == pytest.approx(c["measured_max_batch"] * 1e3 / c["ttnt_ms"]["median"])
            assert c["e2e_ms"]["median"] >= c["ttft_ms"]["median"] > 0 and c["roofline"]["tokens_per_s"] > 0
            assert c["prediction"]["workspace_per_seq_bytes"] == PER_SEQ and c["budget"]["budget_bytes"] == BUDGET


def test_a_rerun_resumes_without_measuring(recorded, monkeypatch):
    results, _ = recorded

    def never(*args, **kwargs):
        raise AssertionError("a recorded cell was measured again")

    monkeypatch.setattr(capacity, "measure_released", never)
    again = run_mode(capacity_cfg(results, method="capacity_fewer_k"), overrides=[])
    assert again["capacity_summary"]["reused"] == 4 and again["capacity_summary"]["measured"] == 0
    assert len(cells(results)) == 4


def mha_path():
    return bench_measure.BenchPath("static_compiled", build_method({"name": "mha"}), {"name": "mha"}, "sdpa", True)


def test_a_trial_decodes_trial_steps_on_a_cache_for_new_tokens(tiny_llama, monkeypatch):
    """A search trial holds what the bench's cell holds (the cache for seq_len + new_tokens, a prefill, the step) but
    decodes trial_steps steps, not new_tokens; an eager step needs no second prefill, a compiled one does (its graph
    pool is held while the round's prefill runs)."""
    model, _ = tiny_llama
    prefills, real = [], bench.prefill
    monkeypatch.setattr(bench, "prefill", lambda *a: prefills.append(1) or real(*a))
    ids, cfg = torch.randint(0, 1000, (3, 6)), capacity_cfg("/tmp/unused", "bench.compile_backend=eager")
    for step, n_prefills in (("eager", 1), ("compile", 2)):
        prefills.clear()
        bcfg = capacity.bench_settings(cfg, step, 0, 1)
        result = bench_measure.measure_safely(mha_path(), model, ids, bcfg, torch.device("cpu"), "sdpa",
                                              lambda *a: capacity_measure.trial_measure(*a, steps=2))
        assert result["error"] is None and result["step"] == step and len(prefills) == n_prefills
        assert result["decode_steps"] == 2 == result["ttnt_ms"]["n"] and result["cache_tokens"] == 6 + NEW
        analytic = sum(build_method({"name": "mha"}).kv_bytes(model.config, 3, 6 + NEW, 4).values())
        assert result["kv_measured"]["measured_cache"] == analytic  # the cache has room for all new_tokens


def test_out_of_memory_in_a_trial_means_too_large(tiny_llama, monkeypatch):
    """The search on a device: each trial runs the bench cell's setup; a simulated OOM above 13 sequences is caught
    by `measure_safely` and counts as not fitting, its reason keeps PyTorch's figures (reserved but unallocated
    included) without the advice; another failure ends the cell."""
    model, _ = tiny_llama
    real = capacity_measure.trial_measure

    def trial(path, model, ids, bcfg, device, steps):
        if ids.shape[0] > 13:
            raise torch.OutOfMemoryError(OOM_MESSAGE)
        return real(path, model, ids, bcfg, device, steps)

    monkeypatch.setattr(capacity_measure, "trial_measure", trial)
    bcfg = capacity.bench_settings(capacity_cfg("/tmp/unused"), "eager", 0, 1)
    prompts = lambda b: torch.randint(0, 1000, (b, 6))  # noqa: E731
    judge = capacity_measure.DeviceJudge(capacity_measure.trial_runner(mha_path(), model, prompts, bcfg,
                                                                       torch.device("cpu"), "sdpa", 2), None)
    lo, hi, trials = search(judge, 16, 4096, 0.0, 12)
    assert (lo, hi) == (13, 14) and trials[-1].seconds > 0
    assert "17.92 GiB is reserved by PyTorch but unallocated" in trials[0].reason
    assert "out of memory" in trials[0].reason and "try setting" not in trials[0].reason
    monkeypatch.setattr(capacity_measure, "trial_measure", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("broke")))
    with pytest.raises(capacity_measure.CellFailed, match="broke"):
        judge(2)


def test_out_of_memory_at_the_largest_batch_steps_down(tmp_path, monkeypatch):
    """The measurement at the largest batch uses the bench's static step, which may hold more than the search's:
    out of memory there counts as not fitting, and the batch steps down by the tolerance, doubled at each miss.
    The record keeps the searched batch, the measured one, the OOM's figures and the allocator's settings."""
    real = bench_measure.measure
    searched = largest_batch(8, SEQ_LENS[0])
    allowed = searched - 3

    def measure(path, model, ids, bcfg, device):
        if ids.shape[0] > allowed:  # only the final measurement calls measure: the trials set the cell up alone
            raise torch.OutOfMemoryError(OOM_MESSAGE)
        return real(path, model, ids, bcfg, device)

    monkeypatch.setattr(bench_measure, "measure", measure)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    run_mode(capacity_cfg(tmp_path, f"capacity.seq_lens=[{SEQ_LENS[0]}]"), overrides=[])
    (rec,) = cells(tmp_path)
    c = rec["capacity"]
    assert rec["error"] is None and c["searched_max_batch"] == searched and c["measured_max_batch"] == allowed
    assert c["bracket"] == [allowed, searched - 1] and not c["resolved"]  # 1 down, then 2: searched - 3
    final = [t for t in c["trials"] if "largest batch" in t["reason"]]
    assert [t["batch"] for t in final] == [searched, searched - 1]
    assert all("17.92 GiB is reserved" in t["reason"] and t["seconds"] > 0 for t in final)
    assert c["allocator_env"] == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    assert rec["config"]["capacity"]["cell"]["allocator_env"] == c["allocator_env"]  # part of the cell's key


@pytest.mark.parametrize("override, pattern", [
    ("capacity.memory_bytes=null", "capacity.memory_bytes is required on the CPU"),
    ("capacity.paths=[static_compild]", "Did you mean 'static_compiled'"),
    ("capacity.fits_by=device", "needs a CUDA device"),
    ("capacity.resolution=0.7", "capacity.resolution must be in"),
    ("capacity.max_trials=0", "capacity.max_trials must be an integer >= 1"),
    (f"capacity.trial_steps={NEW + 1}", "capacity.trial_steps must be <= capacity.new_tokens"),
    ("capacity.workspace_per_seq_bytes=null", "set both capacity.workspace_bytes"),
    ("capacity.probe_batches=[]", "capacity.probe_batches must be a non-empty list"),
])
def test_bad_settings_fail_in_one_line_before_the_model_loads(tmp_path, monkeypatch, override, pattern):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(capacity, "setup", no_model)
    assert_one_line_error(lambda: run_mode(capacity_cfg(tmp_path, override), overrides=[]), pattern)


def test_capacity_is_a_mode_and_keys_no_other_mode():
    preflight(capacity_cfg("/tmp/unused"))  # no tokenizer needed, the baseline and the method build
    with pytest.raises(ChaiError, match="Did you mean 'capacity'"):
        preflight(compose_cfg(["mode=capacty"]))
    to_dict = lambda *o: OmegaConf.to_container(compose_cfg(["model=tiny_llama", *o]), resolve=True)  # noqa: E731
    plain = to_dict()
    assert run_key(plain) == run_key(to_dict("capacity.max_trials=3"))  # an eval run ignores the capacity group
    assert run_key(plain) == run_key({k: v for k, v in plain.items() if k != "capacity"})  # records before it


def test_the_report_draws_the_table_and_the_figure(recorded, tmp_path):
    results, _ = recorded
    frame = capacity_frame(read_jsonl(results / "capacity" / "runs.jsonl"))
    fewer = frame[frame["path"] == "method_static"]
    assert len(frame) == 4 and (fewer["speedup"] > 0).all() and (fewer["roofline_speedup"] > 1).all()
    (table,), skipped = write_capacity_table(frame, tmp_path)
    text = table.read_text()
    assert not skipped and "| 16 | MHA (static_compiled) |" in text and "capacity_fewer_k (method_static)" in text
    written, skipped = capacity_figures(frame, tmp_path)
    assert not skipped and {p.suffix for p in written} == {".png", ".pdf"}
    empty = capacity_frame([])
    for draw in (write_capacity_table, capacity_figures):
        written, skipped = draw(empty, tmp_path / "none")
        assert written == [] and len(skipped) == 1 and "no capacity records" in skipped[0]
