"""Fine-tuning, applied to an unchanged model: recipes, local data, the training loop with FSDP2 and expert
parallelism, LoRA on linear layers and stacked experts, checkpoints with exact resume, evaluation."""
from .balance import ExpertLoad, update_correction_bias
from .data import DataConfig, DataError, Example, batch_length, collate, load_examples
from .evaluate import Choice, choice_scores, load_choices, multiple_choice, perplexity
from .lora import LoraConfig, apply_lora, load_adapter, lora_parameters, lora_state_dict, merge_lora, save_adapter
from .recipe import Recipe, RecipeError, build_recipe, load_recipe

__all__ = ["Choice", "DataConfig", "DataError", "Example", "ExpertLoad", "LoraConfig", "Recipe", "RecipeError",
           "apply_lora", "batch_length", "build_recipe", "choice_scores", "collate", "load_adapter", "load_choices",
           "load_examples", "load_recipe", "lora_parameters", "lora_state_dict", "merge_lora", "multiple_choice",
           "perplexity", "save_adapter", "update_correction_bias"]
