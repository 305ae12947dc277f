#!/usr/bin/env bash
# Make the wheels of the peer libraries the GPU machine lacks, for benchmarks/run_gpu.sh to carry.
#
#   benchmarks/peer_wheels.sh [DIR]       (default DIR: .whl/ of the repository, which git ignores)
#
# Run where PyPI is reachable. The GPU machine has no package registry; nflows, zuko and normflows are
# not installed there, so without them the benchmark rows of the peers are "unavailable" skips. Each is
# pure Python: zuko publishes a wheel, nflows and normflows only source archives, which `pip wheel`
# builds here into py3-none-any wheels (~190 KB for the three). Their other needs - torch, numpy,
# matplotlib, tensorboard, tqdm - are on the GPU machine, so --no-deps; the check at the end fails if a
# wheel is not pure Python or needs something outside that list.
#
# Then carry the folder in the device call (`carry: [".whl"]`): run_gpu.sh installs every wheel in it
# offline (pip --no-index --no-deps --target) into a temporary folder it puts on PYTHONPATH.
#
# Environment: FASTDENSITY_PEERS (default "nflows==0.14 zuko==1.6.0 normflows==1.7.3": the versions
# the CPU tests compare against), PYTHON (default python3).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
DIR=${1:-$REPO/.whl}
PY=${PYTHON:-python3}
read -r -a PEERS <<<"${FASTDENSITY_PEERS:-nflows==0.14 zuko==1.6.0 normflows==1.7.3}"
# What the GPU machine has of the peers' needs (/work/.library/device/KINDS.md lists its packages).
ON_GPU_MACHINE=" torch numpy matplotlib tensorboard tqdm "

mkdir -p "$DIR"
for peer in "${PEERS[@]}"; do
    rm -f "$DIR/${peer%%[=<>]*}"-*.whl  # one version of each: two would stop the whole offline install
done
"$PY" -m pip wheel -q --no-deps --wheel-dir "$DIR" "${PEERS[@]}"

bad=0
for peer in "${PEERS[@]}"; do
    name=${peer%%[=<>]*}
    wheels=("$DIR/$name"-*.whl)
    if [ ${#wheels[@]} -ne 1 ] || [ ! -f "${wheels[0]}" ]; then
        echo "$name: expected one wheel in $DIR, found ${#wheels[@]}" >&2; bad=1; continue
    fi
    wheel=${wheels[0]}
    if [[ $wheel != *-none-any.whl ]]; then
        echo "$(basename "$wheel"): not a pure-Python wheel; it would not install on the GPU machine" >&2; bad=1
    fi
    # Requires-Dist lines without an extra marker: what importing the peer needs (the names alone).
    needs=$(unzip -p "$wheel" '*.dist-info/METADATA' |
        sed -n '/^Requires-Dist:/{/extra *==/d;s/^Requires-Dist: *\([A-Za-z0-9_.-]*\).*/\1/p}')
    for need in $needs; do
        if [[ $ON_GPU_MACHINE != *" ${need,,} "* ]]; then
            echo "$(basename "$wheel") needs $need, which the GPU machine lacks: add its wheel" >&2; bad=1
        fi
    done
done
[ $bad -eq 0 ] || exit 1
ls -l "$DIR"/*.whl
echo "total $(cat "$DIR"/*.whl | wc -c) bytes in $DIR"
