#!/usr/bin/env bash
# Downloads, here, the wheels of our runtime dependencies that the GPU machine's image lacks (gguf, ml_collections,
# grain and grain's array_record and portpicker; the image has the rest, see the device README's package list) into
# bench/wheels/ (ignored by git), at the versions installed in our .venv, for that machine's Python (3.12, x86-64).
# bench/gpu_check.sh installs them there when the device tool carries the folder: carry=["bench/wheels"].
# Usage: bash bench/gpu_wheels.sh [PACKAGE ...]     (PYTHON=... to read the versions from another interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
packages=("$@")
[ "${#packages[@]}" -gt 0 ] || packages=(gguf ml_collections grain array_record portpicker)
LIMIT_MIB=32  # the device tool carries 64 MiB in all, the working tree included

pins=()
for name in "${packages[@]}"; do
  version=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name") || {
    echo "gpu_wheels: $name is not installed in $PY: cannot pin its version" >&2; exit 2; }
  pins+=("$name==$version")
done
rm -rf bench/wheels
mkdir -p bench/wheels
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d bench/wheels "${pins[@]}"
ls -l bench/wheels
total_kib=$(du -sk bench/wheels | cut -f1)
echo "gpu_wheels: ${pins[*]} -> bench/wheels (${total_kib} KiB)"
if [ "$total_kib" -gt $((LIMIT_MIB * 1024)) ]; then
  echo "gpu_wheels: more than $LIMIT_MIB MiB: the device tool carries 64 MiB in all" >&2; exit 1
fi
