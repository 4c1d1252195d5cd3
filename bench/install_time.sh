#!/usr/bin/env bash
# Issue 22's figure: the install time of a fresh clone, as CI pays it (`make venv`, then
# `make vllm-venv`), and whether anything was compiled (llama-cpp-python in neither venv).
#   bash bench/install_time.sh [OUT.json]   (default bench/results/install_time.json)
# pip's wheel cache is this machine's (say whether it was warm); the CPU flags go with it.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$repo/bench/results/install_time.json}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
git clone -q "$repo" "$tmp/clone"
cd "$tmp/clone"
t0=$(date +%s.%N); make -s venv >/dev/null 2>&1; t1=$(date +%s.%N)
make -s vllm-venv >/dev/null 2>&1; t2=$(date +%s.%N)
compiled=false
for venv in .venv .venv-vllm; do
  if "$venv/bin/python" -m pip show -q llama-cpp-python 2>/dev/null; then compiled=true; fi
done
flags=$(grep -o -w -E 'avx2|avx512f|avx512_bf16|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')
python3 - "$out" "$t0" "$t1" "$t2" "$compiled" "$flags" "$(git rev-parse --short HEAD)" <<'PY'
import json, os, sys
out, t0, t1, t2, compiled, flags, commit = sys.argv[1:]
t0, t1, t2 = float(t0), float(t1), float(t2)
json.dump({"commit": commit, "make_venv_s": round(t1 - t0, 1),
           "make_vllm_venv_s": round(t2 - t1, 1), "llama_cpp_compiled": compiled == "true",
           "cpu_flags": flags.split(), "cpus": os.cpu_count(),
           "load_average": os.getloadavg()}, open(out, "w"), indent=1)
print(open(out).read())
PY
