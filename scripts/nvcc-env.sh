# Source this file: it installs the pinned CUDA 13.0 nvcc from PyPI into a venv (once; about
# 100 MB, seconds) and exports NVCC for build.rs, which then compiles kernels/*.cu to PTX for
# compute_80 and compute_90a (SPEC §7). Pinned to 13.0: PTX from a newer nvcc is refused by a
# CUDA 13.0 driver (the lent H200's). The venv lives in $KD_NVCC_VENV (default: the user cache).
KD_NVCC_VENV=${KD_NVCC_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/kd-engine/nvcc-13.0.88}
kd_find_nvcc() { ls "$KD_NVCC_VENV"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc 2>/dev/null | head -1; }
if [ -z "$(kd_find_nvcc)" ]; then
  echo "installing the pinned nvcc into $KD_NVCC_VENV" >&2
  python3 -m venv "$KD_NVCC_VENV" >&2
  "$KD_NVCC_VENV/bin/python" -m pip install -q --disable-pip-version-check \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 >&2
fi
NVCC="$(kd_find_nvcc)"
if [ -z "$NVCC" ] || [ ! -x "$NVCC" ]; then
  echo "the pinned nvcc did not install into $KD_NVCC_VENV" >&2
  return 1 2>/dev/null || exit 1
fi
export NVCC
