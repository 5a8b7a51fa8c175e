#!/usr/bin/env bash
# The prepared GPU check: one command, about 5 minutes on one H100/H200, figures in OUT.
#
#   benchmarks/gpu_check.sh OUT [--device cuda|cpu]
#
#   1. the tests that need CUDA (pytest -m gpu: loss on CUDA = CPU in float64, the runtime
#      through DataParallel on one GPU, the bank on the GPU, a bf16 autocast teacher);
#   2. bench_loss.py on the device, at the released setting and at ImageNet scale;
#   3. bench_overhead.py on the device: SRe²L's ImageNet-shaped iteration (ResNet-18, 224², batch
#      100, memory 49/class, 1300 real/class), vanilla vs patched, and DWA's;
#   4. dire demo --dataset cifar10 on generated CIFAR-shaped data, a few iterations (no network
#      there, no real CIFAR: the numbers say that the pipeline runs on the GPU, nothing more).
#
# --device cpu runs the same steps at tiny sizes (the GPU tests skip): CI runs it so that this
# script is known to work before a GPU machine ever runs it. OUT receives six small files
# (gpu_tests.txt, bench_loss.txt, bench_overhead.txt, demo_report.md, demo_report.json,
# summary.txt): a device machine sends back at most eight.
set -euo pipefail
[[ $# -ge 1 ]] || { echo "usage: benchmarks/gpu_check.sh OUT [--device cuda|cpu]" >&2; exit 2; }
out=$1
shift
device=cuda
while [[ $# -gt 0 ]]; do
  case $1 in
    --device) device=${2:?--device needs cuda or cpu}; shift 2 ;;
    *) echo "gpu_check.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
[[ $device == cuda || $device == cpu ]] || { echo "gpu_check.sh: --device is cuda or cpu, not $device" >&2; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/dire-gpu-check.XXXXXX")
trap 'rm -rf "$work"' EXIT
export PYTHONUNBUFFERED=1 PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
started=$SECONDS
summary=$out/summary.txt
: >"$summary"
note() { printf '%s\n' "$*" | tee -a "$summary"; }

python - <<'PY' | tee -a "$summary"
import platform, torch
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}, GPU: {gpu}, "
      f"python {platform.python_version()}")
PY
if [[ $device == cuda ]]; then
  python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { note "gpu_check.sh: --device cuda, but torch sees no CUDA device"; exit 2; }
  loss_args=() overhead_args=(--shape imagenet) demo_args=(--iterations 40 --student-steps 200 --teacher-epochs 2 --ipc 10 --seeds 2)
  cifar_args=(--classes 10 --train 200 --test 20)
else
  loss_args=(--scale tiny --repeats 2 --imagenet-repeats 1) overhead_args=(--shape tiny --iterations 2 --rounds 1)
  demo_args=(--iterations 3 --student-steps 3 --teacher-epochs 1 --ipc 2 --seeds 1 --syn-seeds 1 --jobs 1)
  cifar_args=(--classes 10 --train 6 --test 2)
fi

step() { note "== $1 ($((SECONDS - started)) s so far)"; }

step "1. tests that need CUDA"
(cd "$repo" && python -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider) 2>&1 | tee "$out/gpu_tests.txt"
note "$(tail -n 1 "$out/gpu_tests.txt")"

step "2. bench_loss.py --device $device ${loss_args[*]}"
python "$here/bench_loss.py" --device "$device" "${loss_args[@]}" 2>&1 | tee "$out/bench_loss.txt"
grep -E "speed-up|forward\+backward median" "$out/bench_loss.txt" | tee -a "$summary" || true

step "3. bench_overhead.py --device $device ${overhead_args[*]}"
python "$here/bench_overhead.py" --device "$device" --methods sre2l dwa "${overhead_args[@]}" 2>&1 | tee "$out/bench_overhead.txt"
grep -E "^[a-z0-9]+:|overhead" "$out/bench_overhead.txt" | tee -a "$summary" || true
note "(the paper reports +17.7 % synthesis time for SRe²L + DiRe, Table 15)"

step "4. dire demo --dataset cifar10 on generated CIFAR-shaped data"
python "$here/make_cifar_like.py" "$work/cifar" "${cifar_args[@]}"
dire demo --dataset cifar10 --data-path "$work/cifar" --device "$device" --no-progress --no-plots \
  --out "$work/demo" --cache-dir "$work/cache" "${demo_args[@]}" 2>&1 | tail -n 30
cp "$work/demo/report.md" "$out/demo_report.md"
cp "$work/demo/report.json" "$out/demo_report.json"
note "demo: report written ($(python -c "import json,sys; print(len(json.load(open(sys.argv[1]))['rows']))" "$out/demo_report.json") rows)"

step "done"
