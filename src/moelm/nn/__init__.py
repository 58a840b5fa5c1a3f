"""The shared blocks the family files are made of: layers, stacked experts and routers, rotary embeddings."""
