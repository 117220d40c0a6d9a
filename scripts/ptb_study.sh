#!/usr/bin/env bash
# The reduced-scale character-level Penn Treebank study behind benchmarks/results/*-ptb-study.md:
# the four models of the paper's Table 2 over several seeds, then the runs that ask why the plain
# HyperLSTM trails (scaling vectors started at 1.0 instead of 0.1, a higher learning rate, no recurrent
# dropout as in the nn.LSTM row, longer training).
# Each run writes its learning curve and result to OUT/NAME.json; the table and the plot come from
#     python -m hyperfused.train plot OUT/*.json --png curves.png --csv curves.csv --table table.md
# Usage: scripts/ptb_study.sh OUT [JOBS]   (JOBS runs at once, one thread each; STEPS, SEEDS in the environment)
set -euo pipefail
out=${1:?usage: scripts/ptb_study.sh OUT [JOBS]}
jobs=${2:-2}
steps=${STEPS:-1500}
seeds=${SEEDS:-"0 1 2"}
py=${PYTHON:-python}
mkdir -p "$out"
common="--hidden 256 --hyper-size 64 --hyper-embed 8 --batch-size 32 --seq-len 100 --eval-every 250 --quiet"
{
  for s in $seeds; do
    for m in lstm ln-lstm hyperlstm ln-hyperlstm; do echo "$m-s$s --model $m --seed $s --steps $steps"; done
  done
  for s in $seeds; do echo "hyperlstm-d1-s$s --model hyperlstm --scale-init 1.0 --seed $s --steps $steps"; done
  for m in lstm hyperlstm; do echo "$m-lr3e-3-s0 --model $m --lr 3e-3 --seed 0 --steps $steps"; done
  # nn.LSTM has no recurrent dropout: the plain HyperLSTM without it, as the lstm row trains
  for s in 0 1; do echo "hyperlstm-rd0-s$s --model hyperlstm --recurrent-dropout 0 --seed $s --steps $steps"; done
  for m in lstm hyperlstm; do echo "$m-long-s0 --model $m --seed 0 --steps $((3 * steps))"; done
  echo "hyperlstm-rd0-long-s0 --model hyperlstm --recurrent-dropout 0 --seed 0 --steps $((3 * steps))"
} | while read -r name args; do
  [ -e "$out/$name.json" ] || echo "$name $args"   # finished runs are kept: rerunning resumes the study
done | xargs -P "$jobs" -L 1 bash -c '
  name=$0
  OMP_NUM_THREADS=1 '"$py"' -m hyperfused.train charlm '"$common"' "$@" --log "'"$out"'/$name.json.tmp" \
    > "'"$out"'/$name.txt" 2>&1 && mv "'"$out"'/$name.json.tmp" "'"$out"'/$name.json" && echo "done $name"'
