"""Copy a Hugging Face tokenizer directory into the simulator's test data and record transformers' ids.

Run it with the vLLM venv's interpreter (it needs ``transformers``), offline::

    HF_HUB_OFFLINE=1 ~/.cache/igw-vllm/venv/bin/python tools/sim/hf_tokenizer_parity.py \\
        ~/.cache/igw-vllm/tiny-model tests/sim/data/hf-tokenizer

It copies ``tokenizer.json``, ``tokenizer_config.json`` and ``chat_template.jinja`` (those present) from
SRC into OUT, loads OUT with ``AutoTokenizer`` and writes ``OUT/parity.json``: for each completion case
the ids of ``tokenizer(text, add_special_tokens=...)``, and for each chat case the text of
``apply_chat_template(..., tokenize=False)`` and the ids of ``apply_chat_template(..., tokenize=True)``
(which encodes without special tokens, as vLLM's chat does); ``bos_eos_variants`` repeat a few completions
with ``add_bos_token``/``add_eos_token`` set in the config (the tests patch a copy of the directory). ``tests/sim/test_sim_hf_tokenizer.py``
checks that the simulator's ``/tokenize`` gives the same ids. The cases are fixed below; rerun the script
after changing them or the tokenizer.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")

COMPLETIONS: list[dict[str, Any]] = [
    {"text": "Hello world"},
    {"text": "The quick brown fox jumps over the lazy dog."},
    {"text": "  leading spaces, trailing newlines\n\n"},
    {"text": "naïve café — Tokyo 東京 🚀 ünïcödé"},
    {"text": "numbers 1234567 and code: def f(x): return x**2"},
    {"text": "<|im_start|>user\nspecial tokens in a completion<|im_end|>"},
    {"text": "the of to in on as be by or we an"},
    {"text": "Hello world", "add_special_tokens": False},
    {"text": ""},
]

CHATS: list[dict[str, Any]] = [
    {"messages": [{"role": "user", "content": "Hello!"}]},
    {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Japan? 日本"},
        ]
    },
    {"messages": [{"role": "user", "content": "no generation prompt"}], "add_generation_prompt": False},
    {"messages": [{"role": "user", "content": "  spaces\tand\ttabs  \n"}]},
]


BOS_EOS_VARIANTS: list[dict[str, bool]] = [
    {"add_bos_token": False, "add_eos_token": True},
    {"add_bos_token": True, "add_eos_token": True},
    {"add_bos_token": False},
]


def _dump(fixture: dict[str, Any]) -> str:
    """JSON with one case per line (reviewable diffs without one line per token id)."""
    lines = ["{", f' "generator": {json.dumps(fixture["generator"])},']
    keys = ("completions", "chats", "bos_eos_variants")
    for i, key in enumerate(keys):
        cases = [f"  {json.dumps(case, ensure_ascii=False)}" for case in fixture[key]]
        lines += [f' "{key}": [', ",\n".join(cases), " ]" + ("," if i < len(keys) - 1 else "")]
    return "\n".join([*lines, "}"]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="tokenizer directory to copy from")
    parser.add_argument("out", type=Path, help="test data directory to write")
    args = parser.parse_args(argv)
    import transformers  # type: ignore[import-not-found]  # only in the vLLM venv

    AutoTokenizer = transformers.AutoTokenizer

    args.out.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        if (args.src / name).is_file():
            shutil.copyfile(args.src / name, args.out / name)
    tok = AutoTokenizer.from_pretrained(str(args.out))
    completions = []
    for case in COMPLETIONS:
        special = case.get("add_special_tokens", True)
        ids = tok(case["text"], add_special_tokens=special)["input_ids"]
        completions.append({**case, "add_special_tokens": special, "ids": list(ids)})
    chats = []
    for case in CHATS:
        gen = case.get("add_generation_prompt", True)
        text = tok.apply_chat_template(case["messages"], tokenize=False, add_generation_prompt=gen)
        encoded = tok.apply_chat_template(case["messages"], tokenize=True, add_generation_prompt=gen)
        ids = encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded
        chats.append({**case, "add_generation_prompt": gen, "text": text, "ids": list(ids)})
    variants = []
    for config in BOS_EOS_VARIANTS:
        patched = AutoTokenizer.from_pretrained(str(args.out), **config)
        texts = [case["text"] for case in COMPLETIONS[:2]]
        variants.append({"config": config, "texts": texts, "ids": [patched(t)["input_ids"] for t in texts]})
    fixture = {
        "generator": f"tools/sim/hf_tokenizer_parity.py (transformers {transformers.__version__})",
        "completions": completions,
        "chats": chats,
        "bos_eos_variants": variants,
    }
    (args.out / "parity.json").write_text(_dump(fixture), encoding="utf-8")
    print(f"wrote {args.out / 'parity.json'}: {len(completions)} completions, {len(chats)} chats")
    return 0


if __name__ == "__main__":
    sys.exit(main())
