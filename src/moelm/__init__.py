"""moelm: ERNIE 4.5, ERNIE 4.5 MoE and PhiMoE in plain PyTorch, speaking the Hugging Face API."""
from . import omp

omp.choose()  # before torch is imported: libgomp reads its wait policy once  # noqa: E402
from .config import Ernie4_5_MoeConfig, Ernie4_5Config, PhimoeConfig, named_config
from .generation import GenerationConfig
from .inference import StaticCache
from .inference.quantization import BitsAndBytesConfig, QuantizationConfig
from .io.weights import CheckpointError
from .loading.backend import BackendConfig, ModelCapabilities, get_capabilities
from .models.auto import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
from .models.ernie4_5 import Ernie4_5ForCausalLM, Ernie4_5Model
from .models.ernie4_5_moe import Ernie4_5_MoeForCausalLM, Ernie4_5_MoeModel
from .models.phimoe import PhimoeForCausalLM, PhimoeForSequenceClassification, PhimoeModel
from .nn.layers import DynamicCache
from .parallel.config import DistributedConfig
from .pipelines import pipeline
from .text.streamers import TextIteratorStreamer, TextStreamer
from .text.tokenizer import AutoTokenizer

__version__ = "0.1.0"
__all__ = [
    "AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification", "CheckpointError", "DynamicCache",
    "Ernie4_5Config", "Ernie4_5ForCausalLM", "Ernie4_5Model", "Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM",
    "Ernie4_5_MoeModel", "PhimoeConfig", "PhimoeForCausalLM", "PhimoeForSequenceClassification", "PhimoeModel",
    "named_config", "pipeline", "GenerationConfig", "AutoTokenizer", "TextStreamer", "TextIteratorStreamer",
    "StaticCache", "BitsAndBytesConfig", "QuantizationConfig", "BackendConfig", "ModelCapabilities",
    "get_capabilities", "DistributedConfig",
]
