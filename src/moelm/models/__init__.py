"""The model families, one file each with the hub's module names (ernie4_5, ernie4_5_moe, phimoe), built from nn/ on
the shared decoder and heads of modeling.py; the Auto classes choosing one from config.json; the bodies of `moelm new`
(scaffold: a random checkpoint with tokenizer and chat template) and `moelm info` (sizes, MoE layout, memory)."""
