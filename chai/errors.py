"""One kind of user-facing error: a single line that says what is wrong and what to do."""

import difflib


class ChaiError(Exception):
    """Bad input (config value, missing weights or data). `run.py` prints it as one line and exits 2."""


def did_you_mean(kind: str, name: str, choices) -> ChaiError:
    choices = sorted(choices)
    close = difflib.get_close_matches(str(name), choices, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ChaiError(f"unknown {kind} '{name}'.{hint} Valid: {', '.join(choices)}.")


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ChaiError(message)


def check_cluster_count(heads: int, count: int) -> None:
    """A cluster count must be in 1..heads (the torch chain, the fused K-Means and the fused membership ask alike)."""
    require(1 <= count <= heads, f"cannot cluster {heads} heads into {count} clusters: use 1..{heads}.")


def missing_model(hf_id: str, reason: str) -> ChaiError:
    """A hub model that cannot load offline: what to download and where to point `model.path`."""
    return ChaiError(
        f"model '{hf_id}' is not available offline ({reason}): download it where you have network "
        f"and pass model.path=/path/to/{hf_id.split('/')[-1]} (a folder with config.json and weights)."
    )
