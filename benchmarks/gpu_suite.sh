#!/usr/bin/env bash
# One-GPU benchmark suite (issue 11): model-only step time and memory, the data loader alone, and whole
# pre-training iterations, on K400-like videos it makes itself (raw, and prepared with tools/prepare_videos.py).
# Nothing is downloaded. Markdown tables on stdout; the whole run stays under SUITE_BUDGET seconds (285).
#
#   bash benchmarks/gpu_suite.sh                     # on a machine with a CUDA GPU
#   WHEELS=wheels OUT=/tmp/out bash benchmarks/gpu_suite.sh
#   bash benchmarks/gpu_suite.sh --cpu-smoke         # every section, tiny sizes, on CPU (checks the suite)
#   bash benchmarks/gpu_suite.sh --sections model,loader   # some of: model, loader, e2e, compile, frames
#   SUITE_BUDGET=420 bash benchmarks/gpu_suite.sh --sections model,loader,e2e,compile,frames
#       # frames (not in the default run): the videos as JPEG frame folders, loader alone and whole iterations
#
# Environment:
#   WHEELS=DIR     install av / decord / tqdm from wheels in DIR (offline) when they are not importable
#   OUT=DIR        also write the report (DIR/gpu_suite.md) and every command's output (DIR/gpu_suite_logs/)
#   PYTHON=PATH    interpreter (default: .venv/bin/python if present, else python3)
#   SUITE_BUDGET=S whole-suite limit in seconds (default 285; 900 for --cpu-smoke); each command also has its
#                  own limit, times LIMIT_SCALE (default 1; 3 for --cpu-smoke, whose CPU may be shared)
#   WORK_DIR=DIR   where the videos go (default: a temporary folder, removed at the end unless KEEP_WORK=1)
#   SMOKE=1        same as --cpu-smoke
# See BENCHMARKS.md, "One GPU".
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

SMOKE=${SMOKE:-0}
SECTIONS=${SECTIONS:-model,loader,e2e,compile}
while (($#)); do
    case $1 in
        --cpu-smoke) SMOKE=1 ;;
        --sections) SECTIONS=${2:?--sections needs a value}; shift ;;
        --sections=*) SECTIONS=${1#*=} ;;
        -h | --help) usage; exit 0 ;;
        *) echo "gpu_suite.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
for s in ${SECTIONS//,/ }; do
    case $s in model | loader | e2e | compile | frames) ;; *) echo "gpu_suite.sh: unknown section: $s" >&2; exit 2 ;; esac
done
want() { [[ ,$SECTIONS, == *,$1,* ]]; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
if [[ -n ${PYTHON:-} ]]; then PY=$PYTHON
elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python
else PY=python3; fi

if ((SMOKE)); then : "${SUITE_BUDGET:=900}" "${LIMIT_SCALE:=3}"; fi
SUITE_BUDGET=${SUITE_BUDGET:-285}
LIMIT_SCALE=${LIMIT_SCALE:-1}
START=$(date +%s)
DEADLINE=$((START + SUITE_BUDGET))
MIN_STEP=10  # a section is not started with less time than this left
if [[ -n ${WORK_DIR:-} ]]; then WORK=$WORK_DIR; mkdir -p "$WORK"
else WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX"); fi
if [[ -n ${OUT:-} ]]; then LOG=$OUT/gpu_suite_logs; else LOG=$WORK/logs; fi
mkdir -p "$LOG"

CHILD=""  # the running section's `timeout`, leader of its own process group
cleanup() {
    if [[ -n $CHILD ]]; then kill -TERM -- "-$CHILD" 2>/dev/null || true; fi
    if [[ -z ${WORK_DIR:-} && ${KEEP_WORK:-0} != 1 ]]; then rm -rf "$WORK"; fi
}

NOTES=()   # what was skipped and why, repeated at the end
TIMES=()   # rows of the timings table
FAILED=0   # sections that failed or timed out (skips for missing packages do not count)
note() { NOTES+=("$1"); echo "> **skipped:** $1"; echo; }

# step NAME BUDGET CMD...: run CMD with its own time limit (and the suite's), stdout to LOG/NAME.md,
# stderr to LOG/NAME.log; a failure prints the end of the log and returns non-zero.
step() {
    local name=$1 budget=$(($2 * LIMIT_SCALE)) left limit t0 took rc=0 status
    shift 2
    left=$((DEADLINE - $(date +%s)))
    limit=$((budget < left ? budget : left))
    if ((limit < MIN_STEP)); then
        TIMES+=("| $name | $budget | 0 | skipped: the suite's time budget is spent |")
        FAILED=$((FAILED + 1))
        note "$name: the suite's time budget ($SUITE_BUDGET s) is spent"
        return 1
    fi
    echo "[gpu_suite] $name (limit ${limit}s): $*" >&2
    t0=$(date +%s)
    # timeout runs CMD in a process group of its own and signals the whole group (DataLoader workers too).
    timeout -k 10 "$limit" "$@" </dev/null >"$LOG/$name.md" 2>"$LOG/$name.log" &
    CHILD=$!
    wait "$CHILD" || rc=$?
    CHILD=""
    took=$(($(date +%s) - t0))
    case $rc in
        0) status=ok ;;
        124 | 137) status="timed out after ${limit} s" ;;
        *) status="failed (exit $rc)" ;;
    esac
    TIMES+=("| $name | $limit | $took | $status |")
    if ((rc)); then
        FAILED=$((FAILED + 1))
        echo "> **$name $status**; the end of its log ($LOG/$name.log):"
        echo
        echo '```'
        if [[ -s $LOG/$name.log ]]; then tail -n 15 "$LOG/$name.log" | cut -c1-300; else echo "(empty)"; fi
        echo '```'
        echo
    fi
    return "$rc"
}

# A list for the whole-iteration runs: LIST's lines E2E_REPEAT times, so that an epoch is many batches per worker
# (each worker builds whole batches; a short epoch would measure the pipeline filling up).
e2e_list() {
    local out=${1%.list}_e2e.list r
    : >"$out"
    for ((r = 0; r < E2E_REPEAT; r++)); do cat "$1" >>"$out"; done
    echo "$out"
}

show() {  # print a command's output, if it ran
    if [[ -f $1 ]]; then cat "$1"; fi
}

# Wheels carried to a host without network: installed into a folder of their own, put first on PYTHONPATH.
install_wheels() {
    local pkg missing=() files=() f
    for pkg in av decord tqdm; do
        "$PY" -c "import $pkg" 2>/dev/null || missing+=("$pkg")
    done
    if ((${#missing[@]} == 0)); then
        echo "WHEELS: av, decord and tqdm are already importable; nothing installed"
        return 0
    fi
    for pkg in "${missing[@]}"; do
        f=$(ls "$WHEELS"/"$pkg"-*.whl 2>/dev/null | head -n 1 || true)
        if [[ -n $f ]]; then files+=("$pkg"); else echo "WHEELS: no $pkg wheel in $WHEELS"; fi
    done
    ((${#files[@]})) || return 0
    mkdir -p "$WORK/pylib"
    export PYTHONPATH="$WORK/pylib${PYTHONPATH:+:$PYTHONPATH}"
    if timeout -k 5 120 "$PY" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --upgrade \
        --find-links "$WHEELS" --target "$WORK/pylib" "${files[@]}"; then
        echo "WHEELS: installed ${files[*]} from $WHEELS with pip"
        return 0
    fi
    # No pip: a wheel is a zip archive; unpack the one made for this Python (else a stable-ABI or py3 one).
    "$PY" - "$WHEELS" "$WORK/pylib" "${files[@]}" <<'EOF'
import glob, os, re, sys, zipfile
wheels, target, pkgs = sys.argv[1], sys.argv[2], sys.argv[3:]
minor = sys.version_info[1]
def fits(name: str) -> int:  # 3: this CPython, 2: abi3 of an older or equal 3.x, 1: pure py3, 0: no
    m = re.search(r"-(cp|py)3(\d*)-([a-z0-9_]+)-", name)
    if not m:
        return 0
    kind, ver, abi = m.group(1), int(m.group(2) or 0), m.group(3)
    if kind == "py":
        return 1
    return 3 if ver == minor and abi != "abi3" else (2 if abi == "abi3" and ver <= minor else 0)
for pkg in pkgs:
    cands = sorted(glob.glob(os.path.join(wheels, f"{pkg}-*.whl")), reverse=True)
    best = sorted((c for c in cands if fits(os.path.basename(c))), key=lambda c: -fits(os.path.basename(c)))
    if best:
        zipfile.ZipFile(best[0]).extractall(target)
        print(f"WHEELS: unpacked {os.path.basename(best[0])}")
    else:
        print(f"WHEELS: no {pkg} wheel for this Python in {wheels}")
EOF
}

backend_ok() {  # can this --video_backend run here?
    case $1 in
        pyav) [[ -n $AV ]] ;;
        decord) [[ -n $DECORD ]] ;;
        auto) [[ -n $AV || -n $DECORD ]] ;;
        *) true ;;
    esac
}

main() {
    # Set here: main may run in a pipeline's subshell, which does not inherit traps.
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    echo "# gpu_suite $( ((SMOKE)) && echo '(CPU smoke run: tiny sizes, the numbers mean nothing)')"
    echo
    if [[ -n ${WHEELS:-} ]]; then
        if [[ -d $WHEELS ]]; then install_wheels; else echo "WHEELS=$WHEELS is not a folder; nothing installed"; fi
    fi
    step probe 90 "$PY" benchmarks/gpu_suite_tools.py probe --out "$WORK/probe.env" ||
        { echo "probe failed: cannot go on"; return 1; }
    # shellcheck disable=SC1091
    source "$WORK/probe.env"
    local commit
    commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
    if [[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]]; then commit="$commit + local changes"; fi
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $commit; ${GPU:-no GPU}, $CORES CPU cores; Python $PY_VERSION," \
        "torch ${TORCH:-missing}, timm ${TIMM:-missing}, PyAV ${AV:-missing}, decord ${DECORD:-missing};" \
        "run_mae_pretraining's default backend: ${DEFAULT_BACKEND:-?}"
    echo
    if [[ -z $TORCH || -z $TIMM ]]; then echo "torch and timm are needed"; return 1; fi
    if ((!SMOKE)) && [[ $CUDA != 1 ]]; then
        echo "No CUDA GPU here. Run with --cpu-smoke to check the suite on CPU."
        return 2
    fi
    local workers=$((CORES > 1 ? CORES - 1 : 1))
    local best=pyav  # the fastest exact backend measured so far; 'auto' once the program has it
    if [[ ,$BACKENDS, == *,auto,* ]]; then best=auto; fi
    if ! backend_ok "$best"; then best=decord; fi
    local have_backends=""
    if [[ -n $DECORD ]]; then have_backends+=decord,; fi
    if [[ -n $AV ]]; then have_backends+=pyav,; fi
    have_backends=${have_backends%,}
    if [[ -z $DECORD ]]; then note "decord is not installed: no decord rows (carry its wheel with WHEELS=DIR)"; fi
    if [[ -z $AV ]]; then
        note "PyAV is not installed: no pyav rows, no videos made or prepared (carry its wheel with WHEELS=DIR)"
    fi
    if [[ -z $TQDM ]]; then note "tqdm is not installed: tools/prepare_videos.py cannot run (carry its wheel)"; fi

    # Sizes: the real run, or tiny ones for the CPU smoke run.
    local model_args vid_args prep_args loader_args e2e_common rec_batch e2e_epochs
    local model_batches compile_batches compile_backend def_batch
    if ((SMOKE)); then
        local tiny='{"encoder_embed_dim": 192, "encoder_depth": 2, "encoder_num_heads": 3, '
        tiny+='"decoder_embed_dim": 96, "decoder_num_heads": 3}'
        model_args=(--model pretrain_videomae_small_patch16_224 --model_kwargs "$tiny" --decoder_depth 1
                    --num_frames 8 --input_size 64 --device cpu --warmup 1 --steps 1)
        model_batches=(1 2) compile_batches=(1) compile_backend=aot_eager
        vid_args=(--n 2 --height 128 --width 224 --seconds 2 --copies 1 --jobs 2)
        prep_args=(-j 2 --bench_videos 1 --bench_clips 2 --num_frames 8 --sampling_rate 2)
        loader_args=(--num_frames 8 --input_size 64 --sampling_rate 2 --n 2 --loader_items 4)
        e2e_common=(--model pretrain_videomae_small_patch16_224 --model_kwargs "$tiny" --decoder_depth 1
                    --num_frames 8 --input_size 64 --sampling_rate 2 --device cpu --batch_size 2 --num_workers 1
                    --print_freq 1)
        rec_batch=1 e2e_epochs=1 def_batch=2 E2E_REPEAT=1
    else
        model_args=(--model pretrain_videomae_base_patch16_224 --warmup 3 --steps 10)
        model_batches=(16 64) compile_batches=(64 16) compile_backend=inductor
        vid_args=(--n 16 --copies 40 --jobs "$CORES")
        prep_args=(-j "$CORES" --bench_videos 4 --bench_clips 5)
        loader_args=(--sampling_rate 4 --n 10 --loader_items 240)
        e2e_common=()  # the program's defaults (empty: expanded with ${a[@]+...} for bash < 4.4 under set -u)
        # recommended: 16 x --num_sample 4 = 64 clips per step, as many as the default batch
        rec_batch=16 e2e_epochs=2 def_batch=${DEFAULT_BATCH:-?} E2E_REPEAT=3  # 1920 lines: 30 batches of 64
    fi
    model_args+=(--masks adaptive:0.95 tube:0.9 --precision bf16 --in_process --sync_check warn)

    if want model; then
        echo "## Model only (benchmarks/bench_pretrain_step.py, random clips, forward + losses + backward + AdamW)"
        echo
        step model_eager 70 "$PY" benchmarks/bench_pretrain_step.py "${model_args[@]}" \
            --batch_size "${model_batches[@]}" || true
        show "$LOG/model_eager.md"
        echo
    fi

    local raw_list="" prep_list=""
    if want loader || want e2e || want frames; then
        echo "## Videos"
        echo
        if [[ -z $AV ]]; then
            note "videos: PyAV is needed to write them; loader and whole-iteration tables skipped"
        elif step videos 75 "$PY" benchmarks/gpu_suite_tools.py videos "$WORK/videos" "${vid_args[@]}"; then
            raw_list=$WORK/videos/raw.list
            show "$LOG/videos.md"
            if [[ -n $TQDM ]] && { want loader || want e2e; } && step prepare 75 "$PY" tools/prepare_videos.py "$raw_list" "$WORK/videos/prepared" \
                --no_progress "${prep_args[@]}"; then
                prep_list=$WORK/videos/prepared/raw.list
                show "$LOG/prepare.md" | sed 's/^/    /'
            fi
        fi
        echo
    fi

    if want loader && [[ -n $raw_list && -n $have_backends ]]; then
        echo "## Data loader alone (benchmarks/bench_dataloader.py; clips/s count augmented clips)"
        echo
        local items=(raw="$LOG/loader_raw.md")
        step loader_raw 70 "$PY" benchmarks/bench_dataloader.py --data_path "$raw_list" --backends "$have_backends" \
            --num_samples 1,4 --workers "$workers" "${loader_args[@]}" || true
        if [[ -n $prep_list ]]; then
            step loader_prepared 55 "$PY" benchmarks/bench_dataloader.py --data_path "$prep_list" \
                --backends "$have_backends" --num_samples 1,4 --workers "$workers" "${loader_args[@]}" || true
            items+=(prepared="$LOG/loader_prepared.md")
        else
            note "loader on prepared videos: no prepared videos"
        fi
        local item
        for item in "${items[@]}"; do grep -h '^# ' "${item#*=}" | sed 's/^# /- /' || true; done
        echo
        "$PY" benchmarks/gpu_suite_tools.py merge --label videos "${items[@]}" || echo "(merging the tables failed)"
        echo
    fi

    if want e2e && [[ -n $raw_list ]]; then
        echo "## Whole pre-training iterations (benchmarks/bench_pretrain.py; the last of $e2e_epochs epoch(s))"
        echo
        local items=() raw_e2e prep_e2e=""
        raw_e2e=$(e2e_list "$raw_list")
        if [[ -n $prep_list ]]; then prep_e2e=$(e2e_list "$prep_list"); fi
        if backend_ok "$DEFAULT_BACKEND"; then
            step e2e_defaults 60 "$PY" benchmarks/bench_pretrain.py --bench_epochs "$e2e_epochs" \
                --data_path "$raw_e2e" ${e2e_common[@]+"${e2e_common[@]}"} || true
            items+=("program defaults: raw videos, $DEFAULT_BACKEND, batch $def_batch=$LOG/e2e_defaults.md")
        else
            note "e2e with the program's defaults: its default backend $DEFAULT_BACKEND is not installed"
        fi
        step e2e_raw_tuned 50 "$PY" benchmarks/bench_pretrain.py --bench_epochs "$e2e_epochs" --data_path "$raw_e2e" \
            ${e2e_common[@]+"${e2e_common[@]}"} --video_backend "$best" --num_workers "$workers" \
            --precision bf16 || true
        items+=("raw videos, $best, bf16, batch $def_batch=$LOG/e2e_raw_tuned.md")
        if [[ -n $prep_list ]]; then
            step e2e_recommended 50 "$PY" benchmarks/bench_pretrain.py --bench_epochs "$e2e_epochs" \
                --data_path "$prep_e2e" ${e2e_common[@]+"${e2e_common[@]}"} --video_backend "$best" \
                --num_workers "$workers" --precision bf16 --batch_size "$rec_batch" --num_sample 4 || true
            local rec="recommended: prepared videos, $best, bf16, batch $rec_batch x num_sample 4"
            items+=("$rec=$LOG/e2e_recommended.md")
        else
            note "e2e with the recommended settings: no prepared videos"
        fi
        "$PY" benchmarks/gpu_suite_tools.py merge --label setting --last_of epoch "${items[@]}" ||
            echo "(merging the tables failed)"
        echo
    fi

    if want frames && [[ -n $raw_list && -n $TQDM ]]; then
        echo "## Frame folders (tools/prepare_videos.py --format frames: the raw videos as JPEG images)"
        echo
        local frames_list=$WORK/videos/frames/raw.list
        if step prepare_frames 75 "$PY" tools/prepare_videos.py "$raw_list" "$WORK/videos/frames" --format frames \
            --no_progress "${prep_args[@]}"; then
            show "$LOG/prepare_frames.md" | sed 's/^/    /'
            echo
            step loader_frames 55 "$PY" benchmarks/bench_dataloader.py --data_path "$frames_list" --backends auto \
                --num_samples 1,4 --workers "$workers" "${loader_args[@]}" || true
            grep -h '^# ' "$LOG/loader_frames.md" 2>/dev/null | sed 's/^# /- /' || true
            echo
            "$PY" benchmarks/gpu_suite_tools.py merge --label videos frames="$LOG/loader_frames.md" ||
                echo "(merging the tables failed)"
            echo
            step e2e_frames 50 "$PY" benchmarks/bench_pretrain.py --bench_epochs "$e2e_epochs" \
                --data_path "$(e2e_list "$frames_list")" ${e2e_common[@]+"${e2e_common[@]}"} --num_workers "$workers" \
                --precision bf16 --batch_size "$rec_batch" --num_sample 4 || true
            "$PY" benchmarks/gpu_suite_tools.py merge --label setting --last_of epoch \
                "frame folders, bf16, batch $rec_batch x num_sample 4=$LOG/e2e_frames.md" ||
                echo "(merging the tables failed)"
        fi
        echo
    elif want frames; then
        note "frame folders: no raw videos, or no tqdm for tools/prepare_videos.py"
    fi

    if want compile; then
        echo "## Model only with torch.compile (backend $compile_backend; warm-up s includes compiling)"
        echo
        # Last: it takes the time the other sections left (up to 150 s), the largest batch first.
        step model_compile 150 "$PY" benchmarks/bench_pretrain_step.py "${model_args[@]}" --compile \
            --compile_backend "$compile_backend" --batch_size "${compile_batches[@]}" || true
        show "$LOG/model_compile.md"
        echo
    fi

    # With the time left: the host as tools/doctor.py sees it (a bf16 training step on the GPU, NCCL, both backends
    # agreeing, /dev/shm and other limits). What it finds broken is reported, not counted as a failure: the
    # sections above already skipped what could not run.
    if ((DEADLINE - $(date +%s) >= 30)); then
        if step doctor 60 bash -c '"$0" tools/doctor.py || echo "(doctor exit status $?)"' "$PY"; then
            echo "## Environment (tools/doctor.py)"
            echo
            echo '```'
            show "$LOG/doctor.md"
            echo '```'
            echo
        fi
    else
        note "tools/doctor.py: less than 30 s of the suite's budget left"
    fi

    echo "## Timings"
    echo
    echo "| section | limit s | took s | status |"
    echo "|---|---|---|---|"
    printf '%s\n' "${TIMES[@]}"
    echo
    if [[ -n ${OUT:-} || -n ${WORK_DIR:-} || ${KEEP_WORK:-0} == 1 ]]; then
        echo "Whole suite: $(($(date +%s) - START)) s. Every command's output: $LOG"
    else
        echo "Whole suite: $(($(date +%s) - START)) s. (Set OUT=DIR to keep every command's output.)"
    fi
    if ((${#NOTES[@]})); then
        echo
        echo "Skipped:"
        printf -- '- %s\n' "${NOTES[@]}"
    fi
    if ((FAILED)); then
        echo
        echo "$FAILED section(s) failed or timed out (see above)."
        return 1
    fi
}

if [[ -n ${OUT:-} ]]; then
    main | tee "$OUT/gpu_suite.md"
    exit "${PIPESTATUS[0]}"
fi
main
