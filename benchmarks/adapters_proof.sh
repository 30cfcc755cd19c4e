#!/usr/bin/env bash
# The adapters proof end to end, sized for one GPU call (see docs/adapters.md): pretrain a small qwen3 base with
# needle rows (mlx-lm, full attention at LEN), fuse, convert to TitansQwen (window WIN), check that the base retrieves
# within its context, train memory adapters on samples of SAMPLE tokens, and run the needles for every method side by
# side (stock full attention and rotating cache, the window alone, the adapters with the memory's updates on and off).
# The adapters train on mixed lengths (SAMPLE: 4x, 8x and 16x the window) with number needles twice as often as pass
# keys, the CPU proof's recipe (number at 16x from 5% to 95%; docs/adapters.md: equal weighting did as well).
# Every stage is bounded by `timeout` so that a partial run still leaves its results in OUT.
#   bash benchmarks/adapters_proof.sh                       # settings below; override any as VAR=value
# LIMIT=seconds bounds the whole run: the needles get what the stages before them left (NIAH_S overrides).
# STAGES="model train fuse" BASE_DATA=../shared/data/books: the base's tokenizer and data were made before (under
# $W/base, e.g. carried to a GPU machine) from the books at BASE_DATA. CONVERT_ARGS adds flags to the conversion (e.g. "-q --q-bits 8").
set -uo pipefail
T0=${T0:-$(date +%s)}
W=${W:-runs/proof}; B=${BOOKS:-../shared/data/books}; OUT=${OUT:-$W/out}
ITERS=${ITERS:-1200}; BATCH=${BATCH:-128}; LEN=${LEN:-256}; WIN=${WIN:-64}; SAMPLE=${SAMPLE:-"256 512 1024"}; ABATCH=${ABATCH:-16}
SIZES=${SIZES:-"hidden_size=384 num_hidden_layers=6 num_attention_heads=6 num_key_value_heads=2 head_dim=64 intermediate_size=1152"}
mkdir -p "$OUT"
el() { echo "[$(($(date +%s) - T0)) s] $*"; }
python3 -m benchmarks.qwen_base ${STAGES:-tokenizer model data train fuse} --work $W/base --data ${BASE_DATA:-$B} --vocab-size 8192 \
  --seq-len $LEN --tokens 16000000 --valid-tokens 131072 --needle-fraction 0.6 --needle-tasks passkey number \
  --sizes $SIZES --iters $ITERS --batch-size $BATCH --learning-rate 1e-3 --steps-per-report 100 \
  --steps-per-eval 400 --val-batches 4 --save-every $ITERS
el trained
python3 -m mlx_titans.qwen.convert --hf-path $W/base/base --mlx-path $W/titans --dtype bfloat16 --window $WIN \
  --sink-tokens 4 --segment-size $WIN --chunk-size 16 --memory-heads 4 --memory-dim-head 64 \
  --memory '{"max_decay": 0.1, "init_decay_bias": -4.0, "batch_size": null}' ${CONVERT_ARGS:-}
el converted
timeout ${CHECK_S:-60} python3 -m benchmarks.niah --qwen $W/titans --stock full --tasks passkey number \
  --lengths $((LEN / 2)) $LEN --samples 10 --haystack $B/valid --out $OUT/base_check.json
el checked
[ -n "${LIMIT:-}" ] && ADAPT_S=${ADAPT_S:-$(( (LIMIT - $(date +%s) + T0) * 55 / 100 ))}
timeout ${ADAPT_S:-900} python3 -m mlx_titans.adapt --model $W/titans --data $B --adapter-path $W/adapters \
  --sample-length $SAMPLE --batch-size $ABATCH --iters ${AITERS:-200} --learning-rate 2e-3 --warmup 10 \
  --needle-fraction 0.7 --needle-tasks number number passkey --steps-per-report 5 --steps-per-eval 50 --val-batches 2 \
  --save-every 20
cp $W/adapters/log.jsonl $OUT/adapt_log.jsonl 2>/dev/null
el adapted
A=$W/adapters; [ -f $A/adapters.safetensors ] || A=$(ls -d $A/step-* 2>/dev/null | sort -V | tail -1)
NIAH_S=${NIAH_S:-$(( ${LIMIT:-100000} - $(date +%s) + T0 ))}
timeout $NIAH_S python3 -m benchmarks.niah --qwen $W/titans ${A:+--adapters $A --memory-updates on off} \
  --stock full rotating --tasks passkey number --lengths ${LENGTHS:-128 256 512 1024 2048} --samples ${SAMPLES:-50} \
  --haystack $B/valid --perplexity-length $((32 * WIN)) --perplexity-windows 8 --out $OUT/adapters_proof.json
el done
