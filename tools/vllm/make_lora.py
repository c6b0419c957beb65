"""Write a small LoRA adapter (rank 8 on the attention projections) for the tiny model.

    python tools/vllm/make_lora.py BASE_DIR OUT_DIR [--seed 1]

Needs ``peft`` in the vLLM venv (``tools/vllm/install.sh`` installs it). PEFT initialises ``lora_B`` to
zeros, which would make the adapter a no-op; we fill it with seeded noise so an adapter's output differs
from the base model's. Idempotent: an existing ``adapter_config.json`` is kept unless ``--force``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    if (args.out / "adapter_config.json").is_file() and not args.force:
        print(f"make_lora: {args.out} exists", file=sys.stderr)
        return 0

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(args.seed)
    base = AutoModelForCausalLM.from_pretrained(str(args.base), dtype=torch.float32)
    config = LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(mean=0.0, std=0.5)
    model.save_pretrained(str(args.out))
    print(f"make_lora: wrote {args.out} (rank {args.rank}, seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
