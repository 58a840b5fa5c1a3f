"""from_pretrained / from_config: the model built on the meta device and each checkpoint tensor copied (or quantized)
straight into place through the one table of hub names (checkpoint.py), device_map's disk offload of decoder layers
(offload.py), NeMo's BackendConfig (backend.py), then inference.optimize and, under torchrun, parallel's plans;
llama.cpp's GGUF files through their own name table (gguf.py, shared with the writer in bench/) and loader
(gguf_load.py)."""
