#!/usr/bin/env bash
# Fills the git-ignored .carry/ for bench/gpu_check.py on a GPU machine that receives only the checkout and has no
# package registry: ../shared's data pack, referee and its Inception network (prepare_device_carry.sh), and the wheel
# of torch-fidelity at the version requirements.txt pins (85 kB, pure Python: imported from the wheel there).
# Then move models/*.pt out of the tree for the call: checkout and .carry must stay under 64 MiB.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
../shared/tools/prepare_device_carry.sh
pip download --quiet --no-deps --dest .carry "$(grep -i '^torch-fidelity' requirements.txt)"
ls -l .carry
