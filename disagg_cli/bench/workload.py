"""Benchmark workloads: which prompts are sent, with how many output tokens, and when.

A workload is a list of `BenchRequest` (prompt token ids, output length, send time relative to the
start, kind) built once from a seed, so every mode of one run replays exactly the same requests.
- random (vLLM's `--dataset-name random`): lengths uniform in [len·(1−r), len·(1+r)], prompt ids
  drawn uniformly from the vocabulary without special tokens, so they decode to text;
- sharegpt: the first human turn is the prompt, the token count of the first gpt turn the output
  length; too short (< 4 tokens) or too long (prompt > 1024, or prompt + output > 2048) pairs are
  skipped, as vLLM does;
- interference: a steady stream of short decode-heavy requests, with a long prompt arriving every
  `long_interval_s` seconds, the case where a colocated prefill stalls running decodes;
- prefix: requests opening with one of K shared prefixes (round-robin), then a random suffix;
- shifting: phases of `SHIFTING_PHASES` back to back, `phase_s` seconds each (prefill-heavy: long
  prompts, few output tokens; decode-heavy: short prompts, long outputs; mixed), each request's
  kind its phase's name: the traffic mix a fixed prefill:decode split cannot follow;
- multi-turn: conversations that share one system prompt and grow turn by turn. A later turn's
  prompt is only known once the turn before it is answered, so its `prompt_ids` hold just the new
  user message and `follows` names the previous turn: the driver (`bench/replay.py`) sends the
  previous turn's prompt ids + the ids it generated + that message (no retokenizing, so a prefix
  cache can reuse the history exactly).
Send times follow vLLM: intervals gamma-distributed with shape `burstiness` and mean 1/rate
(burstiness 1 is a Poisson process); rate `inf` sends everything at once.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from disagg_cli.errors import UsageError

if TYPE_CHECKING:
    from disagg_cli.model.tokenizer import Tokenizer

SHAREGPT_MIN_LEN = 4
SHAREGPT_MAX_PROMPT = 1024
SHAREGPT_MAX_TOTAL = 2048


@dataclass(frozen=True, slots=True)
class BenchRequest:
    prompt_ids: tuple[int, ...]
    output_len: int
    send_s: float  # seconds after the benchmark starts
    kind: str = "main"  # "short" / "long" (interference), "turn1", "turn2", … (multi-turn)
    # Multi-turn: index of the previous turn in the workload; `prompt_ids` are then only the new
    # message, appended to that turn's prompt and output (`next_prompt`).
    follows: int | None = None


def arrival_offsets(num: int, rate: float, burstiness: float, rng: random.Random) -> list[float]:
    """Send times (s from the start) of `num` requests: gamma intervals of mean 1/rate, the first at 0."""
    if math.isinf(rate):
        return [0.0] * num
    theta = 1.0 / (rate * burstiness)
    offsets, t = [], 0.0
    for _ in range(num):
        offsets.append(t)
        t += rng.gammavariate(burstiness, theta)
    return offsets


def _lengths(mean_len: int, range_ratio: float, num: int, rng: random.Random) -> list[int]:
    lo = max(1, int(mean_len * (1 - range_ratio)))
    hi = max(lo, int(mean_len * (1 + range_ratio)))
    return [rng.randint(lo, hi) for _ in range(num)]


def text_token_ids(tokenizer: Tokenizer) -> list[int]:
    """Vocabulary ids that are not special tokens (what random prompts are drawn from)."""
    special = {i for i, tok in tokenizer.backend.get_added_tokens_decoder().items() if tok.special}
    return [i for i in range(tokenizer.vocab_size) if i not in special]


def random_prompts(tokenizer: Tokenizer, input_lens: list[int], rng: random.Random) -> list[tuple[int, ...]]:
    pool = text_token_ids(tokenizer)
    return [_draw(pool, n, rng) for n in input_lens]


def _draw(pool: list[int], n: int, rng: random.Random) -> tuple[int, ...]:
    return tuple(rng.choice(pool) for _ in range(n))


def random_workload(tokenizer: Tokenizer, num: int, input_len: int, output_len: int, range_ratio: float,
                    rate: float, burstiness: float, seed: int) -> list[BenchRequest]:
    rng = random.Random(seed)
    input_lens = _lengths(input_len, range_ratio, num, rng)
    output_lens = _lengths(output_len, range_ratio, num, rng)
    prompts = random_prompts(tokenizer, input_lens, rng)
    sends = arrival_offsets(num, rate, burstiness, rng)
    return [BenchRequest(p, o, s) for p, o, s in zip(prompts, output_lens, sends, strict=True)]


def sharegpt_workload(tokenizer: Tokenizer, path: Path, num: int, rate: float, burstiness: float,
                      seed: int, output_len: int | None = None) -> list[BenchRequest]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"--dataset-path {path}: cannot read a ShareGPT JSON file ({e})") from None
    if not isinstance(data, list):
        raise UsageError(f"--dataset-path {path}: expected a JSON list of {{\"conversations\": [...]}} objects")
    pairs = []
    for item in data:
        turns = item.get("conversations") if isinstance(item, dict) else None
        if isinstance(turns, list) and len(turns) >= 2 and all(isinstance(t, dict) for t in turns[:2]):
            prompt, answer = turns[0].get("value"), turns[1].get("value")
            if isinstance(prompt, str) and isinstance(answer, str):
                pairs.append((prompt, answer))
    rng = random.Random(seed)
    rng.shuffle(pairs)
    chosen: list[tuple[tuple[int, ...], int]] = []
    for prompt, answer in pairs:
        if len(chosen) == num:
            break
        ids = tuple(tokenizer.encode(prompt))
        out_len = output_len if output_len is not None else len(tokenizer.encode(answer, add_bos=False))
        if len(ids) < SHAREGPT_MIN_LEN or out_len < SHAREGPT_MIN_LEN:
            continue
        if len(ids) > SHAREGPT_MAX_PROMPT or len(ids) + out_len > SHAREGPT_MAX_TOTAL:
            continue
        chosen.append((ids, out_len))
    if len(chosen) < num:
        raise UsageError(f"--dataset-path {path}: only {len(chosen)} usable conversations (of {len(pairs)}) for "
                         f"--num-prompts {num}; lower --num-prompts or use a bigger file")
    sends = arrival_offsets(num, rate, burstiness, rng)
    return [BenchRequest(ids, o, s) for (ids, o), s in zip(chosen, sends, strict=True)]


def interference_workload(tokenizer: Tokenizer, num_short: int, short_input_len: int, short_output_len: int,
                          long_input_len: int, long_output_len: int, long_interval_s: float, rate: float,
                          burstiness: float, seed: int) -> list[BenchRequest]:
    """`num_short` short requests at `rate`; long prompts every `long_interval_s` seconds while they
    run (the first one interval in, once decodes are under way), sorted by send time."""
    if math.isinf(rate):
        raise UsageError("--workload interference needs a finite --request-rate: a steady stream of short requests")
    rng = random.Random(seed)
    sends = arrival_offsets(num_short, rate, burstiness, rng)
    shorts = random_prompts(tokenizer, [short_input_len] * num_short, rng)
    requests = [BenchRequest(p, short_output_len, s, "short") for p, s in zip(shorts, sends, strict=True)]
    # Short requests keep decoding for a while after the last one is sent; cover that span too.
    num_long = max(1, int(sends[-1] // long_interval_s))
    longs = random_prompts(tokenizer, [long_input_len] * num_long, rng)
    requests += [BenchRequest(p, long_output_len, (i + 1) * long_interval_s, "long") for i, p in enumerate(longs)]
    return sorted(requests, key=lambda r: r.send_s)


@dataclass(frozen=True, slots=True)
class Phase:
    name: str
    input_len: int
    output_len: int
    rate: float  # requests/s (before --request-rate scales it)


# Sized for SmolLM2-135M on 2 cores (prefill ~700–1,800 tok/s, a decode step 5–50 ms), so each phase
# loads one side past what one worker of a fixed 1P+1D split does: ~770 prompt tok/s, then ~26
# requests decoding 192 tokens each at once, then both sides at half that.
SHIFTING_PHASES = (
    Phase("prefill-heavy", 1024, 4, 0.75),
    Phase("decode-heavy", 32, 192, 1.5),
    Phase("mixed", 384, 48, 1.0),
)
DEFAULT_PHASE_S = 40.0


def shifting_workload(tokenizer: Tokenizer, phase_s: float, rate_scale: float, burstiness: float, seed: int,
                      phases: tuple[Phase, ...] = SHIFTING_PHASES) -> list[BenchRequest]:
    """Each phase's requests at its rate × `rate_scale`, sent within its `phase_s` seconds, phase
    after phase; a request's kind is its phase's name."""
    if math.isinf(rate_scale) or not rate_scale > 0:
        raise UsageError(f"--workload shifting scales its phases' rates by --request-rate: give a positive finite "
                         f"number (1: as designed), got {rate_scale}")
    rng = random.Random(seed)
    pool = text_token_ids(tokenizer)
    requests: list[BenchRequest] = []
    for i, phase in enumerate(phases):
        start, t = i * phase_s, 0.0
        theta = 1.0 / (phase.rate * rate_scale * burstiness)
        while t < phase_s:
            requests.append(BenchRequest(_draw(pool, phase.input_len, rng), phase.output_len, start + t, phase.name))
            t += rng.gammavariate(burstiness, theta)
    return requests


def phase_spans(phase_s: float, phases: tuple[Phase, ...] = SHIFTING_PHASES) -> list[tuple[str, float, float]]:
    """(name, start s, end s) of each phase's sending window."""
    return [(p.name, i * phase_s, (i + 1) * phase_s) for i, p in enumerate(phases)]


def prefix_workload(tokenizer: Tokenizer, num: int, num_prefixes: int, prefix_len: int, input_len: int,
                    output_len: int, rate: float, burstiness: float, seed: int) -> list[BenchRequest]:
    """`num` requests at `rate`: request i opens with prefix i mod `num_prefixes` (`prefix_len`
    tokens each), then `input_len` tokens of its own."""
    rng = random.Random(seed)
    pool = text_token_ids(tokenizer)
    prefixes = [_draw(pool, prefix_len, rng) for _ in range(num_prefixes)]
    suffixes = [_draw(pool, input_len, rng) for _ in range(num)]
    sends = arrival_offsets(num, rate, burstiness, rng)
    return [BenchRequest(prefixes[i % num_prefixes] + suffix, output_len, send)
            for i, (suffix, send) in enumerate(zip(suffixes, sends, strict=True))]


def multi_turn_workload(tokenizer: Tokenizer, num_conversations: int, num_turns: int, prefix_len: int,
                        input_len: int, output_len: int, rate: float, burstiness: float,
                        seed: int) -> list[BenchRequest]:
    """`num_conversations` chats arriving at `rate`, `num_turns` turns each, conversation by
    conversation: turn 1 is the shared system prompt (`prefix_len` tokens) + a user message of
    `input_len` tokens; every later turn adds the previous answer and a new message of `input_len`
    tokens, and is sent once that answer is complete (its `send_s` is its conversation's arrival)."""
    rng = random.Random(seed)
    pool = text_token_ids(tokenizer)
    system = _draw(pool, prefix_len, rng)
    sends = arrival_offsets(num_conversations, rate, burstiness, rng)
    requests: list[BenchRequest] = []
    for send in sends:
        requests.append(BenchRequest(system + _draw(pool, input_len, rng), output_len, send, "turn1"))
        for turn in range(2, num_turns + 1):
            requests.append(BenchRequest(_draw(pool, input_len, rng), output_len, send, f"turn{turn}",
                                         follows=len(requests) - 1))
    return requests


def conversations(workload: list[BenchRequest]) -> list[list[int]]:
    """The workload's indices in chains that must be sent in order: a request with no `follows`
    starts one, every follow-up joins the chain of the turn it follows (a single request is a chain
    of one)."""
    chains: list[list[int]] = []
    chain_of: dict[int, int] = {}
    for i, req in enumerate(workload):
        if req.follows is None:
            chain_of[i] = len(chains)
            chains.append([i])
            continue
        assert req.follows < i and chains[chain_of[req.follows]][-1] == req.follows, \
            f"request {i} must follow the last turn of its conversation, not request {req.follows}"
        chain_of[i] = chain_of[req.follows]
        chains[chain_of[i]].append(i)
    return chains


def next_prompt(prompt_ids: list[int], generated_ids: list[int], req: BenchRequest) -> list[int]:
    """A follow-up turn's prompt: the previous turn's prompt, what it generated, the new message."""
    return [*prompt_ids, *generated_ids, *req.prompt_ids]
