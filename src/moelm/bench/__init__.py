"""moelm bench: machine probes, the runner against transformers and llama.cpp, the report."""
