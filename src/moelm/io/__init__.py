"""Files: hub ids and local paths, safetensors reading and writing (validated), atomic writes, sizes."""
