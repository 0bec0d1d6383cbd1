"""The chat server's padded batches: 8 clients at once against the same 8 requests one at a time (helpers.serve).

Usage: python benchmarks/serve_batching.py [--clients 8] [--max-tokens 64] [--rounds 3] [--windows-ms 10 50]
       [--width 256] [--layers 4] [--device cpu] [--threads N] [--stream]

A server runs in this process on a free port with a small GPT-2-shaped model (random weights, GPT-2's
initialisation, GPT-2's tokenizer). The same ``--clients`` chat requests, prompts of different lengths,
greedy, ``--max-tokens`` each, are sent two ways, in alternation for ``--rounds`` rounds:

- one at a time: each request waits for the previous answer;
- concurrently: one thread per client, all released together; the worker answers those that arrive within
  its batch window (``--windows-ms``, one row each; the server's default is 10 ms) in one padded batch; the
  later ones join that batch between two steps (each group of joiners prefilled on its own).

Tokens/s is every answer's completion tokens over the wall time of the whole set; CPU time (the whole
process: server, worker and clients) moves less than wall time on a shared machine. Such a model never
emits end-of-text, so every answer runs to ``--max-tokens`` and no row leaves its batch early. Every
concurrent answer is checked against its one-at-a-time answer before the table is printed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import threading
import time

import torch
from _common import print_report, random_gpt2

from helpers.chat_models import ChatModel, alpaca_prompt
from helpers.model import count_parameters
from helpers.serve import ChatServer, make_server
from helpers.tokenizers import gpt2_tokenizer

MESSAGES = [
    "Hi.",
    "Name a colour.",
    "What is the capital of France?",
    "Rewrite this sentence in the passive voice: the cat chased the mouse.",
    "Give me three tips for staying focused while studying for a long exam.",
    "Translate into German: the weather is lovely today, so let us walk to the river after lunch.",
    "Summarise in one sentence why the sky looks blue during the day and red at sunset, for a child.",
    "Write a short, friendly email to a colleague asking whether the meeting on Thursday can move to Friday "
    "afternoon, and offer two possible times.",
]


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = random_gpt2(args.width, args.layers, args.device)
    cfg = model.cfg
    tokenizer = gpt2_tokenizer()
    chat_model = ChatModel("bench", model, tokenizer, alpaca_prompt, frozenset({tokenizer.eot_token}))
    bodies = [{"messages": [{"role": "user", "content": MESSAGES[index % len(MESSAGES)]}],
               "max_tokens": args.max_tokens, "temperature": 0, "stream": args.stream} for index in range(args.clients)]
    server = make_server(chat_model, port=0, max_batch=args.clients, quiet=True).start()
    try:
        one_at_a_time(server, bodies[:2])  # warm-up
        ways = {"one at a time": (one_at_a_time, 0.01)}
        for window in args.windows_ms:
            ways[f"concurrently, window {window:g} ms"] = (concurrently, window / 1000)
        walls: dict[str, list[float]] = {name: [] for name in ways}
        cpus: dict[str, list[float]] = {name: [] for name in ways}
        batches: dict[str, list[str]] = {name: [] for name in ways}
        tokens: dict[str, int] = {}
        answers: dict[str, list[str]] = {}
        for _ in range(args.rounds):
            for name, (run, window) in ways.items():
                server.worker.window_s = window
                before = server.worker.snapshot()
                start, start_cpu = time.perf_counter(), time.process_time()
                results = run(server, bodies)
                walls[name].append(time.perf_counter() - start)
                cpus[name].append(time.process_time() - start_cpu)
                after = server.worker.snapshot()
                batches[name].append(f"{after['batches'] - before['batches']}"
                                     + (f" (+{after['joined'] - before['joined']} joined)"
                                        if after["joined"] > before["joined"] else ""))
                tokens[name], answers[name] = sum(r[1] for r in results), [r[0] for r in results]
    finally:
        server.close()
    wall = {name: statistics.median(values) for name, values in walls.items()}
    cpu = {name: statistics.median(values) for name, values in cpus.items()}
    rate = {name: tokens[name] / wall[name] for name in wall}
    prompts = [len(chat_model.encode_prompt(body["messages"])) for body in bodies]
    description = (f"model: {count_parameters(model) / 1e6:.1f}M parameters (width {cfg.emb_dim}, {cfg.n_layers} "
                   f"layers, tied head), {args.device}; {args.clients} requests, prompts of {min(prompts)}-"
                   f"{max(prompts)} tokens, {args.max_tokens} new tokens each, greedy, "
                   f"{'streamed' if args.stream else 'whole answers'}; median of {args.rounds} round(s)\n"
                   f"answers identical to one at a time: "
                   f"{all(answer == answers['one at a time'] for answer in answers.values())}")
    base = "one at a time"
    print_report(description, ["requests", "batches per round", "wall s", "tokens/s", "speed-up", "CPU s",
                               "speed-up in CPU time"],
                 [[name, ", ".join(batches[name]), f"{wall[name]:.2f}", f"{rate[name]:.1f}",
                   f"{rate[name] / rate[base]:.2f}x", f"{cpu[name]:.2f}", f"{cpu[base] / cpu[name]:.2f}x"]
                  for name in wall])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--windows-ms", type=float, nargs="+", default=[10, 50],
                        help="batch windows to measure the concurrent clients with")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--stream", action="store_true", help="ask for streamed answers (server-sent events)")
    return parser.parse_args()


def ask(server: ChatServer, body: dict) -> tuple[str, int]:
    """One request's answer text and completion tokens (a streamed answer's pieces joined)."""
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=600)
    try:
        connection.request("POST", "/v1/chat/completions", body=json.dumps({**body, "stream_options": {
            "include_usage": True}} if body["stream"] else body), headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        data = response.read().decode()
    finally:
        connection.close()
    if response.status != 200:
        raise RuntimeError(f"the server answered HTTP {response.status}: {data[:200]}")
    if not body["stream"]:
        answer = json.loads(data)
        return answer["choices"][0]["message"]["content"], answer["usage"]["completion_tokens"]
    events = [json.loads(event[6:]) for event in data.split("\n\n") if event.startswith("data: {")]
    text = "".join(event["choices"][0]["delta"].get("content", "") for event in events if event["choices"])
    return text, events[-1]["usage"]["completion_tokens"]


def one_at_a_time(server: ChatServer, bodies: list[dict]) -> list[tuple[str, int]]:
    return [ask(server, body) for body in bodies]


def concurrently(server: ChatServer, bodies: list[dict]) -> list[tuple[str, int]]:
    results: list[tuple[str, int] | None] = [None] * len(bodies)
    barrier = threading.Barrier(len(bodies))

    def client(index: int) -> None:
        barrier.wait()
        results[index] = ask(server, bodies[index])

    threads = [threading.Thread(target=client, args=(index,)) for index in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if any(result is None for result in results):
        raise RuntimeError("a client thread failed; see its traceback above")
    return results


if __name__ == "__main__":
    main()
