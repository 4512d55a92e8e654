"""keel's local model against llama.cpp itself: one tool decision, the same request both ways.

    .venv/bin/python bench/local_model.py [--rounds 5]

Both sides use the one loaded `llama_cpp.Llama` (keel's process-wide instance) and the same
request: the demo's tools as a JSON-schema response format, the demo's system prompt and task,
temperature 0. `keel` is `LocalChatModel.bind_tools(tools).invoke(messages)` (message
conversion, schema, lock, parsing into an `AIMessage` with a tool call); `llama_cpp` is
`Llama.create_chat_completion(**request)` on the request keel builds. Rounds alternate so that
load on the machine hits both alike. Printed: median latency and tokens/s of each; the last line
is `keel_vs_llama_cpp=<median over rounds of keel's time / llama.cpp's time in the same round>`
(goal ≤ 1.05).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("LANGSMITH_TRACING", "false")

from langchain_core.messages import HumanMessage, SystemMessage

from keel.app.demo import DEMO_TASK, SYSTEM_PROMPT, demo_tools
from keel.local_model import local_chat_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    model = local_chat_model()
    start = time.perf_counter()
    loaded = model._loaded()
    print(f"model loaded in {time.perf_counter() - start:.2f} s")
    bound = model.bind_tools(demo_tools())
    messages = [SystemMessage(SYSTEM_PROMPT), HumanMessage(DEMO_TASK)]
    request = model.request(messages, **bound.kwargs)  # type: ignore[attr-defined]

    def keel() -> int:
        answer = bound.invoke(messages)
        assert answer.tool_calls, answer
        return int(answer.usage_metadata["output_tokens"])  # type: ignore[index]

    def direct() -> int:
        with loaded.lock:
            out = loaded.llama.create_chat_completion(**request)
        return int(out["usage"]["completion_tokens"])

    keel(), direct()  # warm-up: both prompts are in llama.cpp's cache alike afterwards
    times: dict[str, list[float]] = {"keel": [], "llama_cpp": []}
    tokens: dict[str, list[int]] = {"keel": [], "llama_cpp": []}
    for i in range(args.rounds):
        order = [("keel", keel), ("llama_cpp", direct)]
        for name, fn in order if i % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            n = fn()
            times[name].append(time.perf_counter() - t0)
            tokens[name].append(n)
    for name in times:
        med = statistics.median(times[name])
        rate = statistics.median(n / t for n, t in zip(tokens[name], times[name], strict=True))
        print(
            f"{name:<10} median {med:.3f} s per tool decision, {rate:.1f} output tokens/s "
            f"({tokens[name][0]} tokens, {args.rounds} rounds)"
        )
    # keel's own work per call, without the model: building the request, parsing the answer
    text = '{"name": "lookup_order", "arguments": {"order_id": "A1001"}}'
    usage = {"input_tokens": 1, "output_tokens": 1, "total_tokens": 2}
    n, t0 = 2000, time.perf_counter()
    for _ in range(n):
        model.request(messages, **bound.kwargs)  # type: ignore[attr-defined]
        model._answer(text, usage, **bound.kwargs)  # type: ignore[arg-type, attr-defined]
    wrapper_ms = (time.perf_counter() - t0) / n * 1000
    print(f"keel's wrapper alone (request + parse, no model): {wrapper_ms:.3f} ms per call")
    # paired: each round's keel time over the same round's llama.cpp time (load moves both)
    ratios = sorted(k / d for k, d in zip(times["keel"], times["llama_cpp"], strict=True))
    print(f"paired ratios per round: {' '.join(f'{r:.3f}' for r in ratios)}")
    print(f"keel_vs_llama_cpp={statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
