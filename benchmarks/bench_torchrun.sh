#!/usr/bin/env bash
# Every step after the labels, run by one process and then by N processes through torchrun (one GPU
# each), on the same labels; prints each step's wall time (model loading included) and checks that the
# two runs wrote the same files.
#   bash benchmarks/bench_torchrun.sh MODEL_DIR DATA_FILE NUM_DATA N_STEPS NPROC OUT_JSON
set -euo pipefail
model=$1 data=$2 num=$3 steps=$4 nproc=$5 out=$6
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
root=$(mktemp -d)
python3 label_generation.py --model_name "$model" --dataset "$data" --num_data "$num" --dtype bfloat16 \
    --result_dir "$root/one" --device cuda > /dev/null 2>&1
cp -r "$root/one" "$root/many"
declare -A t
for step in "Mag_attention.py" "Mag_mlp.py" "attribution_attention.py --metric gradient gxo" \
            "attribution_attention.py --metric ig --n_steps $steps --batch_size 256" "main.py"; do
    for who in one many; do
        launch="python3"
        [ "$who" = many ] && launch="python3 -m torch.distributed.run --standalone --nproc_per_node $nproc"
        start=$EPOCHREALTIME
        $launch $step --result_dir "$root/$who" --device cuda > /dev/null 2>&1
        t["$who|$step"]=$(awk "BEGIN {printf \"%.1f\", $EPOCHREALTIME - $start}")
    done
    echo "$step: 1 process ${t["one|$step"]} s, $nproc processes ${t["many|$step"]} s"
done
python3 benchmarks/compare_runs.py "$root/one" "$root/many" --json "$out"
