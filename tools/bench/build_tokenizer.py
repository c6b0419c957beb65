"""Build a Hugging Face tokenizer directory that counts tokens like the simulator's toy tokenizer.

Runs inside the inference-perf virtual environment (it needs ``tokenizers``; the project's own
environment does not). ``igw_bench.inference_perf.ensure_tokenizer`` calls it as

    venv-inference-perf/bin/python tools/bench/build_tokenizer.py OUT_DIR < spec.json

with ``spec.json`` = ``{"words": [...], "pattern": "<Python regex of igw_sim.tokenizer pieces>",
"model_max_length": N}``.

The tokenizer splits text with the simulator's piece pattern (a word or one punctuation character
with the whitespace before it), so it yields exactly one token per simulator piece for *any* text
(pieces outside the vocabulary become ``<|unk|>``). The vocabulary holds the special tokens, then
``" " + word`` for every generation word: a client that samples random ids and decodes them
(inference-perf's synthetic data) gets text whose simulator count equals the number of ids, and
the simulator's generated ``" word"`` pieces re-tokenize one to one.

The script checks its own output against Python's ``re`` with the same pattern before saving.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

SPECIALS = ["<|endoftext|>", "<|pad|>", "<|unk|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build(out: Path, words: list[str], pattern: str, model_max_length: int) -> None:
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    for word in words:
        vocab.setdefault(" " + word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    # Oniguruma spells "end of text" \z; Python's \Z means the same.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern.replace(r"\Z", r"\z")), behavior="isolated")
    tok.decoder = decoders.Fuse()  # concatenate pieces as they are (they carry their own spaces)
    tok.add_special_tokens(SPECIALS)
    _self_check(tok, words, pattern)

    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    specials = {"bos_token": SPECIALS[0], "eos_token": SPECIALS[0], "unk_token": SPECIALS[2], "pad_token": SPECIALS[1]}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        "chat_template": CHAT_TEMPLATE,
        **specials,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    # Without bos/eos ids transformers falls back to GPT-2's 50256, which is out of this vocabulary.
    model = {
        "model_type": "gpt2",
        "vocab_size": len(vocab),
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 1,
        "max_position_embeddings": model_max_length,
    }
    (out / "config.json").write_text(json.dumps(model, indent=2) + "\n")


def _self_check(tok: Tokenizer, words: list[str], pattern: str) -> None:
    rng = random.Random(0)
    piece = re.compile(pattern)
    texts = [
        "".join(" " + rng.choice(words) for _ in range(50)),
        "Hello, world!  How are   you?\n\nfine. ",
        "<|user|>\nwhat is the time\n<|assistant|>\n",
        "tabs\tand\nnewlines \n",
    ]
    for text in texts:
        expected = len(piece.findall(text))
        got = len(tok.encode(text, add_special_tokens=False).ids)
        if got != expected:
            raise SystemExit(f"tokenizer self-check failed: {got} tokens, simulator counts {expected}: {text!r}")
    ids = [rng.randrange(len(SPECIALS), tok.get_vocab_size(with_added_tokens=False)) for _ in range(100)]
    text = tok.decode(ids)
    if tok.encode(text, add_special_tokens=False).ids != ids:
        raise SystemExit("tokenizer self-check failed: random ids do not round-trip")


def main() -> None:
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: {sys.argv[0]} OUT_DIR < spec.json")
    spec = json.load(sys.stdin)
    build(Path(sys.argv[1]), list(spec["words"]), str(spec["pattern"]), int(spec["model_max_length"]))


if __name__ == "__main__":
    main()
