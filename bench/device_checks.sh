#!/usr/bin/env bash
# The checks that need a GPU (one GPU and its node's cores), in one call of a few minutes; each bench leaves its
# record under docs/results/ (copied to $1 as it lands, where given):
#   - tests/test_host_reads.py's GPU test: a non-log step of each method under set_sync_debug_mode("error");
#   - bench/step_cost.py at R101 / 512 in bf16 and fp32: DeepSpeed / plain, channels-last, FLOPs and MFU;
#   - bench/loader_feed.py: the GPU config's loader workers feeding its Trainer (data wait share);
#   - bench/checkpoint_stall.py: an R101 checkpoint from GPU memory to local disk (stall ratio).
# A failing check does not stop the next. Usage: bash bench/device_checks.sh [folder for the records]
set -u
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
copy_to=${1:-}
export DS_ACCELERATOR=cuda PYTHONUNBUFFERED=1
r101=(--config configs/voc-r101.yaml --set model.pretrained=null --batch 4 --size 512 --classes 21 --device cuda
      --default-workers 0 --repeats 20)
status=0
since=$(mktemp)  # records newer than this are this call's

check() {
    echo "== $* ($(date +%T))"
    "$@" || { echo "== failed ($?): $*"; status=1; }
    if [ -n "$copy_to" ]; then find docs/results -name '*.json' -newer "$since" -exec cp {} "$copy_to"/ \; ; fi
}

check "$py" -c "import torch, deepspeed, ray, webdataset, pydantic; print(torch.__version__, deepspeed.__version__, ray.__version__, torch.cuda.get_device_name())"
check "$py" -m pytest -q -p no:cacheprovider -m gpu tests/test_host_reads.py
check "$py" bench/step_cost.py "${r101[@]}" --precision bf16
check "$py" bench/step_cost.py "${r101[@]}" --precision fp32
check "$py" bench/loader_feed.py --config configs/voc-r101.yaml --images 192 --image-size 512 --steps 10
check "$py" bench/checkpoint_stall.py --device cuda --targets local --backbone resnet101 --batch 4 --size 512
exit $status
