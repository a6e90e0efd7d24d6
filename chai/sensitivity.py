"""How much each layer's clustering costs: the measured table behind the `budget` count rule (chai.cluster_counts).

For every layer and every count k < heads, CHAI (online membership, the method's own defaults) clusters that layer
alone at k, every other layer dense, and the mean next-token loss on held-out C4 documents is compared with the
dense model's. Only predictions the clustering can change are counted: from position `membership_tokens` on (the
first m rows run as MHA). One forward per (layer, count) and batch: layers x (heads - 1) forwards in all, seconds on
a GPU for SmolLM2; made once per model and stored in the calibration artifact.
"""

import time

import torch

from chai.attention import AttnShape


def padded_batches(docs: list[torch.Tensor], size: int, pad: int):
    """(ids [B, T] right-padded, lengths [B]) per batch. Causal attention: real tokens never see the padding."""
    for start in range(0, len(docs), size):
        batch = docs[start : start + size]
        lengths = torch.tensor([len(d) for d in batch])
        ids = torch.full((len(batch), int(lengths.max())), pad, dtype=torch.long)
        for row, doc in enumerate(batch):
            ids[row, : len(doc)] = doc
        yield ids, lengths


def mean_loss(model, batches: list, first: int) -> float:
    """Token-weighted mean cross-entropy of the predictions made at positions first .. length-2 of every document."""
    total, count = 0.0, 0
    for ids, lengths in batches:
        logits = model(ids.to(model.device), use_cache=False).logits.float()  # [B, T, V]
        targets = ids[:, 1:].to(logits.device)
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
        positions = torch.arange(ids.shape[1] - 1, device=logits.device)[None]
        scored = (positions >= first) & (positions < (lengths.to(logits.device) - 1)[:, None])
        total += float((losses * scored).sum())
        count += int(scored.sum())
    return total / max(count, 1)


@torch.no_grad()
def layer_sensitivity(model, docs: list[torch.Tensor], batch_size: int, pad: int, membership_tokens: int) -> dict:
    """{"delta_loss": [L][H] (k = 1..H; k = H is dense, 0), "dense_loss", "tokens", ...} on `docs`."""
    from chai.methods.chai import Chai  # the method measured; imported here so calibration loads without it

    started = time.perf_counter()
    shape = AttnShape.of(model.config)
    batches = list(padded_batches(docs, batch_size, pad))
    dense = mean_loss(model, batches, membership_tokens)
    table = [[0.0] * shape.heads for _ in range(shape.layers)]
    for layer in range(shape.layers):
        for k in range(1, shape.heads):
            counts = [shape.heads] * shape.layers
            counts[layer] = k  # every other layer at `heads` clusters: dense (Chai.full_layers_dense)
            method = Chai(layer_clusters=counts, membership_tokens=membership_tokens)
            with method.applied(model):
                table[layer][k - 1] = mean_loss(model, batches, membership_tokens) - dense
    return {
        "delta_loss": table,
        "dense_loss": dense,
        "n_docs": len(docs),
        "tokens": sum(max(0, len(d) - 1 - membership_tokens) for d in docs),
        "what": "mean next-token loss (nats) with only this layer clustered at k (online CHAI, K-Means, first "
        f"{membership_tokens} tokens decide), minus the dense model's, over predictions at positions >= "
        f"{membership_tokens}",
        "time_s": time.perf_counter() - started,
    }
