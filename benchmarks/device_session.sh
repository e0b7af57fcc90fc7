#!/usr/bin/env bash
# One call on the GPU machine: the steps named on the command line, in order, each writing its results
# under $OUT/<step>/ and its log to $OUT/<step>.log, with a one-line verdict and the log's tail printed.
#
#   bash benchmarks/device_session.sh check plugin cutlass paged     # correctness sweeps + kernel timings
#   bash benchmarks/device_session.sh bundle serve                   # dlrm-v3 bundle, then the served latency
#   bash benchmarks/device_session.sh hitprof                        # a hit / a lone request: GPU vs host time
#   bash benchmarks/device_session.sh sweep                          # CUTLASS tile/cluster/schedule variants
#
# Wheels the image lacks (fastapi, uvicorn, pydantic, ...) travel in .whl (carry it) and are installed to
# /tmp/site first; the nvidia-cutlass wheel (headers) travels in .gpu-wheels. A step's failure does not
# stop the next one; the exit code is the number of failed steps.
set -u
OUT=${OUT:?set OUT to the results folder}
BUNDLE=/tmp/b/dlrm-v3-ranking/1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
failed=0

step() {  # step NAME CMD...: run CMD, log to $OUT/NAME.log
    local name=$1; shift
    mkdir -p "$OUT/$name"
    local t0=$SECONDS
    echo "== $name: $* ($(date -u +%T))"
    "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "   $name rc=$rc in $((SECONDS - t0)) s"
    tail -n 12 "$OUT/$name.log" | cut -c1-220
    [ $rc -eq 0 ] || failed=$((failed + 1))
}

BUNDLE_CMD=(python3 benchmarks/serve_gpu_bundle.py --out /tmp/b --shapes "1,4096,256;16,4096,256" --max-batch 16)
build_bundle() {
    step bundle "${BUNDLE_CMD[@]}"
}

serve_load() {  # serve_load TAG ARGS...: one serve_load.py run against the dlrm-v3 bundle (built first if missing:
    local tag=$1; shift  # a warm machine keeps /tmp/b from the previous call, a fresh one does not)
    [ -f "$BUNDLE/manifest.json" ] || build_bundle
    step "serve_$tag" python3 benchmarks/serve_load.py --bundle "$BUNDLE" --engine compiled --max-batch 16 \
        --history 4096 --candidates 256 --engine-repeats 30 --out "$OUT/serve_$tag" "$@"
}

serve_cached_ref() {  # cache hits by history_ref, concurrency 1 (the hit bar)
    serve_load cached_ref --cache-gb 8 --users 8 --concurrency 1 --requests 300 --arrays binary \
        --results-layout packed --engine-repeats 0 --history-ref
}

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
for s in "$@"; do
    case $s in
        check) step check python3 benchmarks/gpu_check.py --out "$OUT/check" --jobs 14 ${CHECK_ARGS:-} ;;  # e.g. --quick
        plugin) step plugin python3 benchmarks/gpu_plugin.py --out "$OUT/plugin" ;;
        cutlass) step cutlass python3 benchmarks/gpu_cutlass.py --out "$OUT/cutlass" -j 8 ;;
        sweep) step sweep python3 benchmarks/cutlass_sweep.py --out "$OUT/sweep" -j 16 ;;  # ~20 variants: tiles, clusters, schedules
        fp8) step fp8 python3 benchmarks/gpu_fp8.py --out "$OUT/fp8" ${FP8_ARGS:-} ;;  # e.g. FP8_ARGS="--no-compile"
        overhead) step overhead python3 benchmarks/serve_overhead.py --out "$OUT/overhead" ;;
        paged) step paged python3 benchmarks/gpu_paged.py --out "$OUT/paged" ;;
        hitprof) step hitprof python3 benchmarks/gpu_hit_profile.py --out "$OUT/hitprof" ;;  # hit / lone request: GPU vs host
        bundle) build_bundle ;;
        build_sm90)  # the product's own GPU path, end to end: `hstu-opt build --target sm90` of the tiny recipe (train,
                     # export, fuse, the compiled engine, bench), verify and inspect it, then serve it with --engine auto
            step build_sm90 python3 -m hstu_opt build recipes/tiny.yaml --target sm90 --precision float --out /tmp/tb
            step verify_sm90 python3 -m hstu_opt verify /tmp/tb/tiny/1
            python3 -m hstu_opt inspect /tmp/tb/tiny/1 > "$OUT/inspect_sm90.log" 2>&1
            cp -r /tmp/tb/tiny/1/bench "$OUT/build_sm90/" 2>/dev/null; cp /tmp/tb/tiny/1/manifest.json "$OUT/build_sm90/"
            step serve_sm90 python3 benchmarks/serve_load.py --bundle /tmp/tb/tiny/1 --engine auto --cache-gb 1 \
                --concurrency 1,8 --requests 300 --users 64 --engine-repeats 10 --out "$OUT/serve_sm90" ;;
        check+bundle)  # both compile-bound and untimed: the bundle builds in the background during the sweep
            mkdir -p "$OUT/bundle"
            "${BUNDLE_CMD[@]}" > "$OUT/bundle.log" 2>&1 &
            bundle_pid=$!
            step check python3 benchmarks/gpu_check.py --out "$OUT/check" --jobs 12 ${CHECK_ARGS:-}
            wait $bundle_pid; echo "   bundle rc=$?"; tail -n 3 "$OUT/bundle.log" | cut -c1-300 ;;
        serve)  # the served defaults (a lone request inline when its call is a graph replay), binary bodies (what
                # RankClient sends) and packed results, concurrency 1, 16, 64 (client processes: one per 8); packed
                # bodies at concurrency 1 beside them; --no-inline-lone; then cache hits by history_ref and by the history
            serve_load binary --cache-gb 0 --concurrency 1,16,64 --requests 1000 --arrays binary --results-layout packed
            serve_load packed --cache-gb 0 --concurrency 1 --requests 1000 --arrays packed --results-layout packed \
                --engine-repeats 0
            serve_load worker --cache-gb 0 --concurrency 1,16,64 --requests 1000 --arrays binary --results-layout packed \
                --engine-repeats 0 --inline-lone off
            serve_cached_ref
            serve_load cached --cache-gb 8 --users 8 --concurrency 1 --requests 200 --arrays binary \
                --results-layout packed --engine-repeats 0 ;;
        serve_varied)  # histories of random lengths (1..4096 rows) over 64 users: the compiled engine keys its graphs
                       # by 512-row buckets (16 at most) and a miss's prefill by 512-row bucket, which one fixed
                       # size flatters; cache off, then on (hits and misses apart in by_cache)
            serve_load varied_off --cache-gb 0 --history 0 --users 64 --concurrency 1 --requests 500 --arrays binary \
                --results-layout packed --engine-repeats 0
            serve_load varied_cached --cache-gb 8 --history 0 --users 64 --concurrency 1 --requests 500 --arrays binary \
                --results-layout packed --engine-repeats 0 ;;
        serve_core)  # the two bars alone: binary bodies at concurrency 1 beside the engine, and a hit by history_ref
            serve_load binary1 --cache-gb 0 --concurrency 1 --requests 1000 --arrays binary --results-layout packed
            serve_cached_ref ;;
        serve_conc)  # binary bodies at concurrency 16 and 64 alone (serve's loaded rows without its c=1 ones)
            serve_load conc --cache-gb 0 --concurrency 16,64 --requests 1000 --arrays binary --results-layout packed \
                --engine-repeats 0 ;;
        serve_hit)  # a cache hit by history_ref alone (the hit bar)
            serve_cached_ref ;;
        serve_httpx)  # binary bodies at concurrency 1 sent by httpx (headers and body in two writes), for comparison
            serve_load httpx --cache-gb 0 --concurrency 1 --requests 1000 --arrays binary --results-layout packed \
                --engine-repeats 0 --http-client httpx ;;
        serve_lists)  # JSON lists and per-candidate results (the API's defaults for a client that asks for nothing)
            serve_load lists --cache-gb 0 --concurrency 1,16,64 --requests 1000 ;;
        *) echo "unknown step $s"; failed=$((failed + 1)) ;;
    esac
done
exit $failed
