"""The method contract holds: a method defined entirely in this file (its own attention, mask and cache layer that
really evicts) runs through eval, the bench and the report, and no other file names it.

The method is StreamingLLM's cache (Xiao et al., 2023: attention sinks plus a window of recent tokens): token q
sees the first `sinks` tokens and the `window` most recent ones, itself included. Its cache deletes every other K
and V as soon as no later token can see it, and its mask gives a full forward exactly what the evicting cache gives
token-by-token decoding. docs/adding_a_method.md walks through it.
"""

from dataclasses import dataclass

import torch
from omegaconf import OmegaConf, open_dict
from transformers.cache_utils import DynamicLayer

from chai.attention import AttnShape, dense, kv_bytes
from chai.cli import run_mode
from chai.methods import Method, build_method, register
from chai.records import read_jsonl
from chai.report import build
from tests.conftest import random_ids
from tests.helpers import compose_cfg

SETTINGS = {"name": "sink_window", "sinks": 2, "window": 6}


class SinkWindowLayer(DynamicLayer):
    """Keeps K,V of positions < sinks and of the window - 1 latest positions (the next token adds itself).
    keys/values [B, Hkv, kept, D]; positions [kept], the original positions of what is kept."""

    def __init__(self, sinks: int, window: int):
        super().__init__()
        self.sinks, self.window, self.seen = sinks, window, 0
        self.positions = torch.zeros(0, dtype=torch.long)

    def update(self, key_states, value_states, *args, **kwargs):
        new = torch.arange(self.seen, self.seen + key_states.shape[2])
        keys, values = super().update(key_states, value_states, *args, **kwargs)  # kept + new: this forward's keys
        positions = torch.cat([self.positions, new])
        self.seen += key_states.shape[2]
        keep = ((positions < self.sinks) | (positions > self.seen - self.window)).to(keys.device)
        self.keys, self.values, self.positions = keys[:, :, keep], values[:, :, keep], positions[keep.cpu()]
        return keys, values

    def get_seq_length(self) -> int:  # positions advance by the tokens seen, not by the tokens kept
        return self.seen

    def get_mask_sizes(self, query_length, *args) -> tuple[int, int]:
        return len(self.positions) + query_length, 0


@register
@dataclass
class SinkWindow(Method):
    """Attention sinks plus a window of recent tokens, with a cache that evicts the rest."""

    name = "sink_window"
    label, order, color = "Sinks + window", 90, "black"
    sinks: int = 2
    window: int = 6

    def __post_init__(self):
        self.cache = None  # the cache in use: its kept positions say what a mask's key columns are

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        return dense(module, query, key, value, attention_mask, scaling, dropout, **kwargs)

    def mask_function(self):
        def mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, device="cpu", **_):
            q_pos = torch.arange(q_offset, q_offset + q_length, device=device)
            kept = kv_length - q_length  # columns before this forward's own keys: what the cache kept
            past = self.cache.layers[0].positions if kept else torch.zeros(0, dtype=torch.long)
            kv_pos = torch.cat([past.to(device), q_pos])
            q, kv = q_pos[:, None], kv_pos[None]
            allowed = (kv <= q) & ((kv < self.sinks) | (q - kv < self.window))
            return allowed[None, None].expand(batch_size, 1, q_length, kv_length)
        return mask

    def cache_layer(self, layer_idx, config):
        return SinkWindowLayer(self.sinks, self.window)

    def make_cache(self, model):
        self.cache = super().make_cache(model)
        return self.cache

    def kv_bytes(self, config, batch, tokens, dtype_bytes):
        per_token = AttnShape.of(config).dense_kv_bytes_per_token(dtype_bytes)
        kept = min(tokens, self.sinks + self.window - 1)
        return {name: batch * kept * value for name, value in per_token.items()}

    @classmethod
    def variant(cls, settings):
        return f"{settings['sinks']}+{settings['window']}"


def method():
    return build_method(dict(SETTINGS))


def test_scoring_with_the_mask_equals_decoding_with_the_evicting_cache(tiny_llama):
    model, _ = tiny_llama
    ids, m = random_ids(1, 16), method()
    with torch.no_grad(), m.applied(model):
        scored = model(ids, use_cache=False).logits  # one forward, the mask hides what the cache would evict
        cache = m.make_cache(model)
        steps = [model(ids[:, :4], past_key_values=cache).logits]  # a 4-token prompt, then one token at a time
        steps += [model(ids[:, t:t + 1], past_key_values=cache).logits for t in range(4, 16)]
    assert torch.allclose(scored, torch.cat(steps, dim=1), atol=1e-5, rtol=1e-4)
    assert cache.layers[0].positions.tolist() == [0, 1, 11, 12, 13, 14, 15]  # sinks 0, 1; the 5 latest
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, scored, atol=1e-3)  # the window really changed the result


def test_bytes_held_equal_the_analytic_count(tiny_llama):
    model, _ = tiny_llama
    m = method()
    for tokens in (3, 7, 20):
        cache = m.make_cache(model)
        with torch.no_grad(), m.applied(model):
            model(random_ids(2, tokens), past_key_values=cache)
        expected = m.kv_bytes(model.config, 2, tokens, 4)
        assert kv_bytes(cache) == expected, tokens


def with_method(cfg):
    with open_dict(cfg):
        cfg.method = OmegaConf.create(dict(SETTINGS))
    return cfg


def test_eval_bench_and_report_run_a_method_no_other_file_names(tmp_path, piqa_rows):
    common = [f"results_dir={tmp_path}", "logger.wandb.mode=disabled", "device=cpu", "model=tiny_llama"]
    records = []
    for ours in (False, True):
        cfg = compose_cfg([*common, "experiment_name=accuracy", "task.limit=4"])
        records.append(run_mode(with_method(cfg) if ours else cfg, overrides=[]))
        assert records[-1]["n_examples"] == 4 and not records[-1].get("error")
    record_mha, ours = records
    assert ours["display"]["label"] == "Sinks + window 2+6"
    assert ours["kv_bytes_per_token"]["measured"] == ours["kv_bytes_per_token"]["analytic"]  # evicted: < MHA's
    assert ours["kv_bytes_per_token"]["measured"]["total"] < record_mha["kv_bytes_per_token"]["measured"]["total"]
    bench = compose_cfg([*common, "mode=bench", "experiment_name=bench", "bench.batch_sizes=[1]",
                         "bench.seq_lens=[12]", "bench.new_tokens=3", "bench.bandwidth_bytes=1048576",
                         "bench.warmup=0", "bench.paths=[sdpa,method]"])
    run_mode(with_method(bench), overrides=[])
    cells = [r for r in read_jsonl(tmp_path / "bench" / "runs.jsonl") if r.get("kind") == "bench_cell"]
    mine = next(c for c in cells if c["bench"]["path"] == "method")
    assert not mine["error"] and mine["bench"]["kv_bytes"]["measured_cache"] == mine["bench"]["kv_bytes"]["analytic"]
    report = build(tmp_path, tmp_path / "figures", tmp_path / "tables")
    assert not report.get("failed"), report.get("failed")
    cells = (tmp_path / "tables" / "accuracy_cells.csv").read_text()  # every cell, labelled from its record
    assert "Sinks + window 2+6" in cells and ",MHA," in cells
    assert "Sinks + window 2+6" in (tmp_path / "bench" / "bench_table.md").read_text()
