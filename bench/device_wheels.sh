#!/usr/bin/env bash
# Wheels for a GPU machine with no internet whose Python (3.12, x86-64) already has torch and the common
# packages (the lent machines' image): what requirements.txt needs beyond those, downloaded here into .whl/
# (git-ignored), small enough to travel with the working tree (~50 MB). bench/cuda_check.sh installs them
# there (into /tmp/site, on PYTHONPATH) when .whl/ is present.
#
#     bash bench/device_wheels.sh [PYTHON]     # here, where pip can download; PYTHON: default .venv/bin/python
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
# packages of the closure the machine's image has (its own versions are kept): not downloaded
ON_IMAGE="attrs certifi charset-normalizer click filelock idna iniconfig jinja2 markdown markupsafe networkx numpy
packaging pillow pluggy protobuf psutil pybind11 pygments pytest python-dateutil pyyaml requests setuptools six
sortedcontainers tqdm typing-extensions urllib3 h5py matplotlib tensorboard tifffile torch"
rm -rf .whl && mkdir .whl
"$PY" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "$(grep '^cloud-volume==' requirements.txt)" "$(grep '^task-queue==' requirements.txt)"
for wheel in .whl/*.whl; do  # a wheel's name: its distribution, lower case, '_' for '-' (PEP 427)
    name=$(basename "$wheel" | cut -d- -f1 | tr 'A-Z_' 'a-z-')
    if [[ " $(echo $ON_IMAGE) " == *" $name "* ]]; then rm "$wheel"; fi
done
echo "$(ls .whl | wc -l) wheels, $(du -sh .whl | cut -f1) in .whl/"
