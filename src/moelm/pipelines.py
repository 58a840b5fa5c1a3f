"""pipeline("text-generation"): prompts or chat messages in, [{"generated_text": ...}] out, as transformers."""
from __future__ import annotations


class TextGenerationPipeline:
    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def __call__(self, text_inputs, return_full_text: bool = True, **generate_kwargs):
        """A string, a list of chat messages, or a list of either -> one result list per input."""
        single = isinstance(text_inputs, str) or _is_chat(text_inputs)
        inputs = [text_inputs] if single else list(text_inputs)
        results = [self._one(x, return_full_text, generate_kwargs) for x in inputs]
        return results[0] if single else results

    def _one(self, prompt, return_full_text: bool, generate_kwargs: dict) -> list[dict]:
        chat = _is_chat(prompt)
        prefill = chat and prompt[-1]["role"] == "assistant"  # continue the final assistant message
        if chat:
            enc = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=not prefill,
                                                     continue_final_message=prefill, return_tensors="pt",
                                                     return_dict=True)
        else:
            enc = self.tokenizer(prompt, return_tensors="pt")
        device = self.model.device
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        out = self.model.generate(ids, attention_mask=mask, tokenizer=self.tokenizer, **generate_kwargs)
        results = []
        for row in out:
            text = self.tokenizer.decode(row[ids.shape[1]:], skip_special_tokens=True)
            if not return_full_text:
                results.append({"generated_text": text})
            elif prefill:
                last = dict(prompt[-1], content=prompt[-1]["content"] + text)
                results.append({"generated_text": list(prompt[:-1]) + [last]})
            elif chat:
                results.append({"generated_text": list(prompt) + [{"role": "assistant", "content": text}]})
            else:
                results.append({"generated_text": prompt + text})
        return results


def _is_chat(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and isinstance(x[0], dict) and "role" in x[0]


def pipeline(task: str, model=None, tokenizer=None, device=None, dtype="auto", torch_dtype=None, **kwargs):
    """Only "text-generation". `model` may be a loaded model or a path / hub id; `tokenizer` likewise."""
    if task != "text-generation":
        raise ValueError(f"unsupported pipeline task {task!r}; moelm provides 'text-generation'")
    if model is None:
        raise ValueError("pipeline needs a model (a loaded model, a path or a hub id)")
    from .auto import AutoModelForCausalLM
    from .tokenizer import AutoTokenizer

    if isinstance(model, str):
        model = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype or dtype, device=device)
        tokenizer = tokenizer or model.name_or_path
    if tokenizer is None:
        name = getattr(model, "name_or_path", None)
        if name is None:
            raise ValueError("pipeline needs a tokenizer when the model was not loaded from a path")
        tokenizer = name
    if isinstance(tokenizer, str):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    return TextGenerationPipeline(model, tokenizer)
