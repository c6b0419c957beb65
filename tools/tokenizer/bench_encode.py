"""Time ``igw.parsing.tokenizer`` on a 16 KiB prompt: cold, cached, and a new turn on a cached prefix.

    .venv/bin/python tools/tokenizer/bench_encode.py [--model-dir tests/unit/data/tokenizer-parity/model]

Single-threaded, a few dozen repetitions (medians): it is meant to run beside other work. "cold"
uses a fresh cache for every repetition, so it includes cutting and hashing; "raw" is the
tokenizers library encoding the whole text at once, the floor igw adds its work to.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from igw.parsing.tokenizer import PieceCache, Tokenizer, TokenizerSettings

PARAGRAPH = (
    "The scheduler scores every candidate endpoint; prefix affinity dominates when prompts share "
    "long system prompts.\nQueue depth and KV-cache usage break ties.\n"
    "def score(endpoint):\n    return 2 * endpoint.prefix_hit + endpoint.free_kv - endpoint.queue\n\n"
)


def make_text(size: int) -> str:
    text = ""
    i = 0
    while len(text.encode()) < size:
        text += f"[{i}] " + PARAGRAPH
        i += 1
    return text.encode()[:size].decode(errors="ignore")


def median_ms(fn: Callable[[], object], reps: int) -> float:
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=Path("tests/unit/data/tokenizer-parity/model"))
    parser.add_argument("--size", type=int, default=16 * 1024, help="prompt bytes")
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()

    settings = TokenizerSettings()
    tok = Tokenizer.from_dir(args.model_dir, settings=settings)
    text = make_text(args.size)
    ids = tok.encode_completion(text)
    assert ids == tok._backend.encode(text, add_special_tokens=True).ids
    turn = "\nUser follow-up question about the scores above?\n"

    def cold() -> None:
        tok.cache = PieceCache(settings.prefix_cache_max_tokens)
        tok.encode_completion(text)

    messages = [{"role": "system", "content": text}, {"role": "user", "content": "Summarise."}]

    def chat_cold() -> None:
        tok.cache = PieceCache(settings.prefix_cache_max_tokens)
        tok.encode_chat(messages)

    rows = [
        ("raw tokenizers encode (whole text)", median_ms(lambda: tok._backend.encode(text), args.reps)),
        ("encode_completion cold (fresh cache)", median_ms(cold, args.reps)),
    ]
    tok.encode_completion(text)
    rows.append(("encode_completion cached", median_ms(lambda: tok.encode_completion(text), args.reps)))
    turns = iter(range(10**9))
    # A different turn each time: the tail piece (up to 2 x segment_chars) is a cache miss.
    rows.append(
        (
            "cached prefix + new turn",
            median_ms(lambda: tok.encode_completion(text + turn + str(next(turns))), args.reps),
        )
    )
    rows.append(("encode_chat cold (render + encode)", median_ms(chat_cold, args.reps)))
    tok.encode_chat(messages)
    rows.append(("encode_chat cached", median_ms(lambda: tok.encode_chat(messages), args.reps)))
    rows.append(("render_chat only", median_ms(lambda: tok.render_chat(messages), args.reps)))

    print(
        f"{len(text.encode())} bytes, {len(ids)} tokens, splittable={tok.splittable}, segment_chars={settings.segment_chars}"
    )
    for name, ms in rows:
        print(f"  {name:40s} {ms:8.3f} ms")


if __name__ == "__main__":
    main()
