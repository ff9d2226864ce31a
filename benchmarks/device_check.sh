#!/usr/bin/env bash
# What a GPU session runs: build for the local GPU once, then the named stages in order. Each call of
# the device tool is limited to 10 minutes, so pick stages that fit; "bg:STAGE" runs a stage in the
# background (the GPU is shared: use it for a stage whose timings do not matter, e.g. bg:demo next to
# tests) and is waited for at the end.
#
#   bash benchmarks/device_check.sh tests            # the whole pytest suite on CUDA (GPU tests included); it
#                                                    # outlasts one 10-minute call: AHN_TESTS_SHARD=1/3, 2/3,
#                                                    # 3/3 in three calls (tests/conftest.py)
#   bash benchmarks/device_check.sh bench            # run_all.py --quick --update-results (+ the files to commit)
#   bash benchmarks/device_check.sh perf             # bench_prefill T=32k split + bench_backward --sweep
#   bash benchmarks/device_check.sh model            # bench_model.py: Qwen2.5-3B shape, 32k and 128k context
#   bash benchmarks/device_check.sh demo             # python/retrieval_demo.py under a time budget
#   bash benchmarks/device_check.sh ddp              # distillation on 1 GPU vs 2 GPUs (torchrun), same batch
#   bash benchmarks/device_check.sh decode           # decode op: CUDA tests, launch-knob variants, ncu of one step
#   bash benchmarks/device_check.sh step             # the decode step at B <= 2: tests, projections, 3B step variants
#   bash benchmarks/device_check.sh distill          # bench_distill.py: self-distillation tokens/s, 3B shape, T=16k
#   bash benchmarks/device_check.sh ab               # ab_trees.py: this tree against each older tree in .ab/ (carry .ab)
#   bash benchmarks/device_check.sh sm90             # bench_sm90.py: the sm_90a kernels (the build needs the
#                                                    # nvidia-cutlass wheel in .whl/): the forward's checks, the band
#                                                    # backward's op test, then both against the peers
#   bash benchmarks/device_check.sh overlap          # the memory passes beside the sm_90a kernel: every kind, the
#                                                    # cache path, the backward's do_weight split (timings)
#   bash benchmarks/device_check.sh beside           # backward variants around cuDNN's band: tests, timings
#   bash benchmarks/device_check.sh prep             # the memory's prep pass alone: settings, kinds, ncu
#   bash benchmarks/device_check.sh variants         # the sm_90a forward's variants: checks, then 1 against 2 in turn
#   bash benchmarks/device_check.sh fwdprof          # Nsight Compute on the sm_90a forward kernel (gdn, 32k): stalls
#                                                    # per SASS instruction, summed by region
#   bash benchmarks/device_check.sh chains           # the state chains' GPU tests, then before / after (carry .ab)
#   bash benchmarks/device_check.sh bg:demo tests    # both at once
#
# The extension is built once per change of its sources: see "The extension" below (.devbuild/, carried).
# Logs and results go to $OUT (the device tool's folder) or ./device_out; the demo's assets come back
# as one tarball (the device tool returns at most 8 files). Peers that are pure Python
# (fla-core, einops, pytest-xdist + execnet) can travel as wheels in .whl/ (device README).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ $# -gt 0 ] || set -- tests
out=${OUT:-device_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 AHN_TESTS_EAGER=1
export AHN_OPS_CUDA_ARCHS=${AHN_OPS_CUDA_ARCHS:-90a}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/device.txt"
# The extension: a build this machine made for the same sources, torch, targets and CUTLASS wheel comes back
# as $OUT/_C-KEY.so; put it in .devbuild/ here and carry .devbuild with the next calls, which then skip the
# ~110 s build (the key is a hash of all of the build's inputs, so a changed source builds again)
key=$( { find csrc -type f | LC_ALL=C sort | xargs cat; cat setup.py CMakeLists.txt; ls .whl 2>/dev/null
         python3 -c "import torch, sys; print(torch.__version__, torch.version.cuda, sys.version_info[:2])"
         echo "$AHN_OPS_CUDA_ARCHS"; } | sha256sum | cut -c1-16)
if [ -f ".devbuild/_C-$key.so" ]; then
  cp ".devbuild/_C-$key.so" ahn_ops/_C.abi3.so && echo "extension: .devbuild/_C-$key.so (no build)" | tee "$out/build.log"
else
  if ! python3 setup.py -q build_ext --inplace >"$out/build.log" 2>&1; then
    tail -30 "$out/build.log"
    exit 1
  fi
  cp ahn_ops/_C.abi3.so "$out/_C-$key.so"
fi

DEMO_BUDGET=${DEMO_BUDGET:-520}   # seconds of python/retrieval_demo.py (pretrain + distil + eval)

stage() {
  case "$1" in
    tests)
      # Triton compiles every constexpr variant the suite touches (20-30 s each for the backward): the
      # compiles are CPU-bound, so with pytest-xdist (a wheel in .whl/) the tests run in parallel workers; at most
      # 6: the long GPU tests (T=32k forward, the 9000-token backwards, the fp32 references) take 4-14 GB each, and
      # 12 workers on the backward / sm90 / deterministic files together ran an H100's 80 GB out (17 tests failed
      # to allocate; all 33 of them passed again at 4 workers)
      local par=""
      if python3 -c "import xdist" 2>/dev/null; then par="-n ${TESTS_WORKERS:-6}"; fi
      if [ -n "${TESTS_ARGS:-}" ]; then  # a chosen subset, e.g. TESTS_ARGS="--tb=line tests/ops/test_prefill.py"
        timeout -s INT -k 30 "${TESTS_TIMEOUT:-480}" python3 -m pytest -q -rfEs $par $TESTS_ARGS 2>&1 | tee "$out/tests.log" | tail -40
        return
      fi
      # the pipelining-race check of every prefill kernel with this machine's triton (offline compile, CPU):
      # once per suite, with its first shard
      case "${AHN_TESTS_SHARD:-1/1}" in
        1/*)
          timeout 300 python3 benchmarks/kernel_regs.py --offline --what prefill --kinds gdn dn mamba2 --D 128 64 \
            >"$out/pipeline_check.log" 2>&1 \
            || { echo "pipeline hazard (kernel_regs.py --offline):"; tail -3 "$out/pipeline_check.log"; } ;;
      esac
      # the C++ op's bad-input paths first, in their own process (a crash there must not hide the rest)
      local first="tests/test_build.py tests/ops/test_decode_cpu.py tests/ops/test_decode_cuda.py"
      timeout 150 python3 -m pytest -q -rfEs $first 2>&1 | tee "$out/tests_decode.log" | tail -8
      timeout -s INT -k 30 "${TESTS_TIMEOUT:-480}" python3 -m pytest -q -rfEs $par --durations=15 tests $(printf -- '--ignore=%s ' $first) \
        2>&1 | tee "$out/tests.log" | tail -40
      ;;
    bench)
      # --update-results rewrites benchmarks/RESULTS.md's run_all section and README.md's headline table and
      # appends to benchmarks/history.jsonl: those travel back (with the plots) as one tarball to commit, since
      # the device tool returns at most 8 files
      # the copied tree may have no .git: AHN_BENCH_COMMIT=$(git rev-parse --short HEAD) names the commit
      timeout 540 python3 benchmarks/run_all.py --quick --out "$out" --update-results \
        ${AHN_BENCH_COMMIT:+--commit "$AHN_BENCH_COMMIT"} 2>&1 | tee "$out/bench.log" | tail -60
      cp benchmarks/RESULTS.md README.md benchmarks/history.jsonl "$out/"
      tar czf "$out/updated.tgz" -C "$out" plots RESULTS.md README.md history.jsonl \
        && rm -rf "$out/plots" "$out/RESULTS.md" "$out/README.md" "$out/history.jsonl"
      ;;
    perf)
      # the kernel timings behind issues 3 and 4 (prefill split, backward split, backward launch sweep)
      timeout 120 python3 benchmarks/bench_prefill.py --shapes 32768 2>&1 | tee "$out/perf_prefill.log" | tail -12
      timeout 200 python3 benchmarks/bench_backward.py --sweep 2>&1 | tee "$out/perf_backward.log" | tail -30
      ;;
    model)
      timeout 540 python3 benchmarks/bench_model.py --shape 3b --contexts 32768 131072 --window 32640 --sinks 128 \
        --decode-contexts 32768 131072 --batches 1 8 --decode-steps 16 2>&1 | tee "$out/model.log" | tail -40
      ;;
    demo)
      rm -rf assets/retrieval_demo_run
      timeout $((DEMO_BUDGET + 60)) python3 python/retrieval_demo.py --time-budget "$DEMO_BUDGET" \
        --out assets/retrieval_demo_run >"$out/demo.log" 2>&1
      echo "demo exit $?"; tail -15 "$out/demo.log"
      tar czf "$out/retrieval_demo.tgz" -C assets retrieval_demo_run 2>/dev/null || true
      ;;
    ddp)
      local common="--tiny --tiny-size 256x4 --synthetic kv --seq-len 2048 --window 256 --sinks 8 --min-window 64
        --max-window 1024 --steps 40 --lr 2e-3 --warmup 4 --no-progress --seed 3"
      rm -f "$out"/ddp_*.jsonl
      timeout 200 python3 python/distill.py $common --micro-batch 4 --grad-accum 2 --log-file "$out/ddp_1gpu.jsonl" \
        2>&1 | tail -3
      timeout 200 torchrun --standalone --nproc-per-node 2 python/distill.py $common --micro-batch 4 --grad-accum 1 \
        --log-file "$out/ddp_2gpu.jsonl" 2>&1 | tail -3
      python3 benchmarks/ddp_compare.py "$out/ddp_1gpu.jsonl" "$out/ddp_2gpu.jsonl" --names "1 GPU (accum 2)" \
        "2 GPUs (DDP)" | tee "$out/ddp.md"
      ;;
    decode)
      # the decode-op loop of issue 5 (~3 min): correctness first, then graph timings of the launch knobs
      # (VARIANTS, see profile_decode_op.py) at B=1 and B=16, then Nsight Compute on one B=1 step
      timeout 200 python3 -m pytest -q -x -rfEs tests/ops/test_decode_cuda.py 2>&1 | tee "$out/tests_decode.log" | tail -3
      timeout 120 python3 benchmarks/profile_decode_op.py --variants ${VARIANTS:-default pdl0 k256 k1024} 2>&1 \
        | tee "$out/decode_b1.log" | tail -8
      timeout 60 python3 benchmarks/profile_decode_op.py --batch 16 --layers 2 --variants default 2>&1 | tail -1
      if command -v ncu >/dev/null; then
        timeout 150 ncu --clock-control none --launch-skip 4 --launch-count 2 -k regex:decode_ \
          --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
          --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
          python3 benchmarks/profile_decode_op.py --ncu-target >"$out/ncu_decode.txt" 2>&1
        grep -E "  void decode_|Duration|DRAM Throughput|Issued Warp|Warp Cycles Per Issued" "$out/ncu_decode.txt"
      fi
      ;;
    step)
      # the whole decode step at small batch (issue 6's B=1 target, ~4 min): the fused projections' and the
      # decode op's launch-overlap tests, the per-layer projections, then the 3B step's variants (chained
      # launches off / on, ...) and its kernel profile at B=1
      timeout 200 python3 -m pytest -q -x -rfEs tests/ops/test_decode_linear.py tests/models/test_generate_fast.py \
        2>&1 | tee "$out/tests_step.log" | tail -3
      timeout 60 python3 -m pytest -q -x -rfEs tests/ops/test_decode_cuda.py -k overlap 2>&1 | tail -2
      timeout 60 python3 benchmarks/bench_decode_linear.py --batch 1 2 2>&1 | tail -4
      timeout 180 python3 benchmarks/profile_decode.py --batch 1 --steps 20 --top 12 2>&1 | tee "$out/step_b1.log" | tail -24
      ;;
    distill)
      timeout 540 python3 benchmarks/bench_distill.py 2>&1 | tee "$out/distill.log" | tail -12
      ;;
    ab)
      # before / after of a kernel change on this machine: the older trees were put in .ab/ by
      # `git archive REV ahn_ops | tar -x -C .ab/REV` and carried (a tree without a built extension gets a copy of
      # this tree's, so that the forward runs the same engine); AB_CASES narrows the cases
      timeout "${AB_TIMEOUT:-540}" python3 benchmarks/ab_trees.py . .ab/* --rounds "${AB_ROUNDS:-2}" \
        ${AB_CASES:+--cases $AB_CASES} 2>&1 | tee "$out/ab.log" | tail -14
      ;;
    chains)
      # the state chains' changes (loads one chunk ahead; per-thread ready releases instead of a CTA barrier, so the
      # chain beside the sm_90a kernel is pipelined): the GPU tests that run those chains (the forward's passes
      # beside the kernel and their counters, the fused state + epilogue launch, the reverse chain beside the band),
      # then this tree against the older ones in .ab/ (carried): the serial chain, the forward, forward + backward
      timeout 120 python3 -m pytest -q -rf tests/ops/test_sm90_engine.py -k "beside or ready_counters or overlap" \
        2>&1 | tail -3
      timeout 120 python3 -m pytest -q -rf tests/ops/test_backward.py -k "state_epi or beside_band" 2>&1 | tail -3
      AB_CASES="${AB_CASES:-state fwd fwdbwd}" AB_TIMEOUT=330 stage ab
      ;;
    overlap)
      # the timings behind the memory passes beside the sm_90a kernel (issues 32, 33): the forward of every kind
      # against the engine before it and with deterministic=True (engines), the cache path with the passes before
      # / beside the kernel (cache: whether "all" becomes the default), the backward with do_weight's token split
      # (its test first) against the cuBLAS product (bench_backward's default, in the previous run or "perf")
      timeout 200 python3 benchmarks/bench_sm90.py engines 2>&1 | tee "$out/engines.log" | tail -9
      timeout 150 python3 benchmarks/bench_sm90.py cache 2>&1 | tee "$out/cache.log" | tail -6
      timeout 150 python3 -m pytest -q -rf tests/ops/test_backward.py -k do_weight 2>&1 | tail -2
      timeout 200 python3 benchmarks/bench_backward.py --config do_weight_slices=264 2>&1 | tee "$out/bwd_slices.log" \
        | tail -16
      ;;
    prep)
      # the memory's prep pass alone (issue 32's serial prefix): launch settings x kinds x shapes, the fused
      # forward at 32k under each, then Nsight Compute on one launch at 32k (what its warps wait on)
      timeout 330 python3 benchmarks/bench_prep.py 2>&1 | tee "$out/prep.log" | tail -26
      if command -v ncu >/dev/null; then
        timeout 150 ncu --clock-control none --launch-skip 1 --launch-count 1 -k regex:_prep_kernel \
          --section SpeedOfLight --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \
          --section LaunchStats --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
          python3 benchmarks/bench_prep.py --ncu-target >"$out/ncu_prep.txt" 2>&1
        grep -E "Duration|DRAM Throughput|Memory Throughput|Compute \(SM\)|Achieved Occupancy|Registers Per|Issued Warp|Warp Cycles Per Issued|stalled_(long_scoreboard|short_scoreboard|math|wait|barrier|mio|lg|not_selected|dispatch)" \
          "$out/ncu_prep.txt" | head -40
        # where the warps stall, per SASS instruction (sampled): which part of the pass holds its time
        timeout 150 ncu --clock-control none --launch-skip 1 --launch-count 1 -k regex:_prep_kernel \
          --section SourceCounters --section WarpStateStats -f -o "$out/prep_src" \
          python3 benchmarks/bench_prep.py --ncu-target >/dev/null 2>&1 \
          && ncu -i "$out/prep_src.ncu-rep" --page source --csv --print-source sass >"$out/prep_sass.csv" 2>&1
        ls -la "$out"/prep_src* "$out/prep_sass.csv" 2>/dev/null; head -c 600 "$out/prep_sass.csv" 2>/dev/null
      fi
      ;;
    variants)
      # the sm_90a forward's variants (bench_sm90.py): every variant's checks against the fp32 reference, then
      # variant 1 (the default) against 2 in turn: the attention alone and the library's forward, 32k and 131k
      timeout 150 python3 benchmarks/bench_sm90.py check check-fused 2>&1 | tee "$out/variants.log" \
        | grep -v " ok$" | tail -6
      timeout 400 python3 benchmarks/bench_sm90.py variants 2>&1 | tee -a "$out/variants.log" | tail -9
      ;;
    fwdprof)
      # the fused sm_90a forward kernel alone (the passes before it), gdn T=32k W=4096 S=128: where its warps
      # stall per SASS instruction (fwd_sass.csv; `python3 benchmarks/sass_samples.py` sums it by region)
      command -v ncu >/dev/null || { echo "no ncu"; return; }
      local tgt="python3 benchmarks/bench_sm90.py ncu-target"
      timeout 200 ncu --clock-control none --launch-skip 1 --launch-count 1 -k regex:band_fwd_kernel \
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \
        --section LaunchStats --section SourceCounters -f -o "$out/fwd_src" $tgt >"$out/ncu_fwd.log" 2>&1
      ncu -i "$out/fwd_src.ncu-rep" --print-summary none >"$out/ncu_fwd.txt" 2>&1
      grep -E "Duration|DRAM Throughput|Compute \(SM\)|Achieved Occupancy|Registers Per|Warp Cycles Per Issued" \
        "$out/ncu_fwd.txt" | head -12
      ncu -i "$out/fwd_src.ncu-rep" --page source --csv --print-source sass >"$out/fwd_sass.csv" 2>&1
      python3 benchmarks/sass_samples.py "$out/fwd_sass.csv" 2>&1 | tail -30
      ;;
    beside)
      # backward variants around cuDNN's band (bench_backward.BESIDE_SETTINGS): their GPU tests, the timings
      timeout 240 python3 -m pytest -q -rf tests/ops/test_backward.py -k "beside_band or side_stream or state_epi" 2>&1 | tail -3
      # BESIDE_T: the shapes to time, by T (32768 24576 for both; each variant prints its total as it goes);
      # BESIDE_ROUNDS: the settings in turn, once per round (the table's "x first" pairs each with the first)
      timeout 300 python3 benchmarks/bench_backward.py --beside --beside-T ${BESIDE_T:-32768} \
        --rounds ${BESIDE_ROUNDS:-2} 2>&1 \
        | tee "$out/beside.log" | tail -18
      ;;
    sm90)
      # one process per part: a kernel that hangs costs that part's timeout only. SM90_SANITIZE=memcheck (or
      # racecheck, synccheck) first runs the first shapes of both checks under compute-sanitizer; a failed or
      # hung check runs them under memcheck afterwards (and the timings are skipped); SM90_SKIP_BENCH=1: checks only
      sanitize() {
        command -v compute-sanitizer >/dev/null || return 0
        timeout 240 compute-sanitizer --tool "$1" --print-limit 20 python3 benchmarks/bench_sm90.py \
          check check-fused --first 2 2>&1 | tee "$out/sm90_sanitize_$1.log" | tail -25
      }
      [ -n "${SM90_SANITIZE:-}" ] && sanitize "$SM90_SANITIZE"
      local rc=0
      timeout 120 python3 benchmarks/bench_sm90.py check >"$out/sm90.log" 2>&1 || rc=$?
      grep -v " ok$" "$out/sm90.log" | tail -12
      timeout 90 python3 benchmarks/bench_sm90.py check-fused >>"$out/sm90.log" 2>&1 || rc=$((rc ? rc : $?))
      grep "^fused\|^#\|Error\|error" "$out/sm90.log" | grep -v " ok$" | tail -12
      if [ "$rc" != 0 ]; then
        echo "sm90 checks failed (exit $rc): memcheck of the first shapes"
        sanitize memcheck
        return 1
      fi
      # the library's link (its libstdc++) and the sm_90a tests, forward and backward (a failure there leaves
      # the timings to run)
      timeout 240 python3 -m pytest -q -rf -p no:cacheprovider tests/test_build.py tests/ops/test_sm90_engine.py 2>&1 \
        | tee -a "$out/sm90.log" | grep -E "passed|failed|FAILED|Error" | tail -12
      [ "${SM90_SKIP_BENCH:-0}" = 1 ] && return 0  # the timings in a later step of the same call
      timeout 300 python3 benchmarks/bench_sm90.py bench 2>&1 | tee -a "$out/sm90.log" | tail -30
      timeout 200 python3 benchmarks/bench_sm90.py bench-bwd --first 1 2>&1 | tee -a "$out/sm90.log" | tail -18
      ;;
    *)
      echo "unknown stage $1 (tests|bench|perf|model|demo|ddp|decode|step|distill|ab|sm90, optionally bg:STAGE)" >&2
      return 2
      ;;
  esac
}

pids=()
for s in "$@"; do
  if [[ $s == bg:* ]]; then
    stage "${s#bg:}" &
    pids+=($!)
  else
    stage "$s"
  fi
done
for p in "${pids[@]}"; do wait "$p"; done
