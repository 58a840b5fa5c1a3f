"""pipeline("text-generation"): prompts or chat messages in, [{"generated_text": ...}] out, as transformers."""
from __future__ import annotations

GENERATE_ARGS = {"generation_config", "streamer"}  # generate()'s own arguments besides GenerationConfig fields


def check_generate_kwargs(kwargs: dict, where: str) -> dict:
    """kwargs, if every name is a GenerationConfig field or a generate() argument; else a TypeError naming them."""
    import dataclasses

    from .generation import GenerationConfig

    known = {f.name for f in dataclasses.fields(GenerationConfig)} - {"extra"} | GENERATE_ARGS
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"{where} got unexpected keyword argument(s) {', '.join(map(repr, unknown))}: not "
                        "generation parameters (GenerationConfig fields)")
    return kwargs


class TextGenerationPipeline:
    """`pipeline("text-generation")`: generation keyword arguments given to pipeline() are defaults that those
    given at call time override."""

    def __init__(self, model, tokenizer, return_full_text: bool = True, **generate_kwargs):
        self.model, self.tokenizer = model, tokenizer
        self.return_full_text = return_full_text
        self.generate_kwargs = check_generate_kwargs(generate_kwargs, "pipeline()")

    def __call__(self, text_inputs, return_full_text: bool | None = None, **generate_kwargs):
        """A string, a list of chat messages, or a list of either -> one result list per input."""
        kwargs = {**self.generate_kwargs, **check_generate_kwargs(generate_kwargs, "the text-generation pipeline")}
        full = self.return_full_text if return_full_text is None else return_full_text
        single = isinstance(text_inputs, str) or _is_chat(text_inputs)
        inputs = [text_inputs] if single else list(text_inputs)
        results = [self._one(x, full, kwargs) for x in inputs]
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
        if ids.shape[1] == 0:  # an empty prompt: generate from the BOS token, as transformers
            ids = mask = None
        out = self.model.generate(ids, attention_mask=mask, tokenizer=self.tokenizer, **generate_kwargs)
        results = []
        for row in out:
            text = self.tokenizer.decode(row[0 if ids is None else ids.shape[1]:], skip_special_tokens=True)
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


def pipeline(task: str, model=None, tokenizer=None, device=None, dtype="auto", torch_dtype=None, device_map=None,
             model_kwargs: dict | None = None, revision: str | None = None, trust_remote_code=None, **kwargs):
    """Only "text-generation". `model` may be a loaded model or a path / hub id (loaded with device / device_map,
    dtype, revision and model_kwargs); `tokenizer` likewise. Other keyword arguments are return_full_text and
    generation parameters, the defaults of every call; anything else is a TypeError."""
    if task != "text-generation":
        raise ValueError(f"unsupported pipeline task {task!r}; moelm provides 'text-generation'")
    if model is None:
        raise ValueError("pipeline needs a model (a loaded model, a path or a hub id)")
    from .config import dtype_from_str
    from .models.auto import AutoModelForCausalLM
    from .text.tokenizer import AutoTokenizer

    pipe_kwargs = check_generate_kwargs({k: v for k, v in kwargs.items() if k != "return_full_text"}, "pipeline()")
    if isinstance(device, int) and not isinstance(device, bool):  # transformers' convention: -1 is the CPU
        device = "cpu" if device < 0 else device
    dtype = torch_dtype or dtype
    if isinstance(model, str):
        model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, device=device,
                                                     device_map=device_map, revision=revision,
                                                     **(model_kwargs or {}))
        tokenizer = tokenizer or model.name_or_path
    else:
        if model_kwargs or device_map is not None or revision is not None:
            raise ValueError("model_kwargs, device_map and revision apply when pipeline() loads the model; "
                             "this one is already loaded")
        if dtype not in ("auto", None) and dtype_from_str(dtype) != model.dtype:
            raise ValueError(f"dtype={dtype} applies when pipeline() loads the model; this one is already loaded "
                             f"in {model.dtype}: convert it first (model.to({dtype}))")
        if device is not None:  # as transformers: the loaded model moves to `device`
            model = model.to(device)
    if tokenizer is None:
        name = getattr(model, "name_or_path", None)
        if name is None:
            raise ValueError("pipeline needs a tokenizer when the model was not loaded from a path")
        tokenizer = name
    if isinstance(tokenizer, str):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    return TextGenerationPipeline(model, tokenizer, kwargs.get("return_full_text", True), **pipe_kwargs)
