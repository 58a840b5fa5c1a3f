"""Expert parallelism, the layout NeMo AutoModel runs ERNIE-4.5-21B-A3B with: every rank holds 1/ep of the experts
and the dense parts whole (data-parallel ranks, fsdp_size = ep), tokens reach their experts by all-to-all. Each rank
generates for its own prompt.

    torchrun --nproc-per-node 8 examples/ep_generate.py baidu/ERNIE-4.5-21B-A3B-PT
"""
import os
import sys

import torch

from moelm import AutoModelForCausalLM, AutoTokenizer, DistributedConfig

model_name = sys.argv[1] if len(sys.argv) > 1 else "baidu/ERNIE-4.5-21B-A3B-PT"
world = int(os.environ["WORLD_SIZE"])

tokenizer = AutoTokenizer.from_pretrained(model_name)
model = AutoModelForCausalLM.from_pretrained(
    model_name,
    dtype=torch.bfloat16,
    distributed_config=DistributedConfig(ep_size=world, fsdp_size=world),
)
rank = torch.distributed.get_rank()
prompts = ["Write a haiku about the sea.", "What is expert parallelism?"]
messages = [{"role": "user", "content": prompts[rank % len(prompts)]}]
text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
model_inputs = tokenizer([text], add_special_tokens=False, return_tensors="pt").to(model.device)
generated_ids = model.generate(**model_inputs, max_new_tokens=32, do_sample=False)
output_ids = generated_ids[0][len(model_inputs.input_ids[0]):].tolist()
print(f"rank {rank}: {output_ids} {tokenizer.decode(output_ids, skip_special_tokens=True)!r}")
