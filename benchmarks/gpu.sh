#!/usr/bin/env bash
# The GPU figures of benchmarks/README.md, in one script for a machine with one CUDA GPU and the project's
# code on PYTHONPATH (a machine lent for minutes: every part has its own time limit, and a part that fails
# or runs out of time leaves the others standing). Each part's output goes to $OUT/<part>.txt.
#
#   OUT=runs/gpu bash benchmarks/gpu.sh                                  # every part, up to ~15 min
#   OUT=runs/gpu PARTS="meta_step_small_cnn knn_refresh" bash benchmarks/gpu.sh    # the parts named
#
# The parts: the meta-step table of each model (every method, MLNT's M look-aheads also batched with vmap,
# the trusted-set meta methods also at meta_every 5, MW-Net's example weights, MixNN with its index on the
# CPU and on the GPU); ResNet-32's baselines and trusted-set meta methods under bf16-mixed beside fp32
# (meta_step_bf16_resnet32); and one epoch's kNN refresh at 1,000,000 x 256 against exact torch top-k on the
# GPU, timed on every query, with the index where a run puts it (knn_refresh) and kept on FAISS
# (knn_refresh_faiss: CPU FAISS without a faiss-gpu build).
set -u
OUT=${OUT:-runs/gpu}
PARTS=${PARTS:-meta_step_resnet32 meta_step_small_cnn meta_step_bf16_resnet32 knn_refresh knn_refresh_faiss}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

part() {  # part NAME SECONDS COMMAND...: run COMMAND under a time limit, its output in $OUT/NAME.txt
    local name=$1 limit=$2
    shift 2
    [[ " $PARTS " == *" $name "* ]] || return 0
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
    echo "== $name: exit $? after $((SECONDS - start))s"
    tail -n 60 "$OUT/$name.txt"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, faiss; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'faiss', faiss.__version__, 'faiss GPUs', faiss.get_num_gpus())"

METHODS="ce glc mwnet mwnet-example mlc metalabelnet mlnt-first-order mlnt-second-order mlnt-first-order-vmap
    mlnt-second-order-vmap mixnn mixnn-steps mixnn-gpu-index"
# One process per model, so that a model that runs out of time leaves the other's table standing.
part meta_step_resnet32 "${META_STEP_LIMIT:-240}" python3 benchmarks/meta_step.py --device cuda \
    --repeats 20 --models resnet32 --methods $METHODS --meta-every 5
part meta_step_small_cnn "${META_STEP_LIMIT:-240}" python3 benchmarks/meta_step.py --device cuda \
    --repeats 20 --models small-cnn --methods $METHODS --meta-every 5
# bf16-mixed beside fp32 (scaling.precision): the baselines, the trusted-set meta methods, MixNN.
BF16_METHODS="ce glc mwnet mlc metalabelnet mwnet-example mixnn"
part meta_step_bf16_resnet32 "${META_STEP_LIMIT:-240}" python3 benchmarks/meta_step.py --device cuda \
    --repeats 20 --models resnet32 --methods $BF16_METHODS --bf16
part knn_refresh "${KNN_LIMIT:-200}" python3 benchmarks/knn_refresh.py --device cuda --exact-queries 1000000
part knn_refresh_faiss "${KNN_LIMIT:-200}" python3 benchmarks/knn_refresh.py --device cuda \
    --exact-queries 1000000 --backend faiss
