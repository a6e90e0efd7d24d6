"""The bench on the token methods (issue 16, item 5), on the CPU: the method path holds, after the prompt and at the
end of decoding, exactly the K,V bytes of the tokens the method's rule keeps, counted by hand on the cell's own
prompt; the text prompt is real C4 text, the same every time, with separators and sentence ends at C4's rates; the
recompute path decodes the tokens of a cache and is recorded apart from the baselines, never as the headline."""

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from transformers import DynamicCache

from chai import bench
from chai.attention import AttnShape
from chai.cli import run_mode
from chai.config import compose_model
from chai.errors import ChaiError
from chai.long_context import documents
from chai.methods import RunContext, build_method
from chai.methods.sepcache import separator_ids
from chai.models import load_model
from chai.paths import data_dir
from chai.report.bench_table import render
from chai.runners import bench_cells
from chai.runners.bench_measure import BenchPath
from chai.runners.bench_prompt import Prompts
from tests.helpers import assert_one_line_error
from tests.test_bench import bench_cfg, cells

SEQ, NEW = 48, 3
SEPARATORS = (".", ",", ";", ":", "?", "!", "\n")  # sepcache's defaults
ANCHORS = (".", "?", "!")  # anchor's
needs_c4 = pytest.mark.skipif(not (data_dir() / "c4" / "c4_validation_2k.jsonl").exists(),
                              reason="no C4 file in the data directory")


def text_cfg(tmp_path, *overrides):
    return bench_cfg(tmp_path, "bench.prompt=text", f"bench.seq_lens=[{SEQ}]", "bench.batch_sizes=[2]",
                     f"bench.new_tokens={NEW}", "bench.repeats=1", *overrides)


def kept_by_hand(row: list[int], name: str, marked: set, sinks: int = 4, window: int = 8) -> int:
    """Tokens a request of these ids keeps: SepLLM sinks + separators + the window - 1 latest (StreamingLLM: no
    separators); AnLLM its anchors and every token after the last one."""
    length = len(row)
    if name == "anchor":
        where = [p for p, token in enumerate(row) if token in marked]
        return len(where) + length - 1 - (where[-1] if where else -1)
    return sum(1 for p, token in enumerate(row) if p < sinks or token in marked or p > length - window)


def held_sequence(model, method, ids: torch.Tensor, n: int) -> torch.Tensor:
    """[B, S + n] the tokens the method's cache has seen after the bench's prefill and n decode steps: the prompt
    and the n tokens fed back (greedy, under the method, as the `method` path decodes)."""
    with torch.no_grad(), method.applied(model):
        cache = method.make_cache(model)
        tokens = [bench.prefill(model, ids, cache)]
        for step in range(n - 1):
            position = torch.full_like(tokens[-1], ids.shape[1] + step)
            tokens.append(bench.decode_one_token(model, tokens[-1], position, cache))
    return torch.cat([ids, *tokens], dim=1)


@needs_c4
@pytest.mark.parametrize("name", ["sepcache", "streamingllm", "anchor"])
def test_method_path_holds_the_bytes_of_the_tokens_it_keeps(tmp_path, tiny_llama, name):
    model, tokenizer = tiny_llama
    window = [] if name == "anchor" else ["method.window=8"]
    cfg = text_cfg(tmp_path, f"method={name}", *window, "bench.paths=[sdpa,method]")
    run_mode(cfg, overrides=[])
    cell = next(r for r in cells(tmp_path) if r["bench"]["path"] == "method")
    assert cell["error"] is None and cell["method"] == name
    ids, _ = Prompts(cfg.bench, model, tokenizer, "smollm2").batch(2, SEQ)  # the cell's prompt
    method = build_method(cfg.method)
    method.prepare(model, RunContext(tokenizer=tokenizer))
    marked = {"sepcache": SEPARATORS, "streamingllm": (), "anchor": ANCHORS}[name]
    marked = set(separator_ids(tokenizer, marked).tolist()) if marked else set()
    per_token = sum(AttnShape.of(model.config).dense_kv_bytes_per_token(4).values())  # K and V, float32
    kv, sequence = cell["bench"]["kv_bytes"], held_sequence(model, method, ids, NEW)
    for held, length in ((kv, SEQ), (kv["end"], SEQ + NEW)):  # after the prompt; after the last decode step
        kept = [kept_by_hand(row[:length], name, marked) for row in sequence.tolist()]
        assert held["measured_cache"] == held["analytic"] == 2 * max(kept) * per_token  # padded to the longest
        assert held["held_fraction"] == pytest.approx(max(kept) / length) and held["held_fraction"] < 0.7
    prompt = cell["bench"]["prompt"]
    assert prompt["kind"] == "text" and prompt["folded_fraction"] == 0  # tiny_llama has SmolLM2's vocabulary
    assert (prompt["marked_fraction"] > 0) == (name != "streamingllm")


@needs_c4
def test_method_static_path_holds_the_slots_it_is_sized_by(tmp_path, tiny_llama):
    """The static cache's bytes are its slots: what the prompt kept (StreamingLLM: 4 sinks and the window's 7
    latest) plus one a decode step, measured off the buffers and equal to the method's analytic bound."""
    model, _ = tiny_llama
    run_mode(text_cfg(tmp_path, "method=streamingllm", "method.window=8",
                      "bench.paths=[static_compiled,method_static]"), overrides=[])
    cell = next(r for r in cells(tmp_path) if r["bench"]["path"] == "method_static")
    per_token = sum(AttnShape.of(model.config).dense_kv_bytes_per_token(4).values())
    kv = cell["bench"]["kv_bytes"]
    assert cell["error"] is None and cell["bench"]["cache"] == "Cache"
    assert kv["measured_cache"] == kv["analytic"] == 2 * (4 + 7 + NEW) * per_token


@needs_c4
def test_text_prompt_is_c4_text_the_same_every_time(tiny_llama):
    model, tokenizer = tiny_llama
    bcfg = OmegaConf.create({"prompt": "text", "input_seed": 0, "batch_sizes": [4], "seq_lens": [512]})
    ids, facts = Prompts(bcfg, model, tokenizer, "smollm2").batch(4, 512)
    again, _ = Prompts(bcfg, model, tokenizer, "smollm2").batch(4, 512)
    assert torch.equal(ids, again) and ids.shape == (4, 512) and not torch.equal(ids[0], ids[1])
    assert facts == {"kind": "text", "source": "c4/c4_validation_2k.jsonl", "tokenizer": "smollm2",
                     "folded_fraction": 0.0}
    first_doc = documents(str(data_dir() / "c4" / "c4_validation_2k.jsonl"))[0]
    assert first_doc.startswith(tokenizer.decode(ids[0, :20]))  # real text, from the file's start
    random, _ = Prompts(OmegaConf.merge(bcfg, {"prompt": "random"}), model).batch(4, 512)
    for marks, text_rate in ((SEPARATORS, 0.10), (ANCHORS, 0.045)):  # C4's rates with SmolLM2's tokenizer
        found = separator_ids(tokenizer, marks)
        assert torch.isin(ids, found).float().mean() == pytest.approx(text_rate, abs=0.03)
        assert torch.isin(random, found).float().mean() < 0.01  # what random ids give a token method
    # A model with a smaller vocabulary (LLaMA's 32000) gets the same text with the ids past it folded in.
    llama = SimpleNamespace(config=SimpleNamespace(vocab_size=32000), device=torch.device("cpu"))
    folded, facts = Prompts(bcfg, llama, tokenizer, "smollm2").batch(4, 512)
    assert torch.equal(folded, ids % 32000) and int(folded.max()) < 32000
    share = float((ids >= 32000).float().mean())
    assert facts["folded_fraction"] == pytest.approx(share) and share > 0


@pytest.fixture(scope="module")
def untied_llama():
    """tiny_llama with its own output head: tied to the embedding, a random model's greedy tokens repeat the last
    token whatever came before, so equal tokens would prove nothing about the context a decoder saw."""
    cfg = compose_model("tiny_llama")
    cfg.arch.tie_word_embeddings = False
    return load_model(cfg, device="cpu", seed=0)[0]


@pytest.mark.parametrize("seq_len", [40, 510])  # 510 + 6 runs past tiny_llama's 512 positions: RoPE computes them
def test_recompute_decodes_the_tokens_of_a_cache(untied_llama, seq_len):
    model = untied_llama
    ids = torch.randint(0, 1000, (2, seq_len), generator=torch.Generator().manual_seed(0))

    def decode(step, token, n=6):
        tokens, position = [token], torch.full_like(token, seq_len)
        for _ in range(n):
            token, position = step(token, position)
            tokens.append(token)
        return torch.cat(tokens, dim=1)

    with torch.no_grad():
        cache = DynamicCache()
        cached = decode(bench.EagerStep(model, cache), bench.prefill(model, ids, cache))
        recomputed = decode(bench.RecomputeStep(model, ids), bench.prefill(model, ids, None))
    assert torch.equal(cached, recomputed) and len(set(cached[0].tolist())) > 3  # tokens that follow the context


def test_recompute_cell_is_labelled_apart(tmp_path):
    run = run_mode(bench_cfg(tmp_path, "bench.seq_lens=[8]", "bench.paths=[sdpa,static_compiled,recompute]"),
                   overrides=[])
    assert run["bench_summary"]["paths"] == ["sdpa", "static_compiled", "recompute"]
    by_path = {r["bench"]["path"]: r for r in cells(tmp_path)}
    again = by_path["recompute"]["bench"]
    assert again["recomputation"] is True and again["note"].startswith("recomputation: MHA without a K,V cache")
    assert again["step"] == "recompute" and again["cache"] is None and again["ttnt_ms"]["median"] > 0
    assert again["kv_bytes"]["measured_cache"] == again["kv_bytes"]["end"]["measured_cache"] == 0
    for name, rec in by_path.items():
        b = rec["bench"]
        assert set(b["speedup_vs"]) == {"mha_eager", "mha_sdpa", "mha_static_compiled"}  # never a baseline
        assert b["fastest_mha_path"] in ("mha_sdpa", "mha_static_compiled")
        if name != "recompute":
            assert b["recomputation"] is False and "not the headline" in b["vs_recompute"]["note"]
            assert b["vs_recompute"]["ttnt_speedup"] > 0 and b["vs_recompute"]["e2e_speedup"] > 0
    table = render(tmp_path / "bench" / "runs.jsonl")  # the report keeps it apart too
    main, apart = table.split("Against recomputation")
    assert "| recompute (no K,V cache; not a baseline) |" in main
    assert "| sdpa |" in apart and "| static_compiled |" in apart and "| recompute" not in apart


def test_the_prompt_keys_a_cell_only_when_it_is_text():
    """Cells measured before prompts had kinds (random ids) keep their keys; a text cell is another cell."""
    mha = build_method(OmegaConf.create({"name": "mha"}))
    path = BenchPath("sdpa", mha, {"name": "mha"}, "sdpa", False)
    config = lambda prompt: {"method": {"name": "mha"}, "bench": {"seq_lens": [8], "prompt": prompt}}  # noqa: E731
    assert "prompt" not in bench_cells.cell_config(config("random"), path, 1, 8, "cpu", "eager")["bench"]
    assert bench_cells.cell_config(config("text"), path, 1, 8, "cpu", "eager")["bench"]["prompt"] == "text"


def test_a_text_prompt_without_a_tokenizer_fails_in_one_line(tmp_path):
    cfg = text_cfg(tmp_path, "model.tokenizer=none", "bench.paths=[sdpa]")
    assert_one_line_error(lambda: run_mode(cfg, overrides=[]), r"bench.prompt=text needs a tokenizer.*smollm2")
    with pytest.raises(ChaiError, match="Did you mean 'text'"):
        from chai.runners.bench import check

        check(bench_cfg(tmp_path, "bench.prompt=txt").bench)
