"""One config chain: every worker option given to a topology (TOML, `generate`, `bench`) reaches the
worker it starts, whole, as JSON, and the worker reports it in its hello."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from disagg_cli.config import EngineConfig, RuntimeConfig, WorkerConfig
from disagg_cli.coordinator.cluster import LocalCluster, worker_command
from disagg_cli.coordinator.coordinator import Coordinator
from disagg_cli.coordinator.topology import ClusterConfig, WorkerSpec, load_cluster_config
from disagg_cli.core_lease import CoreLease
from disagg_cli.errors import UsageError
from tests.tiny_models import random_weights, write_gguf

# A value other than the default for every setting a WorkerSpec hands on (placement aside).
NON_DEFAULT = {"host": "127.0.0.2", "port": 7123, "device": "cuda", "dtype": "bfloat16", "quantization": "int8",
               "threads": 3, "kv_codec": "int8", "block_size": 8, "kv_cache_tokens": 64, "kv_cache_memory_mb": 7.5,
               "max_num_seqs": 5, "max_num_batched_tokens": 99, "chunked_prefill": False, "max_step_ms": 60.0,
               "enable_prefix_caching": False, "kernel": "torch", "wide_dtype": "bfloat16",
               "kv_cache_dtype": "float16", "elastic": True}


def test_every_spec_field_reaches_the_worker_config() -> None:
    base = WorkerSpec("prefill", port=7000)
    # The role is the command; cpus are the child's affinity; num_cpus, num_gpus and resources are
    # what its Ray actor asks its node for (they reach `ray_options`, checked below).
    placement = {"role", "cpus", "num_cpus", "num_gpus", "resources"}
    assert set(NON_DEFAULT) == {f.name for f in dataclasses.fields(WorkerSpec)} - placement
    for name, value in NON_DEFAULT.items():
        changed = dataclasses.replace(base, **{name: value})
        assert changed.worker_config("m") != base.worker_config("m"), name
    ray = dataclasses.replace(base, num_cpus=3.0, num_gpus=0.5, resources=(("prefill", 2.0),))
    assert ray.ray_options() == {"num_cpus": 3.0, "num_gpus": 0.5, "resources": {"prefill": 2.0}}


def test_worker_config_round_trips_as_json() -> None:
    config = dataclasses.replace(WorkerSpec("decode", **{k: v for k, v in NON_DEFAULT.items() if k != "kv_codec"}))
    made = config.worker_config("/models/x.gguf")
    again = WorkerConfig.from_json(made.to_json())
    assert again == made
    assert again.engine == EngineConfig(block_size=8, kv_cache_tokens=64, kv_cache_memory_mb=7.5, max_num_seqs=5,
                                        max_num_batched_tokens=99, chunked_prefill=False, max_step_ms=60.0,
                                        enable_prefix_caching=False)
    assert again.runtime == RuntimeConfig(device="cuda", dtype="bfloat16", threads=3, quantization="int8",
                                          kernel="torch", wide_dtype="bfloat16", kv_cache_dtype="float16")
    # The child's command line carries that JSON, not a flag list rebuilt field by field.
    cmd = worker_command(config, "/models/x.gguf")
    assert cmd[-2] == "run-worker" and WorkerConfig.from_json(cmd[-1]) == made


def test_a_bad_config_is_refused_where_it_is_made() -> None:
    good = WorkerSpec("prefill", port=7000).worker_config("m")
    data = json.loads(good.to_json())
    data["engine"]["block_size"] = 0
    with pytest.raises(UsageError, match="--block-size must be at least 1"):
        WorkerConfig.from_json(json.dumps(data))
    with pytest.raises(UsageError, match="not a worker config"):
        WorkerConfig.from_json('{"role": "prefill"}')
    with pytest.raises(UsageError, match="--dtype must be one of"):
        WorkerSpec("decode", dtype="float64")


def test_toml_takes_every_engine_setting(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text('model = "m"\n[defaults]\nkv_cache_memory_mb = 3\nchunked_prefill = true\n'
                    '[[workers]]\nrole = "prefill"\n[[workers]]\nrole = "decode"\nmax_num_batched_tokens = 77\n')
    prefill, decode = load_cluster_config(path).workers
    assert prefill.engine().kv_cache_memory_mb == 3
    assert decode.engine() == EngineConfig(kv_cache_memory_mb=3, chunked_prefill=True,
                                                             max_num_batched_tokens=77)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("lend_cores", [True, False])
def test_started_workers_report_what_they_were_given(tmp_path: Path, lend_cores: bool) -> None:
    """Real worker processes on a tiny model: the hello says the pool, batch limits and threads;
    each runs on its placed cores, or, sharing a lease of them, on the cores of both."""
    model = write_gguf(tmp_path / "tiny.gguf", random_weights())
    specs = (WorkerSpec("prefill", kv_cache_tokens=96, block_size=8, max_num_seqs=3, max_num_batched_tokens=50,
                        chunked_prefill=False, threads=1, kv_codec="none", max_step_ms=25),  # unchunked: unbounded
             WorkerSpec("decode", kv_cache_memory_mb=0.25, block_size=4, max_num_seqs=7, threads=1,
                        enable_prefix_caching=False, max_step_ms=40))

    async def hellos(cluster: LocalCluster) -> list[dict[str, int]]:
        async with Coordinator(cluster.addresses(), frozenset({2})) as coordinator:
            await asyncio.wait_for(coordinator.connect(cluster.check), 120)
            return [coordinator.connections.capacity(w.address) for w in cluster.workers]

    def affinities(pid: int) -> set[frozenset[int]]:
        """The CPU affinity of each thread of process `pid` (Linux sets it per thread)."""
        return {frozenset(os.sched_getaffinity(int(tid))) for tid in os.listdir(f"/proc/{pid}/task")}

    with LocalCluster(ClusterConfig(str(model), specs, lend_cores=lend_cores), str(model)) as cluster:
        prefill, decode = asyncio.run(hellos(cluster))
        if hasattr(os, "sched_getaffinity"):
            # Each serving worker runs every thread on its placed cores (set once its model loaded), or
            # where they lend cores to each other (two cores or more here), on the cores of both.
            placed = [frozenset(w.spec.cpus or ()) for w in cluster.workers]
            assert all(placed) and (len(os.sched_getaffinity(0)) < 2 or placed[0] != placed[1])
            lent = lend_cores and len(os.sched_getaffinity(0)) >= 2
            expected = [{placed[0] | placed[1]}] * 2 if lent else [{p} for p in placed]
            assert [affinities(w.process.pid) for w in cluster.workers] == expected
            assert (cluster.log_dir / "cores.lease").exists() == lent
            if lent:  # both idle, so each lends its core to the other: both slots read 0
                lease = CoreLease(cluster.leases[0])  # type: ignore[arg-type]
                deadline = time.monotonic() + 30
                while lease.busy() != [False, False]:
                    assert time.monotonic() < deadline, lease.busy()
                    time.sleep(0.05)
    assert prefill == {"num_blocks": 12, "block_size": 8, "max_num_seqs": 3, "max_num_batched_tokens": 50,
                       "chunked_prefill": 0, "prefix_caching": 1, "threads": 1, "max_step_ms": 0.0}
    tiny_kv_bytes_per_token = 2 * 2 * 2 * 16 * 4  # layers x kv heads x head dim of tests/tiny_models.TINY, f32
    assert decode["num_blocks"] == int(0.25 * 2**20) // (tiny_kv_bytes_per_token * 4)
    assert (decode["block_size"], decode["max_num_seqs"], decode["chunked_prefill"], decode["prefix_caching"],
            decode["max_step_ms"]) == (4, 7, 1, 0, 40.0)  # chunked prefill on by default


@pytest.mark.slow
def test_generate_refuses_a_prompt_larger_than_the_kv_pool(default_gguf: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "disagg_cli", "generate", "--model", str(default_gguf),
                           "--kv-cache-memory-mb", "1", "--max-tokens", "4", "word " * 300],
                          capture_output=True, text=True, timeout=240, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "KV pool" in last and "--kv-cache-memory-mb" in last, proc.stderr
    assert "Traceback" not in proc.stderr
