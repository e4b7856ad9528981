"""The reference for `ledgerlake bench finetune`: LoRA training with Hugging Face
transformers + peft on PyTorch's CPU build, on the same model (a checkpoint directory, or
a GGUF file that transformers dequantizes), the same token batches, rank and targets.
Prints one JSON line: tokens/s over the timed steps (all but the first) and peak RSS."""
import argparse
import json
import os
import resource
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--rank", type=int, required=True)
p.add_argument("--targets", default="q,k,v,o")
p.add_argument("--tokens", required=True)
p.add_argument("--threads", type=int, default=os.cpu_count())
a = p.parse_args()

torch.set_num_threads(a.threads)
torch.manual_seed(1)
if a.model.endswith(".gguf"):
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(os.path.abspath(a.model)), gguf_file=os.path.basename(a.model), torch_dtype=torch.float32)
else:
    model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=torch.float32)
targets = [t if t.endswith("_proj") else f"{t}_proj" for t in a.targets.split(",")]
model = get_peft_model(model, LoraConfig(r=a.rank, lora_alpha=2 * a.rank, target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM"))
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
batches = json.load(open(a.tokens))
times = []
for i, rows in enumerate(batches):
    ids = torch.tensor(rows, dtype=torch.long)
    start = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if i > 0:
        times.append(time.perf_counter() - start)
tokens = (len(batches) - 1) * len(batches[0]) * len(batches[0][0])
print(json.dumps({
    "tokens_per_second": tokens / sum(times),
    "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "step_seconds": times,
    "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
}))
