"""moelm: ERNIE 4.5, ERNIE 4.5 MoE and PhiMoE in plain PyTorch, speaking the Hugging Face API.

Its names are imported on first use (PEP 562), so the command line's main() and its error handling start before
torch loads: a Ctrl-C while torch loads is the CLI's exit 130, not a traceback."""
import importlib

from . import omp

omp.choose()  # before torch is imported: libgomp reads its wait policy once

_EXPORTS = {  # name -> the module it comes from
    "config": ("Ernie4_5_MoeConfig", "Ernie4_5Config", "PhimoeConfig", "named_config"),
    "generation": ("GenerationConfig",),
    "inference": ("StaticCache",),
    "inference.quantization": ("BitsAndBytesConfig", "QuantizationConfig"),
    "io.weights": ("CheckpointError",),
    "loading.backend": ("BackendConfig", "ModelCapabilities", "get_capabilities"),
    "models.auto": ("AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification"),
    "models.ernie4_5": ("Ernie4_5ForCausalLM", "Ernie4_5Model"),
    "models.ernie4_5_moe": ("Ernie4_5_MoeForCausalLM", "Ernie4_5_MoeModel"),
    "models.phimoe": ("PhimoeForCausalLM", "PhimoeForSequenceClassification", "PhimoeModel"),
    "nn.layers": ("DynamicCache",),
    "parallel.config": ("DistributedConfig",),
    "pipelines": ("pipeline",),
    "text.streamers": ("TextIteratorStreamer", "TextStreamer"),
    "text.tokenizer": ("AutoTokenizer",),
}
_SOURCE = {name: module for module, names in _EXPORTS.items() for name in names}

__version__ = "0.1.0"
__all__ = sorted(_SOURCE)


def __getattr__(name: str):
    """An exported name (imported now and kept), or a subpackage (`moelm.inference` after a bare `import moelm`)."""
    if name in _SOURCE:
        value = getattr(importlib.import_module(f".{_SOURCE[name]}", __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("_"):
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_SOURCE))
