"""Prometheus `/metrics`: vLLM's metric names and buckets under `disagg:`, plus the KV transfer.

Request-level series (histograms, counters) are observed once per request when it ends (the
service's `on_finished`); server-level series (requests waiting/running, KV usage and liveness per
worker, restarts of the local workers by role, each worker's role and the role switches made) are
read from the service at scrape time.
Everything lives in this server's own `CollectorRegistry`, never prometheus_client's global one,
so two servers in one process (tests) do not share counters.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from disagg_cli.coordinator.service import CoordinatorService
from disagg_cli.coordinator.stream import StreamingOutput
from disagg_cli.protocol import COMPLETED_REASONS, WORKER_ROLES

PREFIX = "disagg:"
# vLLM's buckets (vllm/v1/metrics/loggers.py), so dashboards built for vLLM read ours unchanged.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
KV_TRANSFER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
RATIO_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
# vLLM's `finished_reason` label values; a failure other than an abort is counted by reason apart.
FINISHED_REASONS = (*COMPLETED_REASONS, "abort")


class ServerMetrics:
    def __init__(self, service: CoordinatorService, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]
        r = self.registry

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=r)

        def count(name: str, doc: str, extra: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, doc, [*labels, *extra], registry=r)

        self.ttft = hist("time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS)
        self.itl = hist("inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", ITL_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                        REQUEST_LATENCY_BUCKETS)
        self.queue = hist("request_queue_time_seconds", "Histogram of time spent waiting (for decode memory and "
                          "in the prefill queue) in seconds.", REQUEST_LATENCY_BUCKETS)
        self.kv_seconds = hist("kv_transfer_seconds", "Histogram of KV transfer time (first to last layer "
                               "arriving at the decode worker) in seconds.", KV_TRANSFER_BUCKETS)
        self.kv_hidden = hist("kv_transfer_hidden_ratio", "Histogram of the share of each KV transfer that "
                              "overlapped prefill compute.", RATIO_BUCKETS)
        self.prompt_tokens = count("prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = count("generation_tokens", "Number of generation tokens processed.")
        self.success = count("request_success", "Count of successfully processed requests.", ("finished_reason",))
        self.failure = count("request_failure", "Count of requests that failed, by reason.", ("reason",))
        self.kv_bytes = count("kv_transfer_bytes", "KV bytes sent from prefill to decode workers.", ("kind",))
        self.retries = count("request_retries", "Requests run again after a worker died or shut down.")
        self.cache_queries = count("prefix_cache_queries", "Prompt tokens looked up in the prefix cache of the "
                                   "worker that prefilled them.")
        self.cache_hits = count("prefix_cache_hits", "Prompt tokens found there (not computed again).")
        self.decode_hits = count("decode_prefix_cache_hits", "Prompt tokens whose KV the decode worker already "
                                 "held (not sent over the wire).")
        self.local_prefills = count("local_prefill_requests", "Requests prefilled on their decode worker "
                                    "(selective disaggregation).")
        for reason in FINISHED_REASONS:  # present at zero from the start, as vLLM's are
            self.success.labels(model_name, reason)
        for kind in ("raw", "wire"):
            self.kv_bytes.labels(model_name, kind)
        # Every series at zero from the first scrape, so a rate or a before/after difference never
        # meets a missing one.
        for series in (self.prompt_tokens, self.generation_tokens, self.cache_queries, self.cache_hits,
                       self.decode_hits, self.local_prefills, self.retries, self.ttft, self.itl, self.e2e,
                       self.queue, self.kv_seconds, self.kv_hidden):
            series.labels(model_name)
        r.register(_LiveGauges(service, model_name))
        service.on_finished(self.observe)

    def observe(self, out: StreamingOutput) -> None:
        m = self.model_name
        t = out.timings
        self.prompt_tokens.labels(m).inc(len(out.prompt_token_ids))
        self.generation_tokens.labels(m).inc(len(out.token_ids))
        if out.state == "done":
            self.success.labels(m, out.finish_reason or "stop").inc()
        elif out.finish_reason == "aborted":
            self.success.labels(m, "abort").inc()
        else:
            self.failure.labels(m, out.finish_reason or "error").inc()
        if t.first_token_s is not None:
            self.ttft.labels(m).observe(t.first_token_s - t.arrival_s)
        times = out.token_times_s
        for a, b in zip(times, times[1:], strict=False):
            self.itl.labels(m).observe(b - a)
        if t.finish_s is not None and out.state == "done":
            self.e2e.labels(m).observe(t.finish_s - t.arrival_s)
        queued_ms = [t.stages_ms[k] for k in ("reserve_ms", "queue_ms") if k in t.stages_ms]
        if queued_ms:
            self.queue.labels(m).observe(sum(queued_ms) / 1e3)
        kv = out.kv
        for kind in ("raw", "wire"):
            if f"{kind}_bytes" in kv:
                self.kv_bytes.labels(m, kind).inc(kv[f"{kind}_bytes"])
        if "transfer_ms" in kv:
            self.kv_seconds.labels(m).observe(kv["transfer_ms"] / 1e3)
            if kv["transfer_ms"] > 0:
                self.kv_hidden.labels(m).observe(min(1.0, kv.get("hidden_ms", 0.0) / kv["transfer_ms"]))
        if kv.get("retries"):
            self.retries.labels(m).inc(kv["retries"])
        if t.first_token_s is not None:
            self.cache_queries.labels(m).inc(len(out.prompt_token_ids))
            self.cache_hits.labels(m).inc(kv.get("prefix_cached_tokens", 0))
            self.decode_hits.labels(m).inc(kv.get("decode_cached_tokens", 0))
            self.local_prefills.labels(m).inc(kv.get("local_prefill", 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _LiveGauges(Collector):
    """Gauges (and the restart counter, which the cluster keeps) read from the service at scrape time."""

    def __init__(self, service: CoordinatorService, model_name: str) -> None:
        self.service = service
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        m = self.model_name
        counts = self.service.counts()
        running = GaugeMetricFamily(PREFIX + "num_requests_running", "Number of requests in model execution "
                                    "(prefill, KV transfer or decode).", labels=["model_name"])
        running.add_metric([m], counts["running"])
        waiting = GaugeMetricFamily(PREFIX + "num_requests_waiting", "Number of requests waiting to be "
                                    "processed (for decode memory).", labels=["model_name"])
        waiting.add_metric([m], counts["waiting"])
        usage = GaugeMetricFamily(PREFIX + "kv_cache_usage_perc", "KV-cache usage per worker, from its last "
                                  "heartbeat. 1 means 100 percent usage.", labels=["model_name", "role", "address"])
        up = GaugeMetricFamily(PREFIX + "worker_up", "1 while the worker answers heartbeats.",
                               labels=["model_name", "role", "address"])
        cached = GaugeMetricFamily(PREFIX + "prefix_cache_blocks", "Free KV blocks per worker that keep a cached "
                                   "prefix, from its last heartbeat.", labels=["model_name", "role", "address"])
        for w in self.service.workers():
            up.add_metric([m, w.role, w.address], 1.0 if w.is_alive else 0.0)
            if "cached_blocks" in w.stats:
                cached.add_metric([m, w.role, w.address], float(w.stats["cached_blocks"]))
            if w.kv_usage is not None:
                usage.add_metric([m, w.role, w.address], w.kv_usage)
        # Counted by the local cluster's supervisor; every role served at zero, as vLLM's counters start.
        restarts = CounterMetricFamily(PREFIX + "worker_restarts", "Local workers started again after they "
                                       "exited unexpectedly, by role.", labels=["model_name", "role"])
        cluster = self.service.cluster
        counts = cluster.restarts() if cluster is not None else {}
        for role in sorted({w.role for w in self.service.workers()} | set(counts)):
            restarts.add_metric([m, role], float(counts.get(role, 0)))
        yield from (running, waiting, usage, up, cached, restarts, *self._roles())

    def _roles(self) -> Iterator[Metric]:
        """Each worker's role as a state set (1 for the role it has, 0 for the others), and the role
        switches made in place (by the planner or anyone), by (from, to), every pair at zero from the start."""
        m = self.model_name
        role = GaugeMetricFamily(PREFIX + "worker_role", "1 for the role each worker has now, 0 for the others "
                                 "(elastic workers change role in place).", labels=["model_name", "address", "role"])
        for w in self.service.workers():
            for r in WORKER_ROLES:
                role.add_metric([m, w.address, r], 1.0 if w.role == r else 0.0)
        switches = CounterMetricFamily(PREFIX + "role_switches", "Workers switched in place from one role to "
                                       "another.", labels=["model_name", "from", "to"])
        coordinator = self.service.coordinator
        made = coordinator.switches.counts if coordinator is not None else {}
        for a in WORKER_ROLES:
            for b in WORKER_ROLES:
                if a != b:
                    switches.add_metric([m, a, b], float(made.get((a, b), 0)))
        yield from (role, switches)
