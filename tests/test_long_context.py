"""The RULER-style generator: deterministic files, prompts fitted to the token budget, needles and targets
recoverable from the prompt, the scorer, and one-line errors. SmolLM2's tokenizer, real C4/WikiText rows."""

import hashlib
import json
import re
from collections import Counter

import pytest

from chai.config import compose_model
from chai.errors import ChaiError
from chai.long_context import SOURCES, TASKS, generate, score, write_task
from chai.long_context_tasks import NIAH_KEYS, NIAH_VALUES, VT_CHAINS, VT_HOPS
from chai.models import load_tokenizer
from chai.paths import data_dir

LENGTHS = (256, 512)


@pytest.fixture(scope="module")
def tokenizer():
    missing = [s for s in SOURCES.values() if not (data_dir() / s).exists()]
    if missing:
        pytest.skip(f"no data directory with {missing}")
    return load_tokenizer(compose_model("smollm2"))


@pytest.fixture(scope="module")
def examples(tokenizer):
    """{(task, length): 3 examples} for every task at both test lengths, seed 0."""
    return {(task, length): generate(task, length, 3, 0, tokenizer) for task in TASKS for length in LENGTHS}


def test_same_seed_gives_byte_identical_file_and_hash(tokenizer, tmp_path):
    first, hash1 = write_task("niah_multikey", 256, 3, 7, tokenizer, out_dir=tmp_path / "a")
    second, hash2 = write_task("niah_multikey", 256, 3, 7, tokenizer, out_dir=tmp_path / "b")
    assert first.read_bytes() == second.read_bytes()
    assert hash1 == hash2 == hashlib.sha256(first.read_bytes()).hexdigest()
    manifest = json.loads(first.with_name(first.name + ".manifest.json").read_text())
    assert manifest["sha256"] == hash1 and manifest["file"] == first.name and manifest["seed"] == 7
    rows = [json.loads(line) for line in first.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"niah_multikey-256-7-{i}" for i in range(3)]


def test_different_seed_gives_different_file(tokenizer, tmp_path):
    path0, hash0 = write_task("niah_single", 256, 2, 0, tokenizer, out_dir=tmp_path)
    path1, hash1 = write_task("niah_single", 256, 2, 1, tokenizer, out_dir=tmp_path)
    assert path0 != path1 and hash0 != hash1
    inputs0, inputs1 = ([json.loads(line)["input"] for line in p.read_text().splitlines()] for p in (path0, path1))
    assert all(a != b for a, b in zip(inputs0, inputs1))  # the prompts differ, not only the ids


def test_an_example_does_not_depend_on_how_many_are_drawn(tokenizer):
    one = generate("variable_tracking", 256, 1, 3, tokenizer)
    assert one == generate("variable_tracking", 256, 2, 3, tokenizer)[:1]


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("length", LENGTHS)
def test_prompt_fills_95_to_100_percent_of_length(examples, tokenizer, task, length):
    for example in examples[task, length]:
        tokens = len(tokenizer(example["input"])["input_ids"])
        assert 0.95 * length <= tokens <= length
        assert tokens == example["n_tokens"] and example["length"] == length and example["task"] == task


@pytest.mark.parametrize("length", LENGTHS)
def test_niah_needles_appear_as_designed(examples, length):
    for task, needles in (("niah_single", 1), ("niah_multikey", NIAH_KEYS), ("niah_multivalue", NIAH_VALUES)):
        for example in examples[task, length]:
            assert len(example["needles"]) == needles
            for needle in example["needles"]:
                assert example["input"].count(needle) == 1
            assert len(re.findall(r"The special magic number for \S+ is: \d+\.", example["input"])) == needles


@pytest.mark.parametrize("length", LENGTHS)
def test_niah_target_follows_its_key(examples, length):
    for task in ("niah_single", "niah_multikey", "niah_multivalue"):
        for example in examples[task, length]:
            found = re.findall(rf"for {re.escape(example['key'])} is: (\d+)\.", example["input"])
            assert sorted(found) == sorted(example["target"])  # multivalue: in depth order, not draw order
            assert f"for {example['key']} in the text above?" in example["input"]  # the question names the key


def chain_of(text: str, value: str) -> set[str]:
    """Every variable that holds `value` by the assignments in `text` (read in order)."""
    holds = {}
    for name, source in re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+) \.", text):
        holds[name] = holds.get(source[4:], None) if source.startswith("VAR ") else source
    return {name for name, held in holds.items() if held == value}


@pytest.mark.parametrize("length", LENGTHS)
def test_variable_tracking_target_is_the_chain(examples, length):
    for example in examples["variable_tracking", length]:
        assert len(example["needles"]) == VT_CHAINS * (VT_HOPS + 1)
        assert all(example["input"].count(line) == 1 for line in example["needles"])
        assert chain_of(example["input"], example["value"]) == set(example["target"])
        assert len(example["target"]) == VT_HOPS + 1


@pytest.mark.parametrize("length", LENGTHS)
def test_common_words_target_is_the_most_frequent(examples, length):
    for example in examples["common_words", length]:
        words = Counter(re.findall(r"^\d+\. (\S+)$", example["input"], flags=re.M))
        target = example["target"]
        rest = max(count for word, count in words.items() if word not in target)
        assert all(words[w] == example["repeats"] > rest for w in target)


def test_score_is_share_of_targets_found():
    single = {"target": ["5240449"]}
    assert score(" 5240449.", single) == 1.0
    assert score(" 1234567.", single) == 0.0
    multi = {"target": ["1111111", "2222222", "3333333", "4444444"]}
    assert score("1111111, 2222222, 3333333 and 4444444", multi) == 1.0
    assert score("1111111 and 3333333", multi) == 0.5
    assert score("the words are Fan, LANGUAGE", {"target": ["fan", "language"]}) == 1.0  # case ignored
    assert score("nothing", {"target": "fan"}) == 0.0


def test_scoring_each_task_on_its_own_target(examples):
    for (task, _), rows in examples.items():
        for example in rows:
            assert score(" " + ", ".join(example["target"]), example) == 1.0
            assert score(" I do not know.", example) == 0.0


def test_wikitext_haystack(tokenizer):
    example = generate("niah_single", 256, 1, 0, tokenizer, source="wikitext2")[0]
    assert example["source"] == "wikitext2" and example["input"].count(example["needles"][0]) == 1
    assert example["input"] != generate("niah_single", 256, 1, 0, tokenizer)[0]["input"]


@pytest.mark.parametrize("call, message", [
    (dict(task="niah_singel"), "unknown long-context task 'niah_singel'. Did you mean 'niah_single'?"),
    (dict(length=16), "length 16 is too small"),
    (dict(task="variable_tracking", length=40), "length 40 is too small"),
    (dict(length=0), "length must be a positive integer"),
    (dict(n=0), "n must be a positive integer"),
    (dict(source="pg19"), "unknown haystack source 'pg19'"),
])
def test_bad_arguments_fail_in_one_line(tokenizer, call, message):
    args = dict(task="niah_single", length=256, n=1, seed=0, tokenizer=tokenizer) | call
    with pytest.raises(ChaiError) as info:
        generate(**args)
    assert message in str(info.value) and "\n" not in str(info.value)
