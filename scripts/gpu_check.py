"""Smoke check on a GPU machine: the transformers APIs chai relies on exist in the installed version."""

import inspect

import torch
import transformers
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

print("torch", torch.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
print("Cache.__init__", inspect.signature(Cache.__init__))
print("DynamicLayer.__init__", inspect.signature(DynamicLayer.__init__))
print("DynamicLayer.update", inspect.signature(DynamicLayer.update))
print("sdpa_mask", list(inspect.signature(sdpa_mask).parameters))
cache = Cache(layers=[DynamicLayer() for _ in range(2)])
k = torch.zeros(1, 2, 3, 4)
print("update ok", [t.shape for t in cache.layers[0].update(k, k)], cache.get_seq_length())
print("registries", type(AttentionInterface()).__name__, type(AttentionMaskInterface()).__name__)
