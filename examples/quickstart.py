"""The shortest real use: quantize a model's graph, compile it, look at what changed."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fxquant import QuantConfig, quantize_graph

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)).eval()
calib = [{"input_ids": torch.randint(0, 256, (4, 64))} for _ in range(4)]  # any iterable of batches

gm = quantize_graph(model, calib, QuantConfig(w_bits=4, a_bits=8))  # W4A8 DuQuant, static activation scales
print(gm.meta["fxquant"]["plan"].table())

compiled = torch.compile(gm, fullgraph=True, dynamic=True)  # one compile for any batch size
ids = torch.randint(0, 256, (2, 32))
with torch.no_grad():
    print("max |logits - float|:", (compiled(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item())
print(gm.code[:2000])  # the rewritten forward: smooth, rotate, permute, quantize nodes before each linear
