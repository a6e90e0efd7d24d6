"""The five synthetic task builders behind `chai.long_context`, their templates, and the length fitting.

A builder takes a seeded `random.Random`, the haystack text, the target length and `count(text) -> tokens`,
and returns the fields of one example.
Fitting: needles sit at fixed depths (fractions of the haystack, moved back to a sentence end at most
SNAP_CHARS earlier); we binary-search the number of haystack characters kept so that the whole prompt
tokenizes to at most `length` tokens, then insist on >= MIN_FILL of it (else one-line ChaiError).
Characters, not words, are the unit: one C4 "word" can be a 20-token URL, a jump bigger than the 5% margin
at short lengths. The haystack is cut mid-sentence at its end, as RULER's token-level cut does.
common_words fits the number of rare words in its list instead.
"""

import random
import re

from chai.errors import require

MIN_FILL = 0.95  # a prompt must fill at least this share of its target length
SNAP_CHARS = 200  # how far back a needle may move to reach a sentence end

NIAH_HEADER = ("Below is a long text. Some special magic numbers are hidden inside it. "
               "Read it carefully: you will be asked about them at the end.\n\n")
NIAH_NEEDLE = "The special magic number for {key} is: {value}."
NIAH_QUESTION = ("\n\nQuestion: What is the special magic number for {key} in the text above?\n"
                 "Answer: The special magic number for {key} is")
NIAH_MULTIVALUE_QUESTION = ("\n\nQuestion: What are all the special magic numbers for {key} in the text above?\n"
                            "Answer: The special magic numbers for {key} are")
VT_HEADER = ("Below is a long text with variable assignments hidden inside it. Follow the chains of "
             "assignments: you will be asked about them at the end.\n\n")
VT_VALUE = "VAR {name} = {value} ."
VT_COPY = "VAR {name} = VAR {previous} ."
VT_QUESTION = ("\n\nQuestion: Which variables are assigned the value {value} in the text above, directly or "
               "through other variables?\nAnswer: The variables assigned the value {value} are")
CW_HEADER = "Below is a numbered list of words. A few words appear many more times than all the others.\n\n"
CW_QUESTION = ("\n\nQuestion: What are the {k} most common words in the list above?\n"
               "Answer: The {k} most common words are")

# Keys are two plain words ("amber-harbor"): readable, one per needle, never digits that a value could match.
ADJECTIVES = ("amber", "brisk", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen",
              "lively", "mellow", "noble", "olive", "proud", "quiet", "rapid", "silent", "tidy", "upper", "vivid",
              "wild", "young", "zesty")
NOUNS = ("anchor", "bridge", "canyon", "desert", "engine", "forest", "garden", "harbor", "island", "jacket",
         "kettle", "ladder", "meadow", "needle", "orchard", "pepper", "quarry", "river", "saddle", "tunnel",
         "valley", "window", "yarn", "zipper", "lantern")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

NIAH_KEYS = 4  # needles in niah_multikey (1 asked + 3 distractors)
NIAH_VALUES = 4  # values of the one key in niah_multivalue
VT_CHAINS, VT_HOPS = 2, 4  # variable_tracking: 1 asked chain + 1 distractor, each 1 value + 4 copies
CW_COMMON = 5  # common_words: how many frequent words are asked for


def distinct(rng, make, n: int) -> list:
    """n distinct draws of `make(rng)`, in draw order (deterministic for a seeded rng)."""
    seen = []
    while len(seen) < n:
        item = make(rng)
        if item not in seen:
            seen.append(item)
    return seen


def make_key(rng) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def make_number(digits: int):
    return lambda rng: str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def make_variable(rng) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(5))


def needle_position(text: str, depth: float) -> int:
    """Where a needle at `depth` goes: the last sentence end within SNAP_CHARS before depth x len(text), so a needle
    does not split a sentence (the window keeps needles at different depths apart in long sentences); else the
    last space; else the raw position."""
    position = round(depth * len(text))
    window = max(0, position - SNAP_CHARS)
    ends = [m.end() for m in re.finditer(r"[.!?]\s+", text[window:position])]
    return window + ends[-1] if ends else text.rfind(" ", 0, position) + 1 or position


def assemble(header: str, text: str, needles: list[tuple[float, str]], question: str) -> str:
    """header + haystack with each (depth, sentence) inserted + question. Needles keep their depth order, ties in
    list order, even after snapping (a variable chain stays in order)."""
    body, last = [], 0
    for depth, sentence in sorted(needles, key=lambda pair: pair[0]):
        position = max(last, needle_position(text, depth))
        body += [text[last:position], sentence + " "]
        last = position
    body.append(text[last:])
    return header + "".join(body).strip() + question


def largest_fitting(build, length: int, count, most: int) -> tuple[str, int]:
    """(prompt, tokens) for the largest n in [0, most] with count(build(n)) <= length, by binary search (any n it
    returns was checked, even where the count is not monotone in n)."""
    smallest = count(build(0))
    require(smallest <= length, f"length {length} is too small: the needles and question alone take {smallest} "
                                "tokens; use a larger length.")
    lo, hi = 0, most
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if count(build(mid)) <= length else (lo, mid - 1)
    prompt = build(lo)
    tokens = count(prompt)
    require(tokens >= MIN_FILL * length, f"could only fill {tokens} of {length} tokens: the haystack source is too "
                                         "short for this length.")
    return prompt, tokens


def fit_haystack(header, text, needles, question, length, count) -> tuple[str, int]:
    """The prompt with the longest haystack prefix (in characters) that fits."""
    def build(chars: int) -> str:
        return assemble(header, text[:chars], needles, question)

    return largest_fitting(build, length, count, len(text))


def niah(rng, text, length, count, keys: int = 1, values: int = 1) -> dict:
    """`keys` needles with distinct keys (the first is asked), or one key with `values` values (all asked)."""
    names = distinct(rng, make_key, keys)
    numbers = distinct(rng, make_number(7), max(keys, values))
    if values > 1:
        needles = [NIAH_NEEDLE.format(key=names[0], value=v) for v in numbers]
        targets, question = numbers, NIAH_MULTIVALUE_QUESTION.format(key=names[0])
    else:
        needles = [NIAH_NEEDLE.format(key=k, value=v) for k, v in zip(names, numbers)]
        targets, question = numbers[:1], NIAH_QUESTION.format(key=names[0])
    depths = [round(rng.random(), 4) for _ in needles]
    prompt, tokens = fit_haystack(NIAH_HEADER, text, list(zip(depths, needles)), question, length, count)
    return {"input": prompt, "target": targets, "n_tokens": tokens, "needles": needles, "depths": depths,
            "key": names[0]}


def niah_single(rng, text, length, count) -> dict:
    return niah(rng, text, length, count)


def niah_multikey(rng, text, length, count) -> dict:
    return niah(rng, text, length, count, keys=NIAH_KEYS)


def niah_multivalue(rng, text, length, count) -> dict:
    return niah(rng, text, length, count, values=NIAH_VALUES)


def variable_tracking(rng, text, length, count) -> dict:
    """VT_CHAINS chains `VAR A = 12345 .`, `VAR B = VAR A .`, ... each at increasing depths; asks for the first
    chain's names."""
    names = distinct(rng, make_variable, VT_CHAINS * (VT_HOPS + 1))
    values = distinct(rng, make_number(5), VT_CHAINS)
    needles, chains = [], []
    for c, value in enumerate(values):
        chain = names[c * (VT_HOPS + 1):(c + 1) * (VT_HOPS + 1)]
        lines = [VT_VALUE.format(name=chain[0], value=value)]
        lines += [VT_COPY.format(name=b, previous=a) for a, b in zip(chain, chain[1:])]
        depths = sorted(round(rng.random(), 4) for _ in lines)
        needles += zip(depths, lines)
        chains.append(chain)
    needles.sort(key=lambda pair: pair[0])  # stable: equal depths keep chain order
    question = VT_QUESTION.format(value=values[0])
    prompt, tokens = fit_haystack(VT_HEADER, text, needles, question, length, count)
    return {"input": prompt, "target": chains[0], "n_tokens": tokens, "needles": [line for _, line in needles],
            "depths": [depth for depth, _ in needles], "value": values[0]}


def haystack_vocabulary(text: str) -> list[str]:
    """Distinct lowercase words of 3+ letters from the haystack, in order of first appearance."""
    words = (w.lower() for w in re.findall(r"[A-Za-z]{3,}", text))
    return list(dict.fromkeys(words))


def common_words(rng, text, length, count) -> dict:
    """A shuffled numbered list: CW_COMMON words repeated `repeats` times, the rest once each (drawn from the
    haystack's own vocabulary); asks for the CW_COMMON frequent ones. Fitted on the number of rare words."""
    vocabulary = haystack_vocabulary(text)
    repeats = max(3, length // 128)  # frequent words stay a small share of the list at every length
    common = rng.sample(vocabulary, CW_COMMON)
    rare = [w for w in vocabulary if w not in common]
    rng.shuffle(rare)
    order_seed = rng.random()

    def build(n: int) -> str:
        words = common * repeats + rare[:n]
        random.Random(f"{order_seed}:{n}").shuffle(words)  # one fixed order per n: a re-check sees the same prompt
        numbered = "\n".join(f"{i}. {w}" for i, w in enumerate(words, 1))
        return CW_HEADER + numbered + CW_QUESTION.format(k=CW_COMMON)

    prompt, tokens = largest_fitting(build, length, count, len(rare))
    return {"input": prompt, "target": common, "n_tokens": tokens, "repeats": repeats}


TASKS = {f.__name__: f for f in (niah_single, niah_multikey, niah_multivalue, variable_tracking, common_words)}
