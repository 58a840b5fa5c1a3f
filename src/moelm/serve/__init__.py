"""`moelm serve`, an OpenAI-compatible server: the engine (continuous batching over a paged KV cache with prefix
caching, the shared sampler, cancellation), the pydantic request bodies, the FastAPI app (app.py builds it, routes.py
has one handler per endpoint reading app.state, responses.py sends the engine's outputs as SSE or one body, errors.py
OpenAI's error JSON), Prometheus metrics, speculative decoding (speculation.py: vLLM's --speculative-config, n-gram,
draft model or ERNIE's MTP head), structured output (structured.py: llguidance's token masks), the chat page and the
command."""
