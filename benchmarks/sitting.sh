#!/usr/bin/env bash
# One sitting of side-by-side figures (docs/performance.md): run it on a quiet machine, nothing else
# running. Each run writes one JSON file to OUT.
#   LLAMA_BIN=.../llama.cpp/build/bin GGUF_DIR=dir-with-smollm2-{f32,bf16,q8_0}.gguf \
#   VLLM_PYTHON=/path/to/vllm-venv/bin/python [VLLM_DTYPE=bfloat16] benchmarks/sitting.sh OUT
# GGUF_DIR's files come from llama.cpp's convert_hf_to_gguf.py (f32, bf16) and llama-quantize (q8_0);
# the Q4_1 file is the embedded one. A peer left unset is skipped. AVX2_ONLY=1 holds every engine to
# AVX2 on an AVX-512 CPU (InferLab's kernels, PyTorch, oneDNN, vLLM's AVX2 build; LLAMA_BIN then
# names a llama.cpp built with -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON).
# AVX512F_ONLY=1 holds them to AVX-512 with VNNI and without bf16 instructions or AMX, as the Cascade
# Lake and Ice Lake-SP Xeons have (InferLab's avx512vnni build, vLLM's AVX512 build, oneDNN's
# AVX512_CORE_VNNI; LLAMA_BIN: -DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON and the AVX2
# flags above). Skylake-SP, without VNNI: INFERLAB_ISA=avx512f (its int8 path by multiply-adds).
set -u
if [ "${AVX2_ONLY:-0}" = 1 ]; then
  export INFERLAB_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 HELD_ISA=avx2
elif [ "${AVX512F_ONLY:-0}" = 1 ]; then
  export INFERLAB_ISA=${INFERLAB_ISA:-avx512vnni} ATEN_CPU_CAPABILITY=avx512 ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI \
    HELD_ISA=avx512f
fi
if [ -n "${HELD_ISA:-}" ]; then
  export PYTHONPATH="$(cd "$(dirname "$0")" && pwd)/held_isa${PYTHONPATH:+:$PYTHONPATH}"
fi
OUT=${1:?usage: sitting.sh OUTDIR}; mkdir -p "$OUT"
IL=${IL:-.venv/bin/inferlab}
M=${GGUF_DIR:-}; B=${LLAMA_BIN:-}; V=${VLLM_PYTHON:-}
VD=${VLLM_DTYPE:-float32}  # vLLM's best dtype on the CPU: fp32 on AVX2, bf16 where AVX512-BF16 runs it
Q41=$(.venv/bin/python -c "from inferlab.model.loader import embedded_model_path; print(embedded_model_path())")
# llama-bench's pp128 and tg128 as two runs: where one of them fails (this llama.cpp's AMX path for
# Q4_1 and Q8_0 batches stops with an illegal instruction on some AMX VMs), the other still counts
lcbench() {
  "$B/llama-bench" -m "$1" -t 2 -p 128 -n 0 -r 3 -o json > "$2_pp.json" 2>/dev/null
  "$B/llama-bench" -m "$1" -t 2 -p 0 -n 128 -r 3 -o json > "$2_tg.json" 2>/dev/null
}
date > "$OUT/start"
if [ -n "$M" ]; then
  for f in f32 bf16 q8_0; do
    $IL bench --latency --threads 2 --model "$M/smollm2-$f.gguf" 2>/dev/null | tail -1 > "$OUT/il_lat_$f.json"
    [ -n "$B" ] && lcbench "$M/smollm2-$f.gguf" "$OUT/lc_$f"
  done
  $IL bench --latency --threads 2 --int8-activations --model "$M/smollm2-q8_0.gguf" 2>/dev/null | tail -1 > "$OUT/il_lat_q8_0_int8.json"
fi
$IL bench --latency --threads 2 2>/dev/null | tail -1 > "$OUT/il_lat_q4_1.json"
$IL bench --latency --threads 2 --int8-activations 2>/dev/null | tail -1 > "$OUT/il_lat_q4_1_int8.json"
$IL bench --latency --threads 2 --dtype bfloat16 2>/dev/null | tail -1 > "$OUT/il_lat_q4_1_bf16act.json"
$IL bench --latency --threads 2 --quantization none 2>/dev/null | tail -1 > "$OUT/il_lat_none.json"
[ -n "$B" ] && lcbench "$Q41" "$OUT/lc_q4_1"
# cpu workload: ours, vLLM, ours again, then the other modes
$IL bench --workload cpu 2>/dev/null | tail -1 > "$OUT/il_cpu_1.json"
if [ -n "$V" ]; then
  VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_KVCACHE_SPACE=4 "$V" benchmarks/vllm_cpu.py \
    --workload ../shared/bench/workload.py:cpu --dtype "$VD" --gguf "$Q41" \
    2>/dev/null | grep '"engine"' > "$OUT/vllm_cpu_1.json"
fi
$IL bench --workload cpu 2>/dev/null | tail -1 > "$OUT/il_cpu_2.json"
$IL bench --workload cpu --dtype bfloat16 2>/dev/null | tail -1 > "$OUT/il_cpu_bf16.json"
$IL bench --workload cpu --dtype float32 2>/dev/null | tail -1 > "$OUT/il_cpu_f32.json"
$IL bench --workload cpu --quantization none 2>/dev/null | tail -1 > "$OUT/il_cpu_none.json"
date > "$OUT/end"
