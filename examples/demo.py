"""`make demo`: quantize a small Llama (random config) with DuQuant W4A8, compile it, report.

Prints the plan, the output error against float, and the compile count across batch sizes.
"""

import time

import torch
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import LlamaConfig, LlamaForCausalLM

from fxquant import QuantConfig, quantize_graph


def main() -> None:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4)
    model = LlamaForCausalLM(config).eval()
    calib = [{"input_ids": torch.randint(0, 512, (4, 128))} for _ in range(8)]
    start = time.perf_counter()
    gm = quantize_graph(model, calib, QuantConfig())
    print(gm.meta["fxquant"]["plan"].table())
    print(f"quantize_graph: {time.perf_counter() - start:.1f} s")

    ids = torch.randint(0, 512, (4, 128))
    with torch.no_grad():
        want, got = model(input_ids=ids).logits, gm(input_ids=ids).logits
    sqnr = 10 * torch.log10(want.pow(2).mean() / (got - want).pow(2).mean())
    print(f"logits SQNR vs float: {sqnr:.1f} dB (random weights: no outliers, so this says little about accuracy)")

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(gm, backend=counter, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for batch in (2, 4, 8):
            out = compiled(input_ids=torch.randint(0, 512, (batch, 64))).logits
    print(f"compiled with Inductor: {counter.frame_count} compilation(s) for batch sizes 2, 4, 8; "
          f"output {tuple(out.shape)}")


if __name__ == "__main__":
    main()
