"""from_pretrained / from_config: the checkpoint name table, disk offload, the backend choice."""
