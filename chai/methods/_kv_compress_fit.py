"""kv_compress's offline phase and fit (chai/methods/kv_compress.py holds the method and the idea).

Calibration keeps one Gram matrix per layer: S = mean over C4 tokens of [x; 1][x; 1]^T, x the input of the K and V
projections ([hidden + 1]^2, float64; no activation is stored). Every K or V Gram a fit needs follows exactly from
it, C = [W | b] S [W | b]^T for any stacking of heads, so one pass serves every grouping, merge and KV layout
(SmolLM2 as shipped and with expand_kv_heads read the same inputs). Keys are projected before RoPE: the rotation at
a position is common to all heads, so each frequency pair's complex Gram is the same before and after it.

A fit of one group of g source heads (K or V) is an encoder E [D, g*D] (new head = E @ stacked heads) and decoders
R [g, D, D] (head s ~= R[s] @ new head). svd_w is svd_a with S = identity (the weights' own Gram).
"""

import json
import os
from pathlib import Path

import torch

from chai.errors import ChaiError
from chai.methods.dejavu_static import attention_modules
from chai.paths import results_dir

GRAM_KEYS = ("corpus", "n_docs", "seq_len")  # calibration settings the Gram depends on


def augmented(linear) -> torch.Tensor:
    """[W | b] of a projection in float64 on the CPU ([out, in + 1]; b = 0 without bias). The fit is small next to
    the model, and layers may sit on different GPUs."""
    weight = linear.weight.detach().double().cpu()
    bias = linear.bias.detach().double().cpu() if linear.bias is not None else weight.new_zeros(weight.shape[0])
    return torch.cat([weight, bias[:, None]], dim=1)


@torch.no_grad()
def input_grams(model, batches) -> tuple[dict[int, torch.Tensor], int]:
    """({layer: mean [x;1][x;1]^T over real tokens}, tokens) for `batches` of (ids [B, T], lengths [B])."""
    modules = attention_modules(model)
    sums, real = {}, {}

    def hook(layer):
        def accumulate(_, args):
            x = args[0][real["mask"].to(args[0].device)].double()  # [N, hidden]: padding rows dropped
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
            sums[layer] = sums.get(layer, 0) + x.T @ x
        return accumulate

    handles = [m.k_proj.register_forward_pre_hook(hook(i)) for i, m in modules.items()]
    tokens = 0
    try:
        for ids, lengths in batches:
            real["mask"] = torch.arange(ids.shape[1])[None] < lengths[:, None]
            model.base_model(ids.to(model.device), use_cache=False)  # no LM head needed
            tokens += int(lengths.sum())
    finally:
        for handle in handles:
            handle.remove()
    return {i: (s / tokens).cpu() for i, s in sums.items()}, tokens


def c4_batches(tokenizer, settings: dict, data_dir=None):
    """CHAI's offline documents (chai.calibration.documents: same corpus, count, length), right-padded batches."""
    from chai.calibration import documents  # imported here: run.py's preflight imports every method module
    from chai.sensitivity import padded_batches

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    yield from padded_batches(documents(tokenizer, settings, data_dir), settings["batch_size"], pad)


def load_or_calibrate_grams(model, context) -> tuple[dict[int, torch.Tensor], int]:
    """The Gram artifact results/calibration/<model>.kv_grams.pt (made from C4 when missing or made with other
    calibration settings; `calibration.auto=false` turns that into a one-line error)."""
    from chai.calibration import settings_of

    cfg = context.cfg if context is not None else None
    settings = settings_of(cfg.get("calibration") if cfg is not None else None)
    wanted = {k: settings[k] for k in GRAM_KEYS}
    name = context.model_name if context is not None else "model"
    path = results_dir(context.results_dir if context else None) / "calibration" / f"{name}.kv_grams.pt"
    hidden, layers = model.config.hidden_size, model.config.num_hidden_layers
    if path.exists():
        saved = torch.load(path)
        if saved["settings"] == wanted and tuple(saved["grams"].shape) == (layers, hidden + 1, hidden + 1):
            return {i: g.double() for i, g in enumerate(saved["grams"])}, saved["tokens"]
    if not settings["auto"]:
        raise ChaiError(f"kv_compress: no Gram artifact {path} for {json.dumps(wanted)} and calibration.auto=false.")
    if context is None or context.tokenizer is None:
        raise ChaiError("kv_compress: svd_a needs a tokenizer to calibrate on C4 (prepare(model, RunContext(...))).")
    grams, tokens = input_grams(model, c4_batches(context.tokenizer, settings, context.data_dir))
    stacked = torch.stack([grams[i] for i in sorted(grams)]).float()  # float32 on disk: 30 x 577^2 is 40 MB
    save_atomically({"settings": wanted, "tokens": tokens, "grams": stacked}, path)
    # the Grams as every later run reads them back, so this run's fit (and a recovery cached on it) is theirs
    return {i: g.double() for i, g in enumerate(stacked)}, tokens


def save_atomically(artifact: dict, path: Path) -> None:
    """torch.save to a temporary file of this process, then rename: a parallel reader sees the whole file or none,
    and two writers never write into one file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    torch.save(artifact, partial)
    os.replace(partial, path)


def head_gram(aug: torch.Tensor, gram: torch.Tensor | None) -> torch.Tensor:
    """C = A S A^T of stacked heads' [W | b] rows `aug`; S = None: identity (svd_w, the weights' own Gram)."""
    return aug @ aug.T if gram is None else aug @ gram @ aug.T


def meanpool_fold(g: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The GQA paper's initialisation: the new head is the group's mean, every head reads it back as is."""
    eye = torch.eye(d, dtype=torch.float64)
    return eye.repeat(1, g) / g, eye.expand(g, d, d).clone()


def dense_fold(c: torch.Tensor, g: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-d principal directions P [g*d, d] of the group's Gram c: E = P^T, R[s] = P's block of head s."""
    _, vectors = torch.linalg.eigh(c)  # ascending eigenvalues
    p = vectors[:, -d:].flip(-1)
    return p.T.contiguous(), p.reshape(g, d, d)


def pair_complex(m: torch.Tensor) -> torch.Tensor:
    """[D/2] complex -> [D, D] real: multiplication by m[i] on the pair (i, i + D/2), rotate_half's pairing."""
    u, v = torch.diag(m.real), torch.diag(m.imag)
    return torch.cat([torch.cat([u, -v], 1), torch.cat([v, u], 1)], 0)


def rope_fold(c: torch.Tensor, g: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per frequency pair, the top complex principal direction of the group's heads (our construction, exact under
    RoPE: per-pair complex scalars are the only per-head maps that commute with it). With z_s = x_s + i y_s the pair
    of head s, H[s, t] = E[z_s conj(z_t)]; its top unit eigenvector c gives the new pair w = sum_s conj(c_s) z_s and
    z_s ~= c_s w, so E's blocks multiply by conj(c_s) and R's by c_s."""
    half = d // 2
    blocks = c.reshape(g, d, g, d)
    xx = torch.diagonal(blocks[:, :half, :, :half], dim1=1, dim2=3)  # [g, g, half]: E[x_s x_t] of pair i
    yy = torch.diagonal(blocks[:, half:, :, half:], dim1=1, dim2=3)
    xy = torch.diagonal(blocks[:, :half, :, half:], dim1=1, dim2=3)  # E[x_s y_t]
    yx = torch.diagonal(blocks[:, half:, :, :half], dim1=1, dim2=3)  # E[y_s x_t]
    hermitian = torch.complex(xx + yy, yx - xy).permute(2, 0, 1)  # [half, g, g]
    _, vectors = torch.linalg.eigh(hermitian)
    top = vectors[..., -1]  # [half, g], unit norm per pair
    encode = torch.cat([pair_complex(top[:, s].conj()) for s in range(g)], dim=1)
    decode = torch.stack([pair_complex(top[:, s]) for s in range(g)])
    return encode, decode


def residual(c: torch.Tensor, encode: torch.Tensor, decode: torch.Tensor) -> float:
    """Share of the group's energy tr(C) the fit loses: tr((I - R E) C (I - R E)^T) / tr(C)."""
    error = torch.eye(c.shape[0], dtype=c.dtype) - decode.reshape(-1, decode.shape[-1]) @ encode
    return float(torch.trace(error @ c @ error.T) / torch.trace(c).clamp(min=1e-300))


def similarity_groups(ck: torch.Tensor, cv: torch.Tensor, heads: int, size: int, d: int) -> list[tuple[int, ...]]:
    """Groups of `size` source heads by similarity: the normalised cross-Gram norm ||C_st|| / sqrt(||C_ss|| ||C_tt||)
    of K plus that of V; greedily, the lowest free head takes the free heads most similar to the group so far."""
    def coherence(c):
        norms = c.reshape(heads, d, heads, d).square().sum((1, 3)).sqrt()  # [heads, heads]
        diag = norms.diagonal()
        return norms / (diag[:, None] * diag[None]).sqrt().clamp(min=1e-300)

    score = coherence(ck) + coherence(cv)
    free, groups = list(range(heads)), []
    while free:
        group = [free.pop(0)]
        while len(group) < size:
            best = max(free, key=lambda t: (float(score[group, t].sum()), -t))
            free.remove(best)
            group.append(best)
        groups.append(tuple(sorted(group)))
    return sorted(groups)


def nearest_divisor(total: int, target: float) -> int:
    """The divisor of `total` nearest `target` (ties: the smaller, i.e. more compression)."""
    divisors = [k for k in range(1, total + 1) if total % k == 0]
    return min(divisors, key=lambda k: (abs(k - target), k))
