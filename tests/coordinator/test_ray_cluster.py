"""`disagg serve` on a real Ray cluster: three Ray nodes on this machine (`ray.cluster_utils.Cluster`),
a head without custom resources, a `prefill` node and a `decode` node; one `disagg serve` process
whose topology says `[cluster] backend = "ray"` (1 prefill + `--decode-replicas 2` decode actors).

What is checked, from Ray's own records (its GCS actor table, its node list) and over HTTP with
the `openai` client: each actor lands on a node that has its role's resource; greedy float32
output equals transformers'; a decode actor killed mid-stream is restarted by Ray and rejoins at
its new address while every request is answered; every KV block is free at the end. And the
errors a user meets: Ray not installed, an address nobody answers at, resources no node has.

Loopback only: Ray takes the machine's interface address for a node and even rewrites 127.0.0.1 to
it when connecting, unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (read when `ray` is imported, so it
is set here, before that, and inherited by the Ray nodes and `disagg serve`) and every node is
started with node_ip_address 127.0.0.1. The workers bind and advertise their node's address, so
127.0.0.1 too.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest

from disagg_cli.model.tokenizer import Tokenizer
from tests.server.conftest import Server, running_server
from tests.workers.peer import free_port

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

# 480 s: a module setup that starts three actors loading weights on a loaded 2-core machine takes minutes
pytestmark = [pytest.mark.slow, pytest.mark.timeout(480)]
LOOPBACK = "127.0.0.1"
MODEL = "smollm2"
NUM_TOKENS = 16  # of the golden check
NUM_KILL_TOKENS = 32  # of each request the kill interrupts (the reference has 32)
WAIT_S = 120.0


def wait_until(condition: Callable[[], Any], what: str, timeout_s: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(0.2)
    return value


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    """Three Ray nodes on 127.0.0.1: a head with one CPU and no custom resources, a prefill node
    (1 CPU, prefill: 1) and a decode node (2 CPUs, decode: 2)."""
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    # Even without the dashboard, Ray's head runs its usage-stats module, which asks the cloud
    # metadata service (169.254.169.254, metadata.google.internal) what cloud this is and, with
    # usage stats off, tells usage-stats.ray.io that they are off (found with strace). It asks
    # with `requests`, which takes a proxy from the environment: a loopback port where nothing
    # listens keeps those asks on loopback, unanswered; no_proxy keeps Ray's own loopback traffic
    # direct. Only the head's processes are started with these.
    with pytest.MonkeyPatch.context() as env:
        for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
            env.setenv(name, f"http://{LOOPBACK}:9")
        env.setenv("RAY_USAGE_STATS_REPORT_URL", f"http://{LOOPBACK}:9/")
        for name in ("no_proxy", "NO_PROXY"):
            env.setenv(name, f"{LOOPBACK},localhost")
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": LOOPBACK,
                                                                "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1, resources={"prefill": 1}, node_ip_address=LOOPBACK)
        cluster.add_node(num_cpus=2, resources={"decode": 2}, node_ip_address=LOOPBACK)
        cluster.wait_for_nodes(timeout=60)
        yield cluster
    finally:
        cluster.shutdown()


@pytest.fixture(scope="module")
def ray(ray_cluster: Any) -> Iterator[Any]:
    """Ray, this test process a driver of `ray_cluster` (to read Ray's records and kill actors)."""
    import ray

    ray.init(address=ray_cluster.address, logging_level=logging.WARNING)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def server(ray_cluster: Any, default_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("ray")
    topology = folder / "ray.toml"
    topology.write_text(f'[cluster]\nbackend = "ray"\naddress = "{ray_cluster.address}"\n'
                        '[defaults]\ndtype = "float32"\nquantization = "none"\nthreads = 1\nkv_cache_tokens = 4096\n'
                        '[[workers]]\nrole = "prefill"\nkv_codec = "none"\nresources = { prefill = 1 }\n'
                        '[[workers]]\nrole = "decode"\nresources = { decode = 1 }\n')
    # Three actors load the weights at once: on a 2-core machine with other work that takes longer than
    # the default 120 s hello wait (seen with two busy loops beside the suite); the fixture waits 240 s.
    with running_server(folder, default_gguf, "--config", str(topology), "--decode-replicas", "2",
                        "--served-model-name", MODEL, "--connect-timeout", "230") as s:
        yield s


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=WAIT_S, max_retries=0) as c:
        yield c


def actors(ray: Any) -> dict[str, tuple[Any, dict[str, Any]]]:
    """The serving actors by name: (handle, Ray's own record of it: node, state, restarts)."""
    from ray._private import state

    names = ray.util.list_named_actors(all_namespaces=True)
    namespace = next(a["namespace"] for a in names if a["name"] == "decode-1")
    out = {}
    for a in names:
        if a["namespace"] == namespace:
            handle = ray.get_actor(a["name"], namespace=namespace)
            out[a["name"]] = (handle, state.actors(actor_id=handle._actor_id.hex()))
    return out


def nodes_with(ray: Any, resource: str) -> set[str]:
    return {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get(resource)}


def workers_up(server: Server) -> dict[str, str]:
    """address → role of every worker /metrics says is up."""
    return {dict(labels)["address"]: dict(labels)["role"] for (name, labels), value in server.metrics().items()
            if name == "disagg:worker_up" and value == 1}


def kv_usage(server: Server) -> dict[str, float]:
    return {dict(labels)["address"]: value for (name, labels), value in server.metrics().items()
            if name == "disagg:kv_cache_usage_perc"}


def retries_total(server: Server) -> float:
    return server.metrics()[("disagg:request_retries_total", (("model_name", MODEL),))]


def run_disagg(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "disagg_cli", *args], capture_output=True, text=True, timeout=120)
    return done, time.monotonic() - start


def error_lines(done: subprocess.CompletedProcess[str]) -> list[str]:
    assert "Traceback" not in done.stderr, done.stderr
    return [line for line in done.stderr.splitlines() if line.startswith("error:")]


# --- errors a user meets ----------------------------------------------------------------------------


def test_ray_not_installed_says_how_to_install_it(default_gguf: Path) -> None:
    script = ("import sys; sys.modules['ray'] = None; sys.argv[0] = 'disagg'; "
              "from disagg_cli.cli import main; main()")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script, "serve", "--model", str(default_gguf), "--ray", "auto",
                           "--port", str(free_port())], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert error_lines(done) == ["error: --ray needs Ray, which is not installed here: "
                                 "pip install 'disagg-cli[ray]'"], done.stderr
    assert time.monotonic() - start < 60


def test_an_address_nobody_answers_at_is_one_line(default_gguf: Path) -> None:
    pytest.importorskip("ray")
    port = free_port()
    done, took = run_disagg("serve", "--model", str(default_gguf), "--ray", f"{LOOPBACK}:{port}",
                            "--port", str(free_port()))
    assert done.returncode != 0
    [line] = error_lines(done)
    assert line.startswith(f"error: --ray {LOOPBACK}:{port}: nothing answers at {LOOPBACK}:{port}"), line
    assert took < 60


def test_resources_no_node_has_name_the_role_and_the_resources(ray: Any, ray_cluster: Any, default_gguf: Path,
                                                               tmp_path: Path) -> None:
    topology = tmp_path / "gpu.toml"
    topology.write_text('[[workers]]\nrole = "prefill"\nresources = { gpu_node = 1 }\n'
                        '[[workers]]\nrole = "decode"\nresources = { gpu_node = 1 }\n')
    done, took = run_disagg("serve", "--model", str(default_gguf), "--ray", ray_cluster.address, "--config",
                            str(topology), "--connect-timeout", "3", "--port", str(free_port()))
    assert done.returncode != 0
    [line] = error_lines(done)
    assert line.startswith(f"error: cannot place the prefill worker: no node of the Ray cluster at "
                           f"{ray_cluster.address} has {{CPU: 1, gpu_node: 1}} (nodes: "), line
    assert took < 60
    # Nothing of it stays behind in the Ray cluster.
    alive = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"] in ("prefill-0", "decode-0")]
    assert alive == []


# --- serving ------------------------------------------------------------------------------------------


def test_actors_land_only_on_nodes_with_their_role_resources(ray: Any, server: Server) -> None:
    placed = actors(ray)
    assert sorted(placed) == ["decode-0", "decode-1", "prefill-0"]
    prefill_nodes, decode_nodes = nodes_with(ray, "prefill"), nodes_with(ray, "decode")
    assert len(prefill_nodes) == len(decode_nodes) == 1 and not prefill_nodes & decode_nodes
    for name, (_, record) in placed.items():
        assert record["State"] == "ALIVE" and record["NumRestarts"] == 0, record
        assert record["Address"]["NodeID"] in (prefill_nodes if name.startswith("prefill") else decode_nodes), name
        assert record["Address"]["IPAddress"] == LOOPBACK
    # The workers advertise their node's address (loopback here), and the service knows exactly those.
    infos = ray.get([handle.info.remote() for handle, _ in placed.values()], timeout=60)
    assert {i["node_id"] for i in infos} == {r["Address"]["NodeID"] for _, r in placed.values()}
    assert workers_up(server) == {i["address"]: i["role"] for i in infos}
    assert all(i["address"].startswith(f"tcp://{LOOPBACK}:") for i in infos)


def test_greedy_float32_over_http_equals_transformers(client: openai.OpenAI, default_tokenizer: Tokenizer,
                                                      hf_greedy: dict[str, tuple[list[int], list[int]]]) -> None:
    names = ["prose", "code"]
    got = client.completions.create(model=MODEL, prompt=[hf_greedy[n][0] for n in names], max_tokens=NUM_TOKENS,
                                    temperature=0, logprobs=0, extra_body={"ignore_eos": True})
    assert got.usage is not None and got.usage.completion_tokens == NUM_TOKENS * len(names)
    for choice, name in zip(sorted(got.choices, key=lambda c: c.index), names, strict=True):
        ref = hf_greedy[name][1][:NUM_TOKENS]
        assert choice.logprobs is not None
        assert choice.logprobs.tokens == [default_tokenizer.decode([t]) for t in ref], name
        assert choice.text == default_tokenizer.decode(ref), name
        assert choice.finish_reason == "length"


def test_decode_actor_killed_mid_stream_is_restarted_by_ray_and_rejoins(
        ray: Any, server: Server, client: openai.OpenAI, default_tokenizer: Tokenizer,
        hf_greedy: dict[str, tuple[list[int], list[int]]]) -> None:
    names = ["prose", "code"] * 3
    refs = [[default_tokenizer.decode([t]) for t in hf_greedy[n][1][:NUM_KILL_TOKENS]] for n in names]
    victim, before = actors(ray)["decode-0"]
    old_address = ray.get(victim.info.remote(), timeout=60)["address"]
    retries_before = retries_total(server)
    progress = [0] * len(names)

    def stream(i: int) -> tuple[list[str], dict[str, Any]]:
        tokens: list[str] = []
        figures: dict[str, Any] = {}
        for chunk in client.completions.create(model=MODEL, prompt=hf_greedy[names[i]][0], stream=True,
                                               max_tokens=NUM_KILL_TOKENS, temperature=0, logprobs=0,
                                               extra_body={"ignore_eos": True}):
            if chunk.choices and chunk.choices[0].logprobs:
                tokens += chunk.choices[0].logprobs.tokens or []
                progress[i] = len(tokens)
            figures = (chunk.model_extra or {}).get("disagg", figures)  # on the last chunk
        return tokens, figures

    with ThreadPoolExecutor(len(names)) as pool:
        futures = [pool.submit(stream, i) for i in range(len(names))]
        wait_until(lambda: all(n >= 2 for n in progress) or any(f.done() for f in futures), "every stream decoding")
        assert not any(f.done() for f in futures), [f.result() for f in futures if f.done()]
        ray.kill(victim, no_restart=False)  # its process dies at once; Ray may restart it
        results = [f.result(timeout=240) for f in futures]

    # Every request answered in full; those the victim held were retried elsewhere.
    retried = [r for _, r in results if r.get("retries")]
    assert [len(tokens) for tokens, _ in results] == [NUM_KILL_TOKENS] * len(names)
    assert 1 <= len(retried) <= 3  # round-robin gave the victim three of the six
    assert retries_total(server) - retries_before == sum(r["retries"] for r in retried)
    for (tokens, figures), ref in zip(results, refs, strict=True):
        if figures.get("retries"):  # re-prefilled prompt + tokens so far: float32 may flip a late near-tie
            assert sum(a == b for a, b in zip(tokens, ref, strict=True)) >= NUM_KILL_TOKENS - 4
        else:
            assert tokens == ref

    # Ray restarted it, on a decode node again, and the service routes to its new address.
    def restarted() -> tuple[str, dict[str, Any]] | None:
        handle, record = actors(ray)["decode-0"]
        if record["State"] != "ALIVE" or record["NumRestarts"] != 1:
            return None
        address = ray.get(handle.info.remote(), timeout=60)["address"]
        return (address, record) if address and workers_up(server).get(address) == "decode" else None

    new_address, record = wait_until(restarted, "the killed decode actor restarted and rejoined")
    assert new_address != old_address and old_address not in workers_up(server)
    assert record["Address"]["NodeID"] in nodes_with(ray, "decode") and record["Pid"] != before["Pid"]
    served_by = []
    for _ in range(4):  # round-robin over two decode workers reaches the new one within two
        got = client.completions.create(model=MODEL, prompt=hf_greedy["prose"][0], max_tokens=4, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert got.choices[0].text == default_tokenizer.decode(hf_greedy["prose"][1][:4])
        served_by.append(got.model_extra["disagg"][0]["workers"]["decode"])
        if new_address in served_by:
            break
    assert new_address in served_by, served_by

    # Every block free on the three workers serving now, nothing running.
    usage = wait_until(lambda: (u := kv_usage(server)) and len(u) == 3 and all(v == 0 for v in u.values()) and u,
                       "every KV block free", timeout_s=30)
    assert set(usage) == set(workers_up(server))
    assert server.metrics()[("disagg:num_requests_running", (("model_name", MODEL),))] == 0
