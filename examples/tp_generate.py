"""The ERNIE 4.5 model page's "Distributed Generation with Tensor Parallelism" example, verbatim but for the import
(moelm instead of transformers) and the model path (a hub id in the local cache or a directory, as argument 1).

    torchrun --nproc-per-node 4 examples/tp_generate.py baidu/ERNIE-4.5-21B-A3B-PT
"""
import sys

import torch

from moelm import AutoModelForCausalLM, AutoTokenizer

model_name = sys.argv[1] if len(sys.argv) > 1 else "baidu/ERNIE-4.5-21B-A3B-PT"

# load the tokenizer and the model
tokenizer = AutoTokenizer.from_pretrained(model_name)
model = AutoModelForCausalLM.from_pretrained(
    model_name,
    device_map="auto",
    dtype=torch.bfloat16,
    tp_plan="auto",
)

# prepare the model input
inputs = tokenizer("Hey, are you conscious? Can you talk to me?", return_tensors="pt")
prompt = "Hey, are you conscious? Can you talk to me?"
messages = [
    {"role": "user", "content": prompt}
]
text = tokenizer.apply_chat_template(
    messages,
    tokenize=False,
    add_generation_prompt=True
)
model_inputs = tokenizer([text], add_special_tokens=False, return_tensors="pt").to(model.device)

# conduct text completion
generated_ids = model.generate(
    **model_inputs,
    max_new_tokens=32,
)
output_ids = generated_ids[0][len(model_inputs.input_ids[0]):].tolist()

# decode the generated ids
generate_text = tokenizer.decode(output_ids, skip_special_tokens=True)
print(f"rank {torch.distributed.get_rank()}: {output_ids}")
