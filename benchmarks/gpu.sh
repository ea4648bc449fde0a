#!/usr/bin/env bash
# One prepared GPU run (an H200 with python3 = torch + CUDA, torchdiffeq, diffrax, JAX and CuPy installed),
# meant to finish in under 10 minutes (the steps' limits add up to 555 s). Run from the repository root:
#
#     bash benchmarks/gpu.sh            # logs under $OUT (or ./gpu-out when OUT is unset)
#
# torchode, torchdeq and torchsde are not installed there: put their wheels (and nothing else) in .whl/
# (see the device notes: pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .whl NAME)
# and carry .whl; they are installed into /tmp/site first. Steps, each with its own time limit, the table
# first (a step stopped at its limit keeps what it printed: suite.py prints each problem's rows as it ends):
#   1. benchmarks/suite.py on CUDA in float32, with compile=True (the whole loop as one graph, and the
#      per-step path with CUDA graphs) beside eager on P1/P2; P4 runs on the CPU;
#   2. the CUDA tests (the tests that skip without a GPU: compile=True on CUDA, models, DeviceLoader);
#   3. DeviceLoader's pinned-memory prefetch and DLPack zero-copy with CuPy;
#   4. benchmarks/node_train_step.py on CUDA with the diffrax rows (JAX, jitted) and peak GPU memory.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="${PWD}${PYTHONPATH:+:$PYTHONPATH}"
# JAX would otherwise take 75 % of the GPU's memory when it starts, beside torch in the same process
export XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
PY=python3

if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log, never stop the script
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
    tail -n 40 "$OUT/$name.log"
}

nvidia-smi -L || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

step suite 310 $PY benchmarks/suite.py --device cuda --compile --repeats 5 --threads 8

step cuda_tests 150 $PY -m pytest -v --durations=0 -m "slow or not slow" tests/test_compiled.py \
    tests/test_interop.py::test_device_loader_prefetches_to_cuda tests/test_nn.py \
    -k cuda

step interop 20 $PY - <<'EOF'
import torch
import cupy
from pylux.interop import DeviceLoader, from_torch, to_torch

x = torch.randn(64, 8).pin_memory()
batches = [(x[i:i + 16], torch.arange(i, i + 16)) for i in range(0, 64, 16)]
seen = 0
for xb, yb in DeviceLoader(batches, "cuda"):
    assert xb.is_cuda and yb.is_cuda, "DeviceLoader did not move the batch"
    torch.testing.assert_close(xb.cpu(), x[seen:seen + 16])
    seen += 16
print("DeviceLoader: 4 pinned batches prefetched to", torch.cuda.get_device_name(0))
t = torch.arange(12.0, device="cuda")
c = from_torch(t, cupy)
assert c.data.ptr == t.data_ptr(), "torch -> CuPy copied"
back = to_torch(c)
assert back.data_ptr() == t.data_ptr(), "CuPy -> torch copied"
c[0] = 42.0
assert float(t[0]) == 42.0, "the CuPy array does not share memory with the tensor"
print("DLPack torch <-> CuPy: zero-copy both ways (same device pointer, writes visible)")
EOF

step node_train_step 75 $PY benchmarks/node_train_step.py --device cuda --diffrax --repeats 3 --threads 8
echo "logs in $OUT"
