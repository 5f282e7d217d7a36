"""The coordinator service: one long-lived front door to the workers, for every front end.

It owns, for its whole life, the workers it started (or the addresses it was given), the
`Coordinator` that talks to them and the tokenizer (never the weights). Front ends (the HTTP
server, `generate`, `bench serve`) call `tokenize`, `submit` and `abort`, and read `health()`,
`counts()` and `workers()` (`service_health.py`); none tokenizes, checks limits or starts clusters
itself.

Life of the service:
1. `prepare()` (also done by `start()`): make the topology to start, resolve the model, load its
   tokenizer and read its context, so a front end can refuse prompts (`validate`) before any
   worker starts;
2. `start()`: start the local cluster or the Ray actors (unless addresses were given), say hello
   to every worker and wait for every answer; Ray actors that die and come back are dropped and
   added while the service runs (`ray_cluster.py`); with `--planner slo` the planner loop starts
   (`planner_loop.py`: workers' roles follow the latency targets), and with `--admission slo` its
   prediction refuses a request that would miss the TTFT target (`OverloadedError`);
3. `submit(prompt or ids, params)` checks the prompt against the context and the waiting queue
   (raising before any work is done), then drives the request in a task of its own and returns
   a `RequestStream` of `Delta`s; closing the stream early (a client gone) or `abort(id)` cancels
   that task, and the coordinator sends `Abort` to every worker still holding the request;
   `submit_output` does the same for an output the caller built (the benchmark's, which records
   more);
4. `stop()`: refuse new requests (draining), wait for those in flight, close the connections and
   stop what was started.

What a request's stream carries is in `coordinator/stream.py`.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from disagg_cli import ui
from disagg_cli.config import SamplingParams
from disagg_cli.coordinator.options import ServiceConfig, context_length, worker_address
from disagg_cli.coordinator.placement import InProcess, RemoteColocated, RemoteDisagg, StartLocal, StartOnRay
from disagg_cli.coordinator.prompt_text import PromptText
from disagg_cli.coordinator.refusals import (
    DrainingError,
    OverloadedError,
    QueueFullError,
    UnavailableError,
)
from disagg_cli.coordinator.service_health import ServiceHealth
from disagg_cli.coordinator.stream import RequestStream, StreamingOutput
from disagg_cli.coordinator.topology import ClusterConfig
from disagg_cli.errors import ContextLengthError, DisaggError, UsageError
from disagg_cli.model.registry import REGISTRY, resolve_model
from disagg_cli.model.tokenizer import Tokenizer, load_tokenizer

if TYPE_CHECKING:
    from disagg_cli.coordinator.cluster import LocalCluster
    from disagg_cli.coordinator.coordinator import Coordinator
    from disagg_cli.coordinator.options import CoordinatorConfig
    from disagg_cli.coordinator.planner_loop import PlannerLoop
    from disagg_cli.coordinator.ray_cluster import RayCluster

DRAIN_TIMEOUT_S = 60.0


class CoordinatorService(ServiceHealth):
    """See the module docstring. `async with CoordinatorService(config) as service: …`"""

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.tokenizer: Tokenizer | None = None
        self.model_path: Path | None = None
        self.context_limit = sys.maxsize
        self.text: PromptText | None = None  # tokenizing and prompt checks, once `prepare`d
        self.topology: ClusterConfig | None = None  # what is started here; None: workers elsewhere
        self.coordinator: Coordinator | None = None
        self.cluster: LocalCluster | None = None
        self.ray_cluster: RayCluster | None = None  # the workers as Ray actors (`--ray`)
        # `--planner slo` (its task runs) or `--admission slo` (its predictions only); None: neither
        self.planner: PlannerLoop | None = None
        self.draining = False
        self.in_flight: dict[str, tuple[StreamingOutput, asyncio.Task[None]]] = {}
        self._listeners: list[Callable[[StreamingOutput], None]] = []
        self._ids = itertools.count()

    async def __aenter__(self) -> CoordinatorService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- life ----------------------------------------------------------------------------------

    def prepare(self) -> None:
        """The topology, the model's path, its tokenizer and context; nothing started. Once."""
        if self.tokenizer is not None:
            return
        cfg = self.config
        topology = cfg.to_start()
        model = topology.model if topology is not None else cfg.model
        with ui.pull_progress(model) as on_pull:
            self.model_path = resolve_model(model, cfg.cache_dir, on_pull)
        tokenizer_path = self.model_path
        if cfg.tokenizer is not None:
            with ui.pull_progress(cfg.tokenizer) as on_pull:
                tokenizer_path = resolve_model(cfg.tokenizer, cfg.cache_dir, on_pull)
        self.topology = topology
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.text = PromptText(self.tokenizer, context_length(self.model_path))
        self.context_limit = self.text.context_limit

    async def start(self) -> None:
        from disagg_cli.coordinator.cluster import LocalCluster
        from disagg_cli.coordinator.coordinator import Coordinator
        from disagg_cli.coordinator.membership import JOIN_GRACE_S
        from disagg_cli.coordinator.supervisor import RestartPolicy

        self.prepare()
        assert self.tokenizer is not None and self.model_path is not None
        serve, topology = self.config.serve, self.topology
        coord_config = serve.coordinator_config()
        match serve.placement:
            case StartLocal() | StartOnRay():
                assert topology is not None
                if topology.backend == "ray":
                    workers = await self._start_ray(topology, coord_config)
                else:
                    ui.info(f"starting {topology.counts()} worker(s)…")
                    self.cluster = LocalCluster(topology, str(self.model_path))
                    self.cluster.start()
                    workers = self.cluster.addresses()
            case RemoteColocated(address=address):
                workers = [("colocated", worker_address(address))]
            case RemoteDisagg(prefill=prefill, decode=decode):
                workers = ([("prefill", worker_address(a)) for a in prefill]
                           + [("decode", worker_address(a)) for a in decode])
            case InProcess():
                raise AssertionError("ServiceConfig refuses --in-process")
        probe = self.cluster.is_gone if self.cluster is not None else None
        self.coordinator = Coordinator(workers, self.tokenizer.eos_token_ids, coord_config, probe)
        try:
            if self.cluster is not None:
                await self.coordinator.connect(self.cluster.check)
                placement = serve.placement
                restarts = placement.max_worker_restarts if isinstance(placement, StartLocal) else 0
                if restarts:  # from now on a worker that exits is started again
                    self.cluster.supervise(RestartPolicy(max_restarts=restarts))
            else:  # workers started elsewhere (or restarted by Ray meanwhile) join when they come up
                await self.coordinator.connect(join_grace_s=JOIN_GRACE_S)
            if self.ray_cluster is not None:
                self.ray_cluster.follow(self.coordinator.connections)
            await self.coordinator.connections.poll_stats()
            self._start_planner(self.coordinator)
        except BaseException:
            await self._close()
            raise

    def _start_planner(self, coordinator: Coordinator) -> None:
        from disagg_cli.coordinator.planner_loop import PlannerLoop

        config = self.config.serve.planner
        if not config.is_on and config.admission == "off":
            return
        lenders = frozenset() if self.cluster is None else frozenset(
            w.address for w, lend in zip(self.cluster.workers, self.cluster.leases, strict=True) if lend is not None)
        self.planner = PlannerLoop(config, coordinator, lambda: [out for out, _ in self.in_flight.values()],
                                   lenders=lenders)
        self.on_finished(self.planner.note_finished)
        if config.is_on:
            self.planner.start()

    async def _start_ray(self, topology: ClusterConfig, coord_config: CoordinatorConfig) -> list[tuple[str, str]]:
        """The topology's workers as Ray actors; their (role, address) once every one has bound."""
        from disagg_cli.coordinator.ray_cluster import RayCluster

        assert self.model_path is not None
        # A name is resolved (pulled if need be) on each node; a path must be the same on every node.
        model = topology.model if topology.model in REGISTRY else str(self.model_path.resolve())
        ui.info(f"starting {topology.counts()} worker(s) as Ray actors (Ray cluster: {topology.ray_address})…")
        self.ray_cluster = RayCluster(replace(topology, model=model), topology.ray_address, coord_config.keys_dir)
        try:
            self.ray_cluster.start()
            return await self.ray_cluster.wait_addresses(coord_config.handshake_timeout_s)
        except BaseException:
            await self._close()
            raise

    async def stop(self, drain_timeout_s: float = DRAIN_TIMEOUT_S) -> None:
        """Take no new requests, let those in flight finish (aborting what is left at the timeout),
        then close the connections and stop the workers started here."""
        self.draining = True
        tasks = [task for _, task in self.in_flight.values()]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=drain_timeout_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        await self._close()

    async def _close(self) -> None:
        if self.planner is not None:
            await self.planner.stop()  # kept: its decisions stay readable after the service stops
        if self.ray_cluster is not None:
            await self.ray_cluster.unfollow()  # before the coordinator it adds to and removes from goes
        if self.coordinator is not None:
            await self.coordinator.close()
            self.coordinator = None
        if self.cluster is not None:
            await asyncio.to_thread(self.cluster.stop)
            self.cluster = None
        if self.ray_cluster is not None:
            await self.ray_cluster.stop()
            self.ray_cluster = None

    # --- requests ----------------------------------------------------------------------------------

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._text.tokenize(text, add_special_tokens)  # see prompt_text.py (also: off the event loop)

    def detokenize(self, token_ids: Sequence[int]) -> str:
        return self._text.detokenize(token_ids)

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self._text.render_chat(messages, add_generation_prompt)

    def check_context(self, num_prompt_tokens: int, max_tokens: int) -> None:
        ContextLengthError.check(num_prompt_tokens, max_tokens, self.context_limit)

    def validate(self, token_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise unless these prompt ids can be served with `params` (works once `prepare`d, so a
        front end may refuse a prompt before any worker starts)."""
        self._text.validate(token_ids, params)

    def submit(self, prompt: str | Sequence[int], params: SamplingParams, request_id: str | None = None,
               prompt_text: str | None = None) -> RequestStream:
        """Start a request; raises (before any work) for a prompt too long for the context, an
        invalid prompt, a full waiting queue or a draining service. `prompt_text` is what the
        output records as its prompt (default: the prompt when it is text)."""
        ids = self.tokenize(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        text = prompt_text if prompt_text is not None else prompt if isinstance(prompt, str) else ""
        return self.submit_output(StreamingOutput(request_id or f"req-{next(self._ids)}", text, ids, params, self._tok))

    def submit_output(self, out: StreamingOutput) -> RequestStream:
        """Start the request of an output the caller built (e.g. one that records more), with the
        checks of `submit`; its tokenizer should be this service's."""
        coordinator = self._coordinator
        if self.draining:
            raise DrainingError("the server is shutting down and takes no new requests")
        healthy, why = self.health()
        if not healthy and not self.config.wait_for_workers and not self._will_recover():
            raise UnavailableError(f"{why} right now; retry later")
        self.validate(out.prompt_token_ids, out.params)
        limit = self.config.max_queued_requests
        waiting = self.counts()["waiting"]
        if limit is not None and waiting >= limit:
            raise QueueFullError(f"{waiting} requests are waiting already (--max-queued-requests {limit}); "
                                 "retry later")
        if self.planner is not None and self.planner.config.admission == "slo":
            ok, ttft_ms = self.planner.admit(len(out.prompt_token_ids))
            if not ok:
                raise OverloadedError(f"its time to first token is predicted at {ttft_ms:,.0f} ms behind the prompts "
                                      f"queued, past --slo-ttft-ms {self.planner.config.slo_ttft_ms:g}; retry later",
                                      (ttft_ms - self.planner.config.slo_ttft_ms) / 1e3)
        rid = out.request_id
        if rid in self.in_flight:
            raise UsageError(f"request id {rid!r} is in flight already")
        out.roles = {w.address: w.role for w in coordinator.router.workers}  # as it was served (`disagg` field)
        task = asyncio.create_task(coordinator.run_request(out), name=f"request {rid}")
        # A callback, not a `finally`: a task cancelled before its first step never runs its body.
        task.add_done_callback(lambda _: self._ended(out))
        self.in_flight[rid] = (out, task)
        return RequestStream(out, task)

    def _ended(self, out: StreamingOutput) -> None:
        self.in_flight.pop(out.request_id, None)
        out.fail("aborted", "interrupted before it finished")  # a no-op unless cancelled before it began
        out.deltas.put_nowait(out.last_delta())
        for listener in self._listeners:
            listener(out)

    def abort(self, request_id: str) -> bool:
        """Cancel a request in flight (its workers get `Abort`); False if it is not in flight."""
        entry = self.in_flight.get(request_id)
        if entry is None:
            return False
        entry[1].cancel()
        return True

    def on_finished(self, listener: Callable[[StreamingOutput], None]) -> None:
        """Call `listener` with every request's output once it has ended, however it ended."""
        self._listeners.append(listener)

    # --- what health, metrics and the live table read (the rest: `service_health.py`) --------------

    async def kv_blocks(self, timeout_s: float = 5.0) -> dict[str, tuple[int, int]]:
        """(free, total) KV blocks per live worker, freshly asked for, once all are free or at
        `timeout_s` (a worker frees a request's blocks just after its last token)."""
        stats = await self._coordinator.connections.wait_idle(timeout_s)
        return {address: (int(s.get("free_blocks", 0)), int(s.get("num_blocks", 0))) for address, s in stats.items()}

    @property
    def _text(self) -> PromptText:
        if self.text is None:
            raise DisaggError("the service is not prepared yet: call prepare() or start() first")
        return self.text

    @property
    def _tok(self) -> Tokenizer:
        if self.tokenizer is None:
            raise DisaggError("the service has not been started")
        return self.tokenizer

    @property
    def _coordinator(self) -> Coordinator:
        if self.coordinator is None:
            raise DisaggError("the service is not connected to its workers")
        return self.coordinator
