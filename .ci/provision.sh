#!/usr/bin/env bash
# Prepares the Python environment the tests need and, where its source can be had, ComfyUI v0.8.0 (the host).
# Prints the shell assignments `PYTHON=...` and `COMFYUI_PATH=...` (empty when the host is unavailable) on stdout.
#
# ComfyUI is not on PyPI and its code is never committed here. It comes from, in order: $COMFYUI_PATH; a git
# directory that holds the pinned commit ($COMFYUI_GIT_DIR, or the workplace mirror of pollockjj/ComfyUI, a fork
# that contains the upstream commit), extracted once into the cache.
set -euo pipefail

COMFYUI_COMMIT=3cd7b32f1b7e7e90395cefe7d9f9b1f89276d8ce
CACHE=${BIASMAP_CACHE:-$HOME/.cache/biasmap}
VENV=$CACHE/venv
mkdir -p "$CACHE"
log() { echo "[provision] $*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  python3 -m venv "$VENV"
fi
PY=$VENV/bin/python
# --no-compile: with PYTHONDONTWRITEBYTECODE set (as on these machines), pip's byte-compiling of torch's wheel fails.
PIP="$PY -m pip install -q --disable-pip-version-check --no-compile"

# torch 2.14.1 + torchvision 0.29.1 run on the CPU and are what ComfyUI v0.8.0 imports (it hard-imports torchvision).
$PY -c "import torch, torchvision; assert torch.__version__.startswith('2.14.1')" 2>/dev/null \
  || { log "installing torch 2.14.1 + torchvision 0.29.1"; $PIP torch==2.14.1 torchvision==0.29.1 >&2; }
printf 'torch==2.14.1\ntorchvision==0.29.1\n' > "$CACHE/constraints.txt"

host=${COMFYUI_PATH:-}
if [ -z "$host" ]; then
  git_dir=${COMFYUI_GIT_DIR:-/work/.mirror/pollockjj+ComfyUI/repo}
  target=$CACHE/comfyui-${COMFYUI_COMMIT:0:8}
  if [ -f "$target/comfyui_version.py" ]; then
    host=$target
  elif [ -d "$git_dir" ] && git --git-dir="$git_dir" cat-file -e "$COMFYUI_COMMIT^{commit}" 2>/dev/null; then
    log "extracting ComfyUI ${COMFYUI_COMMIT:0:8} from $git_dir"
    rm -rf "$target.tmp" && mkdir -p "$target.tmp"
    # Mirrors may lack files of 4 MiB and more; SD-family models do not need that one (a Llama tokenizer).
    git --git-dir="$git_dir" archive "$COMFYUI_COMMIT" -- . \
      ':(exclude)comfy/text_encoders/llama_tokenizer/tokenizer.json' 2>/dev/null | tar -x -C "$target.tmp" 2>/dev/null || true
    if [ -f "$target.tmp/comfyui_version.py" ]; then mv "$target.tmp" "$target"; host=$target; fi
  fi
fi

if [ -n "$host" ]; then
  stamp=$CACHE/requirements-$(sha1sum "$host/requirements.txt" | cut -c1-12).done
  if [ ! -f "$stamp" ]; then
    log "installing ComfyUI's requirements (torch pinned; torchaudio and spandrel left out)"
    grep -vE '^(torch|torchvision|torchaudio|spandrel)$' "$host/requirements.txt" > "$CACHE/requirements-filtered.txt"
    # requests is imported by ComfyUI's frontend manager but missing from its requirements.txt.
    $PIP -c "$CACHE/constraints.txt" -r "$CACHE/requirements-filtered.txt" requests >&2
    touch "$stamp"
  fi
fi

root=$(cd "$(dirname "$0")/.." && pwd)
rm -rf "$root/build"  # setuptools' staging folder: a module deleted since would be installed again from it
$PIP -c "$CACHE/constraints.txt" "$root[test]" >&2
echo "PYTHON=$PY"
echo "COMFYUI_PATH=$host"
