"""Prometheus metrics, named after vLLM's (prefix `moelm:`), on a registry of the server's own."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0)


class ExpertTokens:
    """moelm:expert_tokens_total{model_name, layer, expert}: the engine's expert_counts [MoE layers, E], read when
    scraped (the engine adds each step's routing to that tensor; no counter is touched per step)."""

    NAME, DOC = "moelm:expert_tokens", "Tokens routed to each expert of each MoE layer (layer: the decoder layer)."

    def __init__(self, engine, model_name: str):
        self.engine = engine
        experts = engine.expert_counts.shape[1]
        self.labels = [[[model_name, str(layer), str(e)] for e in range(experts)] for layer in engine.expert_layers]

    def describe(self):
        return [CounterMetricFamily(self.NAME, self.DOC, labels=["model_name", "layer", "expert"])]

    def collect(self):
        family = self.describe()[0]
        for labels, counts in zip(self.labels, self.engine.expert_counts.tolist()):
            for label, n in zip(labels, counts):
                family.add_metric(label, n)
        yield family


class Metrics:
    """What the engine reports (its `metrics` hooks) plus gauges read from it when scraped."""

    def __init__(self, engine, model_name: str):
        self.registry = registry = CollectorRegistry()
        labels = {"model_name": model_name}

        def gauge(name, doc, read):
            g = Gauge(name, doc, list(labels), registry=registry)
            g.labels(**labels).set_function(read)

        gauge("moelm:num_requests_running", "Sequences in a KV slot (prefilling or decoding): the slots in use.",
              engine.num_running)
        gauge("moelm:num_requests_waiting", "Sequences waiting for a KV slot.", engine.num_waiting)
        gauge("moelm:kv_cache_usage_perc", "Fraction of the KV cache's positions held by sequences (1 = full).",
              engine.kv_usage)
        self._prompt = Counter("moelm:prompt_tokens", "Prompt tokens submitted.", list(labels),
                               registry=registry).labels(**labels)
        self._generation = Counter("moelm:generation_tokens", "Tokens generated.", list(labels),
                                   registry=registry).labels(**labels)
        self._ttft = Histogram("moelm:time_to_first_token_seconds", "Time from submission to the first token.",
                               list(labels), buckets=LATENCY_BUCKETS, registry=registry).labels(**labels)
        self._itl = Histogram("moelm:inter_token_latency_seconds", "Time between two tokens of a sequence.",
                              list(labels), buckets=LATENCY_BUCKETS, registry=registry).labels(**labels)
        self._e2e = Histogram("moelm:e2e_request_latency_seconds", "Time from submission to the last token.",
                              list(labels), buckets=LATENCY_BUCKETS, registry=registry).labels(**labels)
        self._success = Counter("moelm:request_success", "Sequences finished, by reason.",
                                ["model_name", "finished_reason"], registry=registry)
        self._queries = Counter("moelm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                list(labels), registry=registry).labels(**labels)
        self._hits = Counter("moelm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", list(labels),
                             registry=registry).labels(**labels)
        self._preemptions = Counter("moelm:num_preemptions", "Sequences preempted for lack of KV blocks (they are "
                                    "prefilled again).", list(labels), registry=registry).labels(**labels)
        self.model_name = model_name
        self.spec = None
        config = getattr(engine, "speculative", None)
        if config is not None:  # vLLM's spec_decode counters
            def counter(name, doc, extra=()):
                return Counter(f"moelm:spec_decode_{name}", doc, list(labels) + list(extra), registry=registry)

            self.spec = (counter("num_drafts", "Drafts checked (a sequence's drafted tokens of one step).")
                         .labels(**labels),
                         counter("num_draft_tokens", "Drafted tokens checked.").labels(**labels),
                         counter("num_accepted_tokens", "Drafted tokens kept.").labels(**labels),
                         counter("num_accepted_tokens_per_pos", "Drafted tokens kept, by their position in the "
                                 "draft (0: the first).", ["position"]))
            for position in range(config.num_speculative_tokens):
                self.spec[3].labels(**labels, position=str(position))
        if getattr(engine, "expert_counts", None) is not None:  # moelm serve --expert-metrics
            registry.register(ExpertTokens(engine, model_name))

    def prompt_tokens(self, n: int):
        self._prompt.inc(n)

    def generation_tokens(self, n: int):
        self._generation.inc(n)

    def ttft(self, seconds: float):
        self._ttft.observe(seconds)

    def itl(self, seconds: float):
        self._itl.observe(seconds)

    def finished(self, reason: str, seconds: float):
        self._e2e.observe(seconds)
        self._success.labels(model_name=self.model_name, finished_reason=reason).inc()

    def prefix_cache(self, queried: int, hit: int):
        self._queries.inc(queried)
        self._hits.inc(hit)

    def preempted(self):
        self._preemptions.inc()

    def speculated(self, drafted: int, kept: int):
        drafts, tokens, accepted, per_position = self.spec
        drafts.inc()
        tokens.inc(drafted)
        accepted.inc(kept)
        for position in range(kept):
            per_position.labels(model_name=self.model_name, position=str(position)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
