"""Issue 24's probes, each at live worker processes (a tiny model): one message or one request that
used to kill a worker is refused with a typed `Error` naming the field, or fails only its request,
and afterwards the same workers serve a normal request exactly with every KV block free."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from disagg_cli.config import EngineConfig, RuntimeConfig, SamplingParams, WorkerConfig
from disagg_cli.engine.engine import LLMEngine
from disagg_cli.model.sampling import STATE_BYTES, Sampler
from disagg_cli.protocol import Error, Generate, Heartbeat, KVDone, KVLayers, Message, Prefill, Reserve, Reserved
from disagg_cli.workers.base import Dest
from disagg_cli.workers.decode import DecodeWorker
from disagg_cli.workers.greeted import MAX_GREETED_PEERS
from tests.workers.peer import Peer, free_port
from tests.workers.tiny_cluster import CONTEXT, GREEDY, LAYERS, VOCAB, TinyCluster, kv_layers, replies, tiny_cluster

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TinyCluster]:
    with tiny_cluster(tmp_path_factory.mktemp("bad")) as c:
        yield c


def _reserve_with_kv(cluster: TinyCluster, rid: str, prompt: tuple[int, ...],
                     params: SamplingParams) -> tuple[Peer, Peer]:
    """`rid` reserved at the decode worker and all its KV sent, as a prefill worker sends it:
    (the coordinator's peer, the prefill worker's peer)."""
    coord = cluster.peer("decode")
    coord.send(Reserve(rid, prompt, params))
    reserved = coord.recv()
    assert isinstance(reserved, Reserved), reserved
    pre = cluster.peer("decode", as_role="prefill")
    pre.send(kv_layers(rid, cluster.fingerprint, reserved.cached_tokens, len(prompt) - reserved.cached_tokens))
    return coord, pre


@pytest.mark.parametrize("state", [b"\0" * 16, bytes(STATE_BYTES)], ids=["16-bytes", "right-size-garbage"])
def test_a_sampler_state_torch_cannot_load_fails_only_its_request(cluster: TinyCluster, state: bytes) -> None:
    rid = f"state-{len(state)}"
    coord, pre = _reserve_with_kv(cluster, rid, (7, 8, 9, 10, 11, 12), SamplingParams(max_tokens=4, temperature=1.0,
                                                                                       seed=7))
    pre.send(KVDone(rid, 5, 6, LAYERS, sampler_state=state))
    err = coord.recv(30)
    assert isinstance(err, Error) and (err.request_id, err.reason) == (rid, "bad-field"), err
    assert "sampler_state" in err.message and (str(STATE_BYTES) in err.message or "mt19937" in err.message)
    coord.close()
    pre.close()
    cluster.assert_serving(rid)


def _send(cluster: TinyCluster, role: str, msg: object) -> Error:
    peer = cluster.peer(role)
    peer.send(msg)  # type: ignore[arg-type]
    err = peer.recv(30)
    peer.close()
    assert isinstance(err, Error), err
    return err


CASES = {  # what is sent, and the words its refusal must hold
    "reserve-id-past-vocab": ("decode", lambda c: Reserve("oov-r", (1, 2, VOCAB), GREEDY), ("prompt_ids", str(VOCAB))),
    "reserve-negative-id": ("decode", lambda c: Reserve("neg-r", (-1, 4), GREEDY), ("prompt_ids", "-1")),
    "prefill-id-past-vocab": ("prefill", lambda c: Prefill("oov-p", (5, 10**6), GREEDY, c.addresses["decode"]),
                              ("prompt_ids", "1000000")),
    "generate-id-past-vocab": ("colocated", lambda c: Generate("oov-g", (VOCAB + 5,), GREEDY), ("prompt_ids",)),
    "prompt-past-the-context": ("decode", lambda c: Reserve("ctx", (1,) * 100, SamplingParams(max_tokens=CONTEXT)),
                                ("max_tokens", "context")),
    "generate-past-the-context": ("colocated", lambda c: Generate("ctx-g", (1,) * 100, SamplingParams(max_tokens=29)),
                                  ("max_tokens", "context")),
    "decode-holds-the-whole-prompt": ("prefill", lambda c: Prefill("cached", (1, 2, 3), GREEDY, c.addresses["decode"],
                                                                   decode_cached_tokens=3), ("decode_cached_tokens",)),
    "decode-addr-not-an-endpoint": ("prefill", lambda c: Prefill("addr", (1, 2), GREEDY, "udp://x y"),
                                    ("decode_addr",)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fields_outside_what_the_model_takes_are_refused_naming_them(cluster: TinyCluster, case: str) -> None:
    role, make, words = CASES[case]
    err = _send(cluster, role, make(cluster))
    assert err.reason == "bad-field" and all(w in err.message for w in words), err
    cluster.assert_serving(case)


def test_a_first_token_past_the_vocabulary_fails_only_its_request(cluster: TinyCluster) -> None:
    coord, pre = _reserve_with_kv(cluster, "oov-first", (20, 21, 22, 23, 24), GREEDY)
    pre.send(KVDone("oov-first", VOCAB, 5, LAYERS))
    err = coord.recv(30)
    assert isinstance(err, Error) and err.reason == "bad-field" and "first_token" in err.message, err
    cluster.assert_serving("first-token")


def test_a_temperature_of_1e_40_samples_greedily(cluster: TinyCluster) -> None:
    params = SamplingParams(max_tokens=8, ignore_eos=True, temperature=1e-40, seed=3)
    prompt = (40, 41, 42, 43, 44)
    assert cluster.disaggregated({"tiny-t": prompt}, params, timeout_s=30) == {"tiny-t": cluster.expected(prompt)}
    cluster.assert_serving("temperature")


def _peak_rss_growth_mb(pid: int, action: object) -> float:
    """How far the process's peak resident memory rose above its current size while `action` ran."""
    status = Path(f"/proc/{pid}/status")

    def field(name: str) -> int:
        return int(next(line for line in status.read_text().splitlines() if line.startswith(name)).split()[1])

    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
    before = field("VmRSS:")
    action()  # type: ignore[operator]
    return (field("VmHWM:") - before) / 1024


def test_kv_is_checked_against_its_reservation_before_anything_is_decompressed(cluster: TinyCluster) -> None:
    fp, huge = cluster.fingerprint, 1 << 20  # 1M tokens of one layer: 256 MiB once decompressed, 1 MiB of lz4
    pre, coord = cluster.peer("decode", as_role="prefill"), cluster.peer("decode")
    coord.send(Reserve("small", (50, 51, 52, 53, 54, 55), GREEDY))
    assert isinstance(coord.recv(), Reserved)
    ghost = kv_layers("ghost", fp, 0, huge, layers=1, codec="lz4", zeros=True)  # never reserved here
    for_small = kv_layers("small", fp, 0, huge, layers=1, codec="lz4", zeros=True)  # reserved: 6 tokens
    past_layers = kv_layers("small", fp, 0, 6, layer_start=LAYERS, layers=1)
    back: list[Message] = []

    def send(*msgs: KVLayers) -> None:
        for msg in msgs:
            pre.send(msg)
        pre.send(Heartbeat(9))  # answered once the I/O thread dealt with all of them
        back.extend(pre.recv_until(lambda m: isinstance(m, Heartbeat), 60))

    assert _peak_rss_growth_mb(cluster.procs["decode"].pid, lambda: send(ghost, ghost, ghost)) < 64
    assert _peak_rss_growth_mb(cluster.procs["decode"].pid, lambda: send(for_small, past_layers)) < 64
    refused = [m for m in back if isinstance(m, Error)]
    assert [(e.request_id, e.reason) for e in refused] == [("ghost", "bad-field")] * 3 + [("small", "bad-field")] * 2
    assert "no reservation" in refused[0].message and "tokens 0..1048575" in refused[3].message
    errors = [coord.recv(30), *replies(coord)]  # the request failed at its coordinator, once
    assert [(e.request_id, e.reason) for e in errors if isinstance(e, Error)] == [("small", "bad-field")], errors
    coord.close()
    pre.close()
    cluster.assert_serving("kv")


def test_a_flood_of_hellos_keeps_only_the_most_recently_heard_peers(cluster: TinyCluster) -> None:
    steady = cluster.peer("decode")
    for i in range(MAX_GREETED_PEERS + 100):
        stranger = Peer(cluster.addresses["decode"], timeout_s=10)
        stranger.hello()
        stranger.close()
        if i % 100 == 0:  # a coordinator's heartbeat keeps it among the most recently heard
            steady.send(Heartbeat(i))
            assert isinstance(steady.recv(10), Heartbeat)
    steady.send(Heartbeat(1))
    beat = steady.recv(10)
    assert isinstance(beat, Heartbeat) and beat.stats.greeted_peers == MAX_GREETED_PEERS
    steady.close()
    cluster.assert_serving("hellos")


class _BrokenSampler(Sampler):
    """Test-only: raises when sampling, as a bug met by one request's values would; notes the step."""

    def __init__(self, params: SamplingParams, engine: LLMEngine, seen: list[list[str]]) -> None:
        super().__init__(params)
        self.engine, self.seen = engine, seen

    def __call__(self, logits: torch.Tensor) -> int:
        self.seen.append(list(self.engine.step_request_ids))
        raise RuntimeError("injected: this request's sampling breaks")

    def logprobs(self, logits: torch.Tensor, token_id: int) -> None:
        self(logits)


class _BrokenOneDecodeWorker(DecodeWorker):
    """Test-only: holds KVDone until `batch` came, so those requests join one batch, and gives request
    "boom" a sampler that raises."""

    batch = 3

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.held: list[tuple[Dest, KVDone]] | None = []
        self.failed_steps: list[list[str]] = []

    def handle(self, dest: Dest, item: Any) -> None:
        if isinstance(item, KVDone) and self.held is not None:
            self.held.append((dest, item))
            if len(self.held) == self.batch:
                held, self.held = self.held, None
                for d, m in held:
                    super().handle(d, m)
            return
        super().handle(dest, item)

    def _join(self, done: KVDone) -> None:
        super()._join(done)
        if done.request_id == "boom":
            self.engine.samplers["boom"] = _BrokenSampler(GREEDY, self.engine, self.failed_steps)


def test_a_request_that_breaks_its_step_fails_alone_and_the_batch_goes_on(cluster: TinyCluster, tmp_path: Path) -> None:
    prompts = {"iso-0": (60, 61, 62, 63, 64), "boom": (70, 71, 72, 73), "iso-2": (80, 81, 82, 83, 84, 85, 86)}
    expected = {rid: cluster.expected(p) for rid, p in prompts.items() if rid != "boom"}
    config = WorkerConfig(role="decode", model=str(cluster.model), host="127.0.0.1", port=free_port(),
                          runtime=RuntimeConfig(dtype="float32", threads=1),
                          engine=EngineConfig(block_size=4, kv_cache_tokens=256))
    worker = _BrokenOneDecodeWorker(config, tmp_path, lm=cluster.lm)
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(worker.serve()), name="decode")
    thread.start()
    try:
        got = cluster.disaggregated(prompts, decode=worker.address)
        boom = got.pop("boom")
        assert got == expected
        assert isinstance(boom, Error) and boom.reason == "internal-error" and "injected" in boom.message, boom
        assert worker.failed_steps and len(worker.failed_steps[0]) == 3  # it broke in a step of all three
        assert cluster.disaggregated({"after": prompts["iso-0"]}, decode=worker.address) == {"after": expected["iso-0"]}
    finally:
        worker.request_stop()
        thread.join(timeout=30)
    assert codes == [0] and not thread.is_alive()
    assert worker.engine.pool.num_free == worker.engine.num_blocks and not worker.requests
    cluster.assert_serving("isolation")
