"""Text generation under a method: Hugging Face's `model.generate` with the method's own cache, and a reference loop
written by hand (the prompt in one forward, then one token at a time) that the tests hold it to.

Long-context tasks are lm-eval `generate_until` tasks: lm-eval left-pads a batch of prompts and calls
`model.generate` (chai.evaluate's `CountingHFLM._model_generate` adds `cache_for_generation` to that call). Every
method runs there with a fresh `method.make_cache(model)`, so a method that stores less (CHAI's compacted K, the
token methods' evicting cache) decodes from what it really keeps. No prompt lengths are known while generating
(`Method.set_prompt_lengths(None)`): a forward of several rows is the prefill, a single row with a cache a decode
step (chai/methods/base.py), so CHAI clusters each request from its prompt's first tokens and SparQ sparsifies the
decode steps only.

Left padding: positions follow the 2-D attention mask as `generate` numbers them (real tokens from 0), and every
registered method generates from a left-padded batch what each row would alone (tests/test_generate.py checks each).
One limit: CHAI clusters a padded batch in its prefill, so every prompt needs `membership_tokens` tokens (else one
line says so; chai/methods/_chai_attention.py).
"""

import torch

from chai.bench import CACHE_ARG


def cache_for_generation(model, method) -> dict:
    """The keyword that makes `model.generate` run on `method`'s own cache (a fresh one), {} for no method. The
    method must be applied already (lm-eval applies it around the whole evaluation)."""
    if method is None:
        return {}
    method.set_prompt_lengths(None)  # generation: the prefill and the decode steps tell themselves apart
    return {CACHE_ARG: method.make_cache(model)}


@torch.no_grad()
def generate(model, method, input_ids: torch.Tensor, attention_mask=None, max_new_tokens: int = 32,
             eos_token_ids=(), return_logits: bool = False, **kwargs):
    """Greedy generation (unless `kwargs` say otherwise, e.g. do_sample=True) of up to `max_new_tokens` under
    `method`, applied for this call. input_ids, attention_mask: [B, S], left-padded where rows differ in length. A
    row that emits one of `eos_token_ids` stops and is padded with `pad_token_id` (default 0).
    Returns the generated ids [B, N] and, with `return_logits`, each step's logits [B, N, V]."""
    settings = {"do_sample": False, "max_new_tokens": max_new_tokens, "pad_token_id": 0,
                "eos_token_id": list(eos_token_ids) or None, **kwargs}
    if return_logits:
        settings.update(output_logits=True, return_dict_in_generate=True)
    with method.applied(model):
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **settings,
                             **cache_for_generation(model, method))
    if not return_logits:
        return out[:, input_ids.shape[1]:]
    return out.sequences[:, input_ids.shape[1]:], torch.stack(out.logits, dim=1)


@torch.no_grad()
def step_by_step(model, method, input_ids: torch.Tensor, max_new_tokens: int, attention_mask=None,
                 return_logits: bool = False):
    """The reference for `generate` (greedy, no end token): the prompt in one forward into `method.make_cache(model)`,
    then one forward per token, each taking the argmax. Positions and the growing 2-D mask are the ones `generate`
    passes (no mask when nothing is padded: `generate` drops an all-ones mask). Returns what `generate` returns."""
    padded = attention_mask is not None and not bool(attention_mask.all())
    mask = attention_mask if padded else torch.ones_like(input_ids)  # [B, S + steps so far]
    cache, tokens, steps = method.make_cache(model), input_ids, []
    with method.applied(model):
        for _ in range(max_new_tokens):
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, -tokens.shape[1]:]  # [B, Tnew]
            logits = model(input_ids=tokens, attention_mask=mask if padded else None, position_ids=positions,
                           use_cache=True, **{CACHE_ARG: cache}).logits[:, -1]  # [B, V]
            steps.append(logits)
            tokens = logits.argmax(-1, keepdim=True)  # [B, 1]
            mask = torch.cat([mask, torch.ones_like(tokens)], dim=1)
    logits = torch.stack(steps, dim=1)  # [B, N, V]
    ids = logits.argmax(-1)
    return (ids, logits) if return_logits else ids
