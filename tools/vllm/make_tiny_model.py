"""Build a tiny random-weight Llama checkpoint and a byte-level BPE tokenizer, offline and reproducibly.

    python tools/vllm/make_tiny_model.py OUT_DIR [--seed 0] [--vocab 2048]

Run it with the vLLM venv's interpreter (it needs torch, transformers and tokenizers). Nothing is
downloaded: the tokenizer is trained here on a synthetic corpus drawn from a seeded RNG, and the model
weights come from ``torch.manual_seed``. The same seed gives the same token ids on every run, so prompts,
prefix hits and block hashes are reproducible across machines.

What gets written (``save_pretrained`` layout, about 2 MB):

* tokenizer: byte-level BPE (any text encodes, no unknown token), a post-processor that prepends
  ``<|begin_of_text|>`` (id 0); ``<|end_of_text|>`` (1) is EOS, ``<|pad|>`` (2) is padding; a
  ChatML-style chat template ``<|im_start|>{role}\\n{content}<|im_end|>\\n``;
* model: ``LlamaForCausalLM`` with 2 layers, hidden size 128, 4 attention heads over 2 KV heads of
  dimension 32 (vLLM's CPU attention only supports some head sizes; 32 is one), bf16.

A ``igw-tiny-model.json`` file next to the weights records the seed and the sizes; when it matches the
request, the script exits early (idempotent).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

BOS, EOS, PAD, IM_START, IM_END = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|pad|>",
    "<|im_start|>",
    "<|im_end|>",
)
SPECIAL_TOKENS = [BOS, EOS, PAD, IM_START, IM_END]  # ids 0..4, in this order

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_COMMON = """
time person year way day thing man world life hand part child eye woman place work week case point
number group problem fact be have do say get make go know take see come think look want give use find
tell ask seem feel try leave call good new first last long great little own other old right big high
different small large next early young important few public bad same able to of in for on with at by
from up about into over after the and a that I it not he as you this but his they her she or an will
my one all would there their what so out if who which me when can like no just him your some could
them than then now only its also back two how our well even because any these give day most us is
request prompt token cache prefix block router gateway engine model server latency queue batch reply
""".split()  # noqa: SIM905

_META_NAME = "igw-tiny-model.json"


def _corpus(rng: random.Random, n_sentences: int) -> list[str]:
    """English-like sentences over common words and seeded pseudo-words, plus digits and punctuation."""
    alphabet = string.ascii_lowercase
    invented = ["".join(rng.choices(alphabet, k=rng.randint(2, 10))) for _ in range(2500)]
    vocab = _COMMON + invented
    lines = []
    for _ in range(n_sentences):
        words = rng.choices(vocab, k=rng.randint(4, 18))
        if rng.random() < 0.3:
            words[0] = words[0].capitalize()
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 9999)))
        lines.append(" ".join(words) + rng.choice([".", ".", "?", "!", ",", ";", ""]))
    lines.extend([string.digits + " " + string.punctuation] * 40)
    return lines


def build_tokenizer(out: Path, *, seed: int, vocab_size: int):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(rng, 20_000), trainer=trainer)
    bos_id = bpe.token_to_id(BOS)
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=4096,
        chat_template=CHAT_TEMPLATE,
    )
    tok.save_pretrained(str(out))
    return tok


def build_model(out: Path, tok, *, seed: int) -> int:  # type: ignore[no-untyped-def]
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        torch_dtype="bfloat16",
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(out), safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary size (default 2048)")
    parser.add_argument("--force", action="store_true", help="rebuild even when the directory is up to date")
    args = parser.parse_args(argv)
    meta = {"format": 1, "seed": args.seed, "vocab": args.vocab}
    meta_path = args.out / _META_NAME
    if not args.force and meta_path.is_file():
        try:
            if json.loads(meta_path.read_text()).get("request") == meta:
                print(f"make_tiny_model: {args.out} is up to date", file=sys.stderr)
                return 0
        except ValueError:
            pass
    args.out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(args.out, seed=args.seed, vocab_size=args.vocab)
    params = build_model(args.out, tok, seed=args.seed)
    probe = tok("hello world, the gateway routes a request")["input_ids"]
    meta_path.write_text(
        json.dumps({"request": meta, "vocab_size": len(tok), "params": params, "probe_ids": probe}, indent=1) + "\n"
    )
    print(f"make_tiny_model: wrote {args.out} ({params} parameters, vocabulary {len(tok)}); probe ids {probe}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
