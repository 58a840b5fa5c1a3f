"""Fine-tuning, applied to an unchanged model: recipes, local data, the training loop with FSDP2 and expert
parallelism, LoRA on linear layers and stacked experts, checkpoints with exact resume, evaluation."""
from .balance import ExpertLoad, update_correction_bias
from .data import DataConfig, DataError, Example, batch_length, collate, load_examples
from .evaluate import Choice, choice_scores, load_choices, multiple_choice, perplexity
from .recipe import Recipe, RecipeError, build_recipe, load_recipe

__all__ = ["Choice", "DataConfig", "DataError", "Example", "ExpertLoad", "Recipe", "RecipeError", "batch_length",
           "build_recipe", "choice_scores", "collate", "load_choices", "load_examples", "load_recipe",
           "multiple_choice", "perplexity", "update_correction_bias"]
