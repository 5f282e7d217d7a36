"""`disagg generate`'s served path is a front end over the coordinator service: its prompts are
refused by the service before any worker starts, its requests are the service's, and the service
stops its cluster with every KV block free. Run in this process, on a real local cluster."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from disagg_cli import generate
from disagg_cli.config import EngineConfig, RuntimeConfig, SamplingParams
from disagg_cli.coordinator.service import CoordinatorService
from disagg_cli.errors import ContextLengthError
from disagg_cli.generate import GenerateOptions, run_generate
from disagg_cli.model.registry import default_cache_dir

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


class RecordingService(CoordinatorService):
    """The real service, remembering what generate asked of it and the KV blocks before it stopped."""

    made: list[RecordingService] = []

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.started = False
        self.submitted: list[tuple[str, list[int]]] = []
        self.blocks_at_stop: dict[str, tuple[int, int]] = {}
        RecordingService.made.append(self)

    async def start(self) -> None:
        self.started = True
        await super().start()

    def submit_output(self, out):  # type: ignore[no-untyped-def]
        self.submitted.append((out.request_id, list(out.prompt_token_ids)))
        return super().submit_output(out)

    async def stop(self, drain_timeout_s: float = 60.0) -> None:
        if self.coordinator is not None:
            self.blocks_at_stop = await self.kv_blocks()
        await super().stop(drain_timeout_s)


@pytest.fixture
def recording(monkeypatch: pytest.MonkeyPatch) -> type[RecordingService]:
    RecordingService.made = []
    monkeypatch.setattr(generate, "CoordinatorService", RecordingService)
    return RecordingService


def options(model: Path, max_tokens: int) -> GenerateOptions:
    return GenerateOptions(str(model), default_cache_dir(), RuntimeConfig(dtype="float32", quantization="none"),
                           SamplingParams(max_tokens=max_tokens), EngineConfig(), json_output=True)


def test_prompts_run_through_the_service(default_gguf: Path, recording: type[RecordingService],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    prompts = ["The capital of France is", "One, two, three,"]
    outs = run_generate(prompts, options(default_gguf, 6))
    (service,) = recording.made
    assert service.started and service.config.wait_for_workers and service.cluster is None  # stopped
    assert service.submitted == [("req-0", service.tokenize(prompts[0])), ("req-1", service.tokenize(prompts[1]))]
    assert [o.request_id for o in outs] == ["req-0", "req-1"] and [o.prompt for o in outs] == prompts
    assert outs[0].token_ids[:2] == [7042, 30]  # " Paris", "."
    assert [len(o.token_ids) for o in outs] == [6, 6] and all(o.finish_reason == "length" for o in outs)
    blocks = service.blocks_at_stop
    assert len(blocks) == 2 and all(free == total > 0 for free, total in blocks.values()), blocks
    # --json: one object per prompt, in prompt order, the same as the outputs returned.
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["request_id"], r["prompt"], r["token_ids"]) for r in records] == [
        (o.request_id, o.prompt, o.token_ids) for o in outs]


def test_a_prompt_past_the_context_is_refused_before_any_worker_starts(
        default_gguf: Path, recording: type[RecordingService]) -> None:
    with pytest.raises(ContextLengthError, match=r"context is 8192 tokens, but 8251 were asked for \(101 in"):
        run_generate(["hello", "word " * 100], options(default_gguf, 8150))
    (service,) = recording.made
    assert not service.started and service.cluster is None and service.submitted == []
