"""mode=bench on the CPU: one well-formed record per cell, analytic K,V bytes equal to the bytes the cache holds,
a failed or out-of-memory cell recorded while the grid goes on, resume per cell, and a method's own paths (here a
stand-in for CHAI: K stored for cluster representatives only) timed against every baseline."""

import json
from dataclasses import dataclass

import pytest
import torch
from omegaconf import OmegaConf, open_dict
from transformers.cache_utils import DynamicLayer

from chai import bench
from chai.attention import kv_bytes, to_output
from chai.cli import run_mode
from chai.errors import ChaiError
from chai.kernels.clustered_decode import clustered_attention_reference
from chai.methods import Method, build_method, register
from chai.methods.base import RunStats
from chai.records import read_jsonl, run_key
from chai.roofline import kv_cache_bytes
from chai.runners import bench as bench_runner
from chai.runners import bench_cells, bench_measure
from tests.helpers import compose_cfg, kept_k_bytes, kept_k_static_cache

LABELS = [0, 0, 1, 1, 2, 2, 2, 0]  # tiny_llama has 8 heads: 3 clusters
REPS = [1, 2, 6]
CELL_FIELDS = {"batch", "seq_len", "new_tokens", "path", "dtype", "ttft_ms", "clustering_ms", "ttnt_ms", "prefill",
               "kv_bytes", "roofline", "speedup_vs", "roofline_predicted_speedup_vs_mha", "oom", "error"}
STATS = {"median", "p10", "p90", "n"}


class RepKLayer(DynamicLayer):
    """Stores K for the representative heads only, V for every head."""

    def update(self, key_states, value_states, *args, **kwargs):
        return super().update(key_states[:, REPS], value_states, *args, **kwargs)


@register
@dataclass
class StandInClustered(Method):
    """CHAI's decode math with a fixed clustering, for testing the bench's method paths."""

    name = "standin_clustered"

    def __post_init__(self):
        self.clustering_s = 0.0  # cumulative, as CHAI reports it

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if query.shape[2] > 1 and module.layer_idx == 0:  # "clusters" once per prefill
            self.clustering_s += 0.0005
        labels = torch.tensor(LABELS, device=query.device).expand(query.shape[0], -1)
        reps = torch.tensor(REPS, device=query.device).expand(query.shape[0], -1)
        return to_output(clustered_attention_reference(query, key, value, labels, reps, scaling, attention_mask)), None

    def cache_layer(self, layer_idx, config):
        return RepKLayer()

    def static_cache(self, model, batch_size, max_cache_len):
        return kept_k_static_cache(model, max_cache_len, REPS)

    def kv_bytes(self, config, batch, tokens, dtype_bytes):
        return kept_k_bytes(config, batch, tokens, dtype_bytes, len(REPS))

    def run_stats(self):
        return RunStats(clustering_s=self.clustering_s)


def bench_cfg(tmp_path, *overrides, method=None):
    cfg = compose_cfg([
        f"results_dir={tmp_path}", "logger.wandb.mode=disabled", "device=cpu", "mode=bench", "model=tiny_llama",
        "experiment_name=bench", "bench.batch_sizes=[1]", "bench.seq_lens=[8,12]", "bench.new_tokens=3",
        "bench.bandwidth_bytes=1048576", "bench.warmup=0", *overrides,
    ])
    if method:
        with open_dict(cfg):
            cfg.method = OmegaConf.create({"name": method})
    return cfg


def cells(tmp_path) -> list[dict]:
    return [r for r in read_jsonl(tmp_path / "bench" / "runs.jsonl") if r.get("kind") == "bench_cell"]


def eager_capture(fn, warmup):
    """CPU stand-in for a CUDA graph: the warm-up runs, capture records nothing, a replay runs `fn`."""
    for _ in range(warmup):
        fn()
    return fn


def test_one_wellformed_record_per_cell(tmp_path):
    run = run_mode(bench_cfg(tmp_path, "bench.warmup=1"), overrides=[])
    records = cells(tmp_path)
    assert run["kind"] == "bench_run" and run["bench_summary"]["measured"] == 6 == len(records)
    assert run["bench_summary"]["paths"] == ["eager", "sdpa", "static_compiled"]
    read = run["bench_summary"]["weight_read"]  # every linear layer, the (tied) LM head included, fp32
    assert read["weight_read_bytes"] == 4 * (3 * (4 * 64 * 64 + 3 * 64 * 128) + 49152 * 64)
    assert read["linear_layers"] == 3 * 7 + 1
    assert read["weight_read_GBps"] > 0 and run["bench_summary"]["matmul"]["tflops"] > 0
    assert {(r["bench"]["seq_len"], r["bench"]["path"]) for r in records} == {
        (s, p) for s in (8, 12) for p in ("eager", "sdpa", "static_compiled")}
    for rec in records:
        b = rec["bench"]
        assert rec["method"] == "mha" and rec["error"] is None and not rec["oom"]
        assert CELL_FIELDS <= set(b) and all(set(b[k]) == STATS for k in ("ttft_ms", "ttnt_ms"))
        assert b["ttnt_ms"]["n"] == 2 * 3 and b["ttft_ms"]["n"] == 2 and b["ttnt_ms"]["median"] > 0
        assert set(b["speedup_vs"]) == {"mha_eager", "mha_sdpa", "mha_static_compiled"}
        assert set(b["kv_bytes"]) >= {"analytic", "measured_cache", "allocator_delta", "allocator_peak"}
        assert b["kv_bytes"]["analytic"] == b["kv_bytes"]["measured_cache"] == b["kv_bytes"]["dense_analytic"]
        roof = b["roofline"]
        assert roof["bytes_per_step"] == roof["weight_bytes"] + roof["kv_bytes_read_per_step"]
        assert roof["fraction_of_roofline"] > 0 and b["roofline_predicted_speedup_vs_mha"] == 1.0
        weights_ms = roof["weight_bytes"] / (read["weight_read_GBps"] * 1e6)
        kv_ms = roof["kv_bytes_read_per_step"] / (roof["bandwidth_GBps"] * 1e6)
        assert roof["time_at_weight_read_ms"] == pytest.approx(weights_ms + kv_ms)
        assert b["speedup_vs"][f"mha_{b['path']}"] == 1.0
        assert b["clustering_ms"]["median"] == 0 and b["clustering_fraction_of_ttft"] == 0  # MHA never clusters
        pre = b["prefill"]  # tiny_llama's FLOP from its shapes (conf/model/tiny_llama.yaml), batch 1
        params = 3 * (4 * 64 * 64 + 3 * 64 * 128)  # 3 layers x (q, k, v, o 64x64; gate, up, down 64x128)
        assert pre["flops"]["linear"] == 2 * params * b["seq_len"]
        assert pre["flops"]["attention"] == 2 * 3 * 8 * b["seq_len"] ** 2 * 8  # layers, heads, T^2, head_dim
        assert pre["flops"]["lm_head"] == 2 * 49152 * 64  # the last position only (tied to the embedding)
        assert pre["time_at_matmul_rate_ms"] > pre["compute_floor_ms"] > 0 < pre["fraction_of_matmul_rate"] < 1
        assert rec["display"] == run["display"] == {"label": "MHA", "family": "MHA", "order": 0, "color": "tab:red"}
        assert rec["run_stats"]["clustering_calls"] == 0 and rec["results_path"] == run["results_path"]


def test_analytic_kv_bytes_equal_the_cache_for_mha_dynamic_and_static(tiny_llama):
    model, _ = tiny_llama
    cfg = bench_cfg("/tmp/unused")
    mha = build_method(OmegaConf.create({"name": "mha"}))
    ids = torch.randint(0, 1000, (2, 10))
    for name, static in (("sdpa", False), ("static_compiled", True)):
        path = bench_measure.BenchPath(name, mha, {"name": "mha"}, "sdpa", static)
        with torch.no_grad():
            result = bench_measure.measure(path, model, ids, cfg.bench, torch.device("cpu"))
        tokens = 10 + 3 if static else 10
        kv = kv_cache_bytes(mha, model, 2, tokens, result["kv_measured"])
        per_token = 3 * 8 * 8 * 4  # layers x heads x head_dim x float32 bytes, for K and for V alike
        assert kv["analytic"] == kv["measured_cache"] == 2 * tokens * 2 * per_token


def test_out_of_memory_is_recorded_and_the_grid_goes_on(tmp_path, monkeypatch):
    real = bench_measure.measure

    def measure(path, model, ids, bcfg, device):
        if path.name == "sdpa" and ids.shape[1] == 12:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
        return real(path, model, ids, bcfg, device)

    monkeypatch.setattr(bench_measure, "measure", measure)
    run = run_mode(bench_cfg(tmp_path, "bench.paths=[eager,sdpa]"), overrides=[])
    assert run["bench_summary"]["oom"] == 1 and run["bench_summary"]["measured"] == 4
    oom = [r for r in cells(tmp_path) if r["oom"]]
    assert len(oom) == 1 and oom[0]["bench"]["path"] == "sdpa" and "OutOfMemoryError" in oom[0]["error"]
    assert oom[0]["bench"]["ttnt_ms"]["median"] is None and oom[0]["bench"]["kv_bytes"]["analytic"] > 0
    others = [r for r in cells(tmp_path) if r["bench"]["seq_len"] == 12 and not r["oom"]]
    assert len(others) == 1 and others[0]["bench"]["speedup_vs"]["mha_sdpa"] is None
    # A larger grid later: every recorded cell (the out-of-memory one too) is reused, only the new one is measured.
    monkeypatch.setattr(bench_measure, "measure", real)
    again = run_mode(bench_cfg(tmp_path, "bench.seq_lens=[8,12,16]", "bench.paths=[sdpa]"), overrides=[])
    assert again["bench_summary"]["reused"] == 2 and again["bench_summary"]["measured"] == 1


def test_a_failing_cell_is_recorded(tmp_path, monkeypatch):
    def broken(self, model, batch_size, max_cache_len):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(type(build_method(OmegaConf.create({"name": "mha"}))), "static_cache", broken)
    run_mode(bench_cfg(tmp_path, "bench.seq_lens=[8]", "bench.paths=[sdpa,static_compiled]"), overrides=[])
    by_path = {r["bench"]["path"]: r for r in cells(tmp_path)}
    assert "stream is capturing" in by_path["static_compiled"]["error"] and not by_path["static_compiled"]["oom"]
    assert by_path["sdpa"]["error"] is None


def test_a_time_below_its_floor_is_refused():
    """A TTFT faster than the prefill's weight FLOP at the measured matmul rate, or a step faster than its bytes at
    the copy bandwidth, is not a measurement: `below_floor` says which and why; times at the floor pass."""
    stats = lambda ms: {"median": ms, "p10": ms, "p90": ms, "n": 3}  # noqa: E731
    bench = {"ttft_ms": stats(100.0), "ttnt_ms": stats(5.0), "bandwidth": {"bandwidth_GBps": 4000.0},
             "prefill": {"compute_floor_ms": 100.0, "matmul": {"tflops": 700.0}}, "roofline": {"time_ms": 5.0}}
    assert bench_cells.below_floor(bench) is None
    bench["ttft_ms"] = stats(60.0)  # e.g. a prefill minus a host-timed part
    assert bench_cells.below_floor(bench).startswith("TTFT p10 60.000 ms is below its floor 100.000 ms")
    bench["ttft_ms"], bench["ttnt_ms"] = stats(99.0), stats(4.0)  # within 5%: noise; a step 20% under: refused
    assert "TTNT p10 4.000 ms" in bench_cells.below_floor(bench) and "4000 GB/s" in bench_cells.below_floor(bench)


def test_method_paths_are_timed_against_every_baseline(tmp_path, monkeypatch):
    """Static paths as on a GPU (a captured step; the stand-in graph replays eagerly on the CPU)."""
    monkeypatch.setattr(bench, "capture_graph", eager_capture)
    monkeypatch.setattr(bench, "static_step_kind", lambda bcfg, device: "cudagraph")
    run = run_mode(bench_cfg(tmp_path, "bench.seq_lens=[8]", method="standin_clustered"), overrides=[])
    assert run["bench_summary"]["paths"] == ["eager", "sdpa", "static_compiled", "method", "method_static"]
    by_path = {r["bench"]["path"]: r for r in cells(tmp_path)}
    assert {r["method"] for p, r in by_path.items() if p.startswith("method")} == {"standin_clustered"}
    for name, comparable in (("method", "mha_sdpa"), ("method_static", "mha_static_compiled")):
        b = by_path[name]["bench"]
        assert by_path[name]["error"] is None and b["comparable_baseline"] == comparable
        assert b["step"] == ("cudagraph" if name == "method_static" else "eager")
        assert all(v is not None and v > 0 for v in b["speedup_vs"].values())
        assert b["clustering_ms"]["median"] == pytest.approx(0.5)  # what the method reports, not a subtraction
        kv = b["kv_bytes"]
        assert kv["analytic"] == kv["measured_cache"] and kv["saved_analytic"] == kv["saved_measured"] > 0
        assert b["roofline_predicted_speedup_vs_mha"] > 1.0
        assert by_path[name]["display"]["label"] == "standin_clustered"  # no label of its own: its name
        assert by_path[name]["run_stats"]["clustering_s"] > 0
        assert b["fraction_of_predicted_speedup"] == pytest.approx(
            b["speedup_vs_fastest_mha"] / b["roofline_predicted_speedup_vs_mha"])


def test_a_method_run_alone_is_compared_with_the_baselines_recorded_before(tmp_path):
    """The baselines first, then the method's path in a run of its own (e.g. a path added later): its record's
    speedups are against the recorded baseline cells, whose records stay as they were."""
    run_mode(bench_cfg(tmp_path, "bench.seq_lens=[8]", "bench.paths=[sdpa,recompute]"), overrides=[])
    before = {r["bench"]["path"]: r for r in cells(tmp_path)}
    run_mode(bench_cfg(tmp_path, "bench.seq_lens=[8]", "bench.paths=[method]", method="standin_clustered"),
             overrides=[])
    after = cells(tmp_path)
    assert [r["bench"]["path"] for r in after] == ["sdpa", "recompute", "method"]
    assert after[:2] == list(before.values())  # the recorded baselines are not rewritten
    b, ttnt = after[2]["bench"], {p: r["bench"]["ttnt_ms"]["median"] for p, r in before.items()}
    assert b["speedup_vs"]["mha_sdpa"] == pytest.approx(ttnt["sdpa"] / b["ttnt_ms"]["median"])
    assert b["speedup_vs_comparable"] == b["speedup_vs"]["mha_sdpa"] and b["fastest_mha_path"] == "mha_sdpa"
    assert b["vs_recompute"]["ttnt_speedup"] == pytest.approx(ttnt["recompute"] / b["ttnt_ms"]["median"])


@pytest.mark.parametrize("kind", ["compile", "cudagraph"])
@pytest.mark.parametrize("method", ["mha", "standin_clustered"])
def test_static_step_decodes_like_the_dynamic_cache(tiny_llama, method, kind, monkeypatch):
    """The static path's step traces with fullgraph=True (no graph break, no host sync: what a CUDA graph capture
    needs too), and the captured step's buffers advance as the decode loop expects: both decode the tokens of the
    dynamic cache. On the CPU the graph is a stand-in that replays eagerly."""
    monkeypatch.setattr(bench, "capture_graph", eager_capture)
    model, _ = tiny_llama
    runner = build_method(OmegaConf.create({"name": method}))
    cfg = bench_cfg("/tmp/unused", "bench.compile_backend=eager", "bench.new_tokens=4")
    ids = torch.randint(0, 1000, (2, 7))

    def decode(cache, step_kind):
        token = bench.prefill(model, ids, cache)
        position = torch.full_like(token, 7)
        step = bench.make_step(step_kind, model, cache, token, position, cfg.bench)
        if step_kind != "eager":  # capture / compilation ran real steps: start again, as `measure` does
            cache.reset()
            token = bench.prefill(model, ids, cache)
        tokens = [token]
        for _ in range(4):
            token, position = step(token, position)
            tokens.append(token.clone())
        return torch.cat(tokens, 1), kv_bytes(cache)

    with torch.no_grad(), runner.applied(model):
        dynamic, _ = decode(runner.make_cache(model), "eager")
        static, held = decode(runner.static_cache(model, 2, 11), kind)
    assert torch.equal(dynamic, static)
    per_token = runner.kv_bytes_per_token(model.config, 4)
    assert held["k"] == 2 * 11 * per_token["k"] and held["v"] == 2 * 11 * per_token["v"]


def test_bad_bench_settings_fail_before_loading(tmp_path):
    with pytest.raises(ChaiError, match="Did you mean 'sdpa'"):
        bench_runner.check(bench_cfg(tmp_path, "bench.paths=[sdpq]").bench)
    with pytest.raises(ChaiError, match="repeats"):
        bench_runner.check(bench_cfg(tmp_path, "bench.repeats=0").bench)


def test_roofline_arithmetic():
    from transformers import AutoModelForCausalLM, LlamaConfig

    from chai.roofline import copy_bandwidth, percentiles, roofline, weight_bytes_per_step

    assert percentiles([4.0, 1.0, 3.0, 2.0]) == {"median": 2.5, "p10": pytest.approx(1.3), "p90": pytest.approx(3.7),
                                                 "n": 4}
    step = roofline(1000.0, 10**9, {"k": 8 * 10**6, "v": 8 * 10**6})  # 1 TB/s, 1 GB of weights, 16 MB of K,V
    assert step["bytes_per_step"] == 10**9 + 16 * 10**6 and step["time_ms"] == pytest.approx(1.016)
    assert step["kv_fraction_of_bytes"] == pytest.approx(16 / 1016)
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=100, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config)
    everything = sum(p.numel() * p.element_size() for p in model.parameters())
    assert weight_bytes_per_step(model) == everything - 100 * 16 * 4  # a step gathers B rows of the embedding
    assert copy_bandwidth(torch.device("cpu"), 1 << 20, repeats=2)["bandwidth_GBps"] > 0


def test_chai_without_an_artifact_calibrates_first_as_eval_does(tmp_path, capsys):
    """No results/calibration/tiny_llama.json: the bench loads the tokenizer and CHAI makes the artifact, instead of
    failing with "no tokenizer" (the summary then shows the cells' own figures)."""
    from chai.calibration import artifact_path
    from chai.paths import data_dir

    if not (data_dir() / "c4" / "c4_validation_2k.jsonl").exists():
        pytest.skip("no C4 calibration file in the data directory")
    cfg = bench_cfg(tmp_path, "method=chai", "bench.paths=[sdpa,method]", "bench.seq_lens=[8]", "bench.repeats=1",
                    "calibration.n_docs=4", "calibration.seq_len=24", "calibration.feature_tokens=8")
    path = artifact_path(str(tmp_path), "tiny_llama")
    assert not path.exists()
    run = run_mode(cfg, overrides=[])
    from chai import cluster_counts
    from chai.attention import AttnShape

    artifact = json.loads(path.read_text())
    shape = AttnShape(**{k: artifact["shape"][k] for k in ("layers", "heads", "kv_heads", "head_dim")})
    chosen, _ = cluster_counts.choose(artifact, shape, "budget", budget=0.1)  # CHAI's default rule
    shown = run["method_info"]["clusters_per_layer"]
    assert shown == ["dense" if c == shape.heads else c for c in chosen] and len(chosen) == 3
    assert run["bench_summary"]["measured"] == 2 and run["bench_summary"]["errors"] == 0
    out = capsys.readouterr().out
    assert "nan" not in out.lower() and "None" not in out
    assert [line.split()[:4] for line in out.splitlines() if line.startswith(("sdpa ", "method "))] == [
        ["sdpa", "1", "x", "8"], ["method", "1", "x", "8"]]


def test_a_cell_names_the_allocator_settings_only_when_the_environment_sets_them(monkeypatch):
    """Expandable segments change what fits (the LLaMA-33B cell ran out of memory with 17 GiB reserved but
    unallocated): a cell measured under them is another cell; cells under PyTorch's defaults keep their keys."""
    mha = build_method(OmegaConf.create({"name": "mha"}))
    path = bench_measure.BenchPath("static_compiled", mha, {"name": "mha"}, "sdpa", True)
    config = {"method": {"name": "mha"}, "bench": {"batch_sizes": [1], "seq_lens": [8], "paths": ["sdpa"]}}
    for name in bench_cells.ALLOC_ENV:
        monkeypatch.delenv(name, raising=False)
    plain = bench_cells.cell_config(config, path, 1, 8, "cpu", "eager")
    assert "allocator_env" not in plain["bench"]
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    expandable = bench_cells.cell_config(config, path, 1, 8, "cpu", "eager")
    assert expandable["bench"]["allocator_env"] == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    assert run_key(expandable) != run_key(plain)
