"""Fill the KV holes of a prompt with spanfill and keep decoding (random tiny Llama, CPU ok).

    python examples/fill_holes.py
"""

import torch
import transformers

from spanfill.demo import poison_holes
from spanfill.integrations.holes import decode_step, fill_holes, make_cache, prefill_cache

torch.manual_seed(0)
config = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512,
                                  num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2)
model = transformers.LlamaForCausalLM(config).eval()
prompt = torch.randint(0, 512, (300,))
holes = [(0, 16), (128, 144), (256, 300)]  # first tokens of each chunk, and the question

cache = make_cache(model, 300 + 8)
full = prefill_cache(model, prompt, cache)  # stands in for KV cached chunk by chunk
poison_holes(cache, 0, holes)  # the holes' KV is missing
logits = fill_holes(model, prompt, cache, holes)
print("max |fill - full prefill| =", (logits - full).abs().max().item())
token = logits.argmax(-1)
for _ in range(5):
    token = decode_step(model, token, cache).argmax(-1)
    print("next token", token.item())
