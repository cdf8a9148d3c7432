#!/usr/bin/env bash
# Install carried FlashInfer wheels without a network, into a private folder.
#
#   bash bench/flashinfer_setup.sh FI_WHEEL_DIR DEP_WHEEL_DIR [TARGET=/tmp/site]
#   export PYTHONPATH=TARGET:$PYTHONPATH   # then: python3 -m bench.run --flashinfer ...
#
# FI_WHEEL_DIR holds flashinfer_python-*.whl, DEP_WHEEL_DIR the small dependencies
# the GPU machine lacks (apache-tvm-ffi, cuda-python, cuda-tile, nccl4py,
# nvidia-cudnn-frontend). Nothing is downloaded: pip runs with --no-index --no-deps.
# If pip is missing or refuses a wheel, the wheels are unzipped instead (none of
# them has a .data folder, so that is the same install). Afterwards it prints
# flashinfer's version and any of its declared dependencies that are still missing.
set -euo pipefail

if [[ $# -lt 2 ]]; then
    echo "usage: $0 FI_WHEEL_DIR DEP_WHEEL_DIR [TARGET=/tmp/site]" >&2
    exit 2
fi
fi_dir=$1
dep_dir=$2
target=${3:-/tmp/site}
py=${PYTHON:-python3}

shopt -s nullglob
wheels=("$fi_dir"/*.whl "$dep_dir"/*.whl)
if [[ ${#wheels[@]} -eq 0 ]]; then
    echo "no .whl files in $fi_dir or $dep_dir" >&2
    exit 1
fi
mkdir -p "$target"
echo "installing ${#wheels[@]} wheels into $target"

if ! "$py" -m pip install --quiet --no-index --no-deps --upgrade --target "$target" "${wheels[@]}"; then
    echo "pip install failed or pip is missing: unzipping the wheels instead" >&2
    "$py" - "$target" "${wheels[@]}" <<'EOF'
import sys
import zipfile

target, wheels = sys.argv[1], sys.argv[2:]
for wheel in wheels:
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(target)
    print(f"unzipped {wheel}")
EOF
fi

PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}" "$py" - <<'EOF'
import importlib.metadata as md
import re

import flashinfer

print(f"import flashinfer: version {flashinfer.__version__} from {flashinfer.__file__}")
missing = []
for req in md.requires("flashinfer-python") or []:
    if "extra ==" in req:
        continue
    name = re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0]
    try:
        md.version(name)
    except md.PackageNotFoundError:
        missing.append(name)
print("declared dependencies not installed:", ", ".join(missing) if missing else "none")
EOF
echo "now: export PYTHONPATH=$target:\$PYTHONPATH"
