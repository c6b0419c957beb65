"""Check the parity fixture against a running vLLM engine's ``POST /tokenize`` (stdlib only).

    python tools/vllm/serve.py start --run-dir /tmp/igw-tok --ports 18190
    python tools/tokenizer/check_engine.py --url http://127.0.0.1:18190 --model tiny
    python tools/vllm/serve.py stop --run-dir /tmp/igw-tok

Only the fixture's ``base`` variant is checked (the engine serves the model's own files). The
completion form sends ``{"model", "prompt"}``; the chat form sends the messages with the case's
``add_generation_prompt``, ``continue_final_message``, ``tools`` and ``chat_template_kwargs``.
Exit status 1 when any case differs.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from pathlib import Path
from typing import Any

FIXTURE = Path(__file__).resolve().parents[2] / "tests/unit/data/tokenizer-parity/parity.json"


def tokenize(url: str, body: dict[str, Any]) -> list[int]:
    request = urllib.request.Request(
        f"{url}/tokenize", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        tokens: list[int] = json.load(response)["tokens"]
        return tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:18190")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--fixture", type=Path, default=FIXTURE)
    args = parser.parse_args()

    cases = [c for c in json.loads(args.fixture.read_text(encoding="utf-8"))["cases"] if c["variant"] == "base"]
    failures = 0
    for case in cases:
        body: dict[str, Any] = {"model": args.model}
        if case["kind"] == "completion":
            body["prompt"] = case["prompt"]
        else:
            body["messages"] = case["messages"]
            body["add_generation_prompt"] = case.get("add_generation_prompt", True)
            body["continue_final_message"] = case.get("continue_final_message", False)
            for key in ("tools", "chat_template_kwargs"):
                if case.get(key) is not None:
                    body[key] = case[key]
        try:
            got = tokenize(args.url, body)
        except Exception as exc:
            print(f"ERROR {case['kind']} {case['name']}: {exc}")
            failures += 1
            continue
        same = got == case["ids"]
        failures += not same
        print(f"{'ok  ' if same else 'DIFF'} {case['kind']:10s} {case['name']} ({len(got)} tokens)")
    print(f"{len(cases) - failures}/{len(cases)} cases identical")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
