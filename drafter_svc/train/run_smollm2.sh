#!/usr/bin/env bash
# The recipe that produced models/dspark-smollm2-135m (docs/TRAINING.md), stage by stage.
# Every stage is resumable/idempotent; run from the repository root:
#   drafter_svc/train/run_smollm2.sh datagen | cache | fit | ablation | finish | eval-dspark | eval-rank0 | report
# Continuing the committed drafter on prompts it has not seen (third session, docs/TRAINING.md):
#   drafter_svc/train/run_smollm2.sh datagen-more | continue | finish-continued | eval-dspark | report
# Fourth session: sampled answers (DeepSpec's sampling) for gsm8k + livecodebench, a second warm-start
# continuation on them, and the draft vocabulary counted on all regenerated answers:
#   drafter_svc/train/run_smollm2.sh datagen-300 | datagen-sampled | continue-sampled | finish-sampled | vocab | eval-dspark
# Sixth session: sampled answers (seed 2) to livecodebench and to arena-hard + gsm8k, and a third
# continuation trained over the draft vocabulary (~4x cheaper steps):
#   drafter_svc/train/run_smollm2.sh datagen-s2 | continue-vocab (+ datagen-s3 alongside) | finish-vocab | eval-dspark
# Seventh session (a fresh checkout: no earlier caches), seed-4 sampled answers and a fourth continuation:
#   drafter_svc/train/run_smollm2.sh datagen-s4 | continue-s4 | finish-s4 | eval-dspark
#   drafter_svc/train/run_smollm2.sh datagen-s5 | datagen-s6 | continue-s5 | finish-s5   (eighth session)
#   drafter_svc/train/run_smollm2.sh datagen-s7 | continue-s7 | finish-s7 | archive-s7   (ninth session)
#   (a later session: cache-archived rebuilds caches from data/answers/ without regenerating)
#   drafter_svc/train/run_smollm2.sh datagen-seed | cache-archived | continue-s8 | finish-s8 | archive-seed   (tenth)
#   drafter_svc/train/run_smollm2.sh cache-archived | continue-archived | finish-archived (+ SEED=9 datagen-seed)   (eleventh)
#   SETS=s9 cache-archived + SEED=9 datagen-seed, then continue-s10 (+ SEED=10 datagen-seed) | finish-s10   (twelfth)
#   SETS=s10 cache-archived + SEED=11 datagen-seed, then continue-s11 | finish-s11   (thirteenth)
#   SETS=s12, SETS=s11 cache-archived + SEED=12 unarchive-seed, datagen-seed; continue-s12 | finish-s12   (fourteenth)
#   SETS='s1[34]', SETS=s12 cache-archived + SEED=13 unarchive-seed, datagen-seed; continue-s13 | finish-s13   (fifteenth)
#   SETS='s1[34]', SETS=s12 cache-archived (both cores), then continue-s16 | finish-s16   (sixteenth)
#   SETS='s1[34]', SETS=s12 cache-archived + FILES=arena-hard-v2-head500 AT=250 SEED=14 datagen-seed, FILES=... SEED=15
#   datagen-seed, SEED=13 unarchive-seed, datagen-seed; continue-s17 | finish-s17   (seventeenth: chat first)
#   SETS='s1[67]' + DIRS='<s13's unread slices>' cache-archived, FILES=arena-hard-v2-head500 AT='0 250' SEED=18
#   datagen-seed, SETS=s15 cache-archived, FILES='livecodebench gsm8k-head1000' AT=0 SEED=18 datagen-seed;
#   continue-s18 | finish-s18   (eighteenth: the archive no fit had read, and new chat)
#   SETS=s19 + DIRS='<s18's unread livecodebench>' cache-archived, FILES=arena-hard-v2-head500 AT='0 250' SEED=20
#   datagen-seed, DIRS='<s18's chat>' cache-archived, FILES='livecodebench gsm8k-head1000' AT='0 250 500' SEED=20
#   datagen-seed; N=19 CACHES=... continue-session | finish-session   (nineteenth: the generic stage's first use)
#   DIRS='<s21's chat, s20's unread livecodebench>' cache-archived, FILES=arena-hard-v2-head500 AT=0 SEED=22
#   datagen-seed, DIRS='<s20's gsm8k, s21's livecodebench, s20's chat>' cache-archived; N=20 CACHES=... continue-session
#   (its globs watched by fit: no restarts) | finish-session   (twentieth: not committed)
#   SETS=A DIRS='<s21+s22 chat, s20's unread livecodebench>' and SETS=B DIRS='<s20's gsm8k, s23 chat, s21's livecodebench>'
#   cache-archived side by side, N=21 CACHES=... continue-session at ~2 000 cached, DIRS='<s21 gsm8k 0-499>'
#   cache-archived | finish-session   (twenty-first: the fit started once ~2 000 were cached, committed)
#   SETS=A DIRS='<s23 ah 250-499, s24+s26 chat>' and SETS=B DIRS='<s21 gsm8k 500-999, s25 gsm8k, s24 livecodebench>'
#   cache-archived side by side, N=22 CACHES='runs/smollm2/cache_archived/*/ runs/smollm2/cache_s2[7-9]/*/' continue-session
#   at ~1 870 cached, FILES=livecodebench AT='0 250' SEED=27 datagen-seed beside it | average-session   (twenty-second:
#   the fit interpolated with the drafter it started from, alpha by held-out tau_prob)
#   SETS=A DIRS='<s27's unread slices>' cache-archived then FILES='arena-hard-v2-head500 gsm8k-head1000' AT='0 250' SEED=28
#   datagen-seed, and SEED=27 unarchive-seed + FILES='livecodebench gsm8k-head1000' AT='500 750 1000' SEED=27 datagen-seed;
#   N=23 CACHES=... STEPS=6000 continue-session at ~2 000 cached | average-session   (twenty-third)
#   SETS=A DIRS='<s29's unread slices>' cache-archived, SEED=29 unarchive-seed, FILES='arena-hard-v2-head500 livecodebench'
#   AT='0 250 500 750 1000' SEED=29 datagen-seed and FILES='gsm8k-head1000 arena-hard-v2-head500' AT='0 250' SEED=30
#   datagen-seed side by side; N=24 CACHES=... STEPS=5500 continue-session at ~1 740 cached | average-session;
#   TEMPS='0 1' eval-dspark: T = 1 now by the expected replay on 50 x 128 (twenty-fourth)
#   the same with seeds 31 (archive, then completed by key) and 32; N=25 STEPS=5000 continue-session at ~2 700
#   cached | average-session   (twenty-fifth)
#   the same with seed 32's rest, seeds 33 and 34; N=26 STEPS=6000 continue-session at ~2 000 cached | average-session
#   (twenty-sixth: alpha 0.5)
#   the same with seeds 35 (archive), 34's gsm8k + livecodebench and 36; N=27 STEPS=5500 continue-session at ~1 800
#   cached, datagen stopped 30 min into it | ALPHAS='0 0.25 0.5 0.75 1.0' average-session   (twenty-seventh: alpha 0.25)
#   the same with seed 37 (archive), 34's livecodebench 500+ and gsm8k 750+, 38; N=28 STEPS=5500 continue-session at
#   ~1 550 cached, datagen stopped 35 min into it | ALPHAS='0 0.25 0.5 0.75 1.0' average-session   (twenty-eighth: alpha 0.25)
#   the same with seed 39 (archive), 38's arena-hard 128+ and 40; N=29 STEPS=5500 continue-session at ~1 300 cached,
#   datagen stopped 20 min into it | ALPHAS='0 0.25 0.5' average-session   (twenty-ninth: a wash, not committed)
#   a GPU lease: gpu_lease.sh (`dspark train online`, two learning rates, then stage 2 by hand), online-import,
#   cache-heldout, RUN=... N=30 finish-online   (thirtieth: every archived answer on one H200, committed)
#   TRAIN=data/prompts SEED=48 FILES=general-chat AT='1500 ... 2750' and FILES=general-tasks AT='0 ... 1250'
#   datagen-seed, DIRS='<s46, s47, s42 gsm8k, s43 livecodebench 0-249>' cache-archived; LR=1e-4 N=34 STEPS=5000
#   CACHES=... continue-session, then `train average --alpha 0.25` + export   (thirty-fourth: prose and tasks)
#   (SEED=N unarchive-seed puts a partly archived seed back into runs/ before datagen-seed completes it)
# (`fit` and `ablation` run side by side, one core each; `datagen` runs two shards side by side.)
# Long stages are meant for `nohup ... &`. One torch thread everywhere (OpenMP contention on the
# shared 2-core machine makes more threads ~10x slower).
set -euo pipefail
export OMP_NUM_THREADS=1
PY=${PY:-.venv/bin/python}
R=runs/smollm2
STEPS=${STEPS:-3000}
EVAL_LIMIT=${EVAL_LIMIT:-50}         # greedy table: replayed rounds (cheap)
EVAL_TOKENS=${EVAL_TOKENS:-128}
T1_LIMIT=${T1_LIMIT:-6}              # T = 1 with LOOP=1: the real decode loop (~0.3 s per round here)
T1_TOKENS=${T1_TOKENS:-64}
T1_SEED=${T1_SEED:-777}              # T = 1 otherwise: the expected replay's target samples (prompt i: seed + i)
TRAIN=${TRAIN:-../shared/data/prompts/train}  # TRAIN=data/prompts FILES=general-chat (or general-tasks): composed prompts
TEMPS=${TEMPS:-"0 1"}
EVAL_DIR=${EVAL_DIR:-$R/eval}
EVAL_FILES=${EVAL_FILES:-"$(ls ../shared/data/prompts/eval/*.jsonl 2>/dev/null || ls /work/shared/data/prompts/eval/*.jsonl)"}
# sixth session's caches (read as one); cache_s3 joined the fit when it was restarted at step ~5500
CACHES6=${CACHES6:-"$R/cache_s2a $R/cache_s2b $R/cache_s3"}
CACHES7=${CACHES7:-"$R/cache_s4a $R/cache_s4b"}
# eighth session: cache_s6 (datagen-s6, beside the fit) joined when the fit was restarted at step 8 650
CACHES8=${CACHES8:-"$R/cache_s5a $R/cache_s5b $R/cache_s6"}
FIT_ARGS="--cache $R/cache --steps $STEPS --batch-seqs 1 --num-anchors 48 --block-size 7 --layers 2 --ckpt-every 50"
mkdir -p $R/logs $EVAL_DIR docs/img

continue_committed() {  # continue_committed SNAPSHOT CACHES LR OUT [fit args...]: warm start from the committed drafter
  # snapshotted first: `export` overwrites models/dspark-smollm2-135m
  mkdir -p $R/$1 && cp -n models/dspark-smollm2-135m/* $R/$1/
  set -f  # CACHES may be glob patterns, which fit itself expands (and watches)
  $PY -m dspark_common.cli train fit ${FIT_ARGS/--cache $R\/cache/--cache $2} --markov-rank 64 \
    --init-from $R/$1 "${@:5}" --lr $3 --out $R/$4
  set +f
}

continue_session() {  # continue_session N CACHE_GLOBS: the committed drafter (snapshot initN) over its draft
  # vocabulary on the caches matching CACHE_GLOBS, run fitN; fit watches the globs, so a directory a cache
  # build begins beside it joins at the next checkpoint (until the twentieth session a watcher restarted it)
  continue_committed init$1 "$2" ${LR:-2e-4} fit$1 --draft-vocab $R/init$1
}

finish_session() {  # finish_session N CACHE_DIRS: finish_run for continue_session's fitN, curves loss_curves_sN.png
  finish_run fit$1 "$2" docs/img/loss_curves_s$1.png
}

average_session() {  # average_session N CACHE_DIRS: fitN interpolated with initN (`train average`, the alpha of best
  # held-out tau_prob among ALPHAS) as run avgN, then finish_run on it (twenty-second session on)
  $PY -m dspark_common.cli train average --run $R/fit$1 --out $R/avg$1 --alpha ${ALPHAS:-0.25 0.5 0.75 1.0} --cache $2
  finish_run avg$1 "$2" docs/img/loss_curves_s$1.png
}

finish_run() {  # finish_run FIT CACHES CURVES_PNG [extra curves dict]: calibrate, export the default drafter, loss curves
  $PY -m dspark_common.cli train calibrate --cache $2 --run $R/$1 --plot docs/img/reliability.png
  $PY -m dspark_common.cli train export --run $R/$1 --out models/dspark-smollm2-135m
  $PY -c "from drafter_svc.train.fit import plot_curves; plot_curves('$R/$1/log.jsonl', '$3'${4:+, $4})"
}

datagen_run() {  # datagen_run ARGS...: `dspark train datagen` with every stage's length cap, batch and one thread
  $PY -m dspark_common.cli train datagen --max-new-tokens 128 --batch-size 64 --threads 1 "$@"
}

existing_caches() {  # existing_caches DIR...: those DIRs a cache build has begun in (manifest written)
  for d in "$@"; do [[ -f ${d%/}/manifest.json ]] && echo -n "${d%/} "; done
}

caches_by_birth() {  # caches_by_birth DIR...: those begun, in the order their builds began (birth time, then
  # name): a restarted fit finds every earlier cache at the same position (its keys name positions), so
  # the epoch order it resumes stays valid when new directories join at the end
  existing_caches $(for d in "$@"; do [[ -d $d ]] && echo "$(stat -c %W "$d") ${d%/}"; done | sort -k1,1n -k2,2 | cut -d' ' -f2)
}

caches_seed() {  # caches_seed SEED: that seed's slices cached so far (one in progress is read as it grows),
  # in the order they were begun (by birth, not by mtime, which moves whenever a shard is written)
  caches_by_birth $R/cache_s$1/*/
}
caches_s7() { caches_seed 7; }

caches_archived() {  # caches_archived [SET]: the caches rebuilt from data/answers/ (cache-archived), in name
  # order; with SET (e.g. s10) only that set's
  existing_caches $(ls -d $R/cache_archived/${1:+$1.}*/ 2>/dev/null)
}
caches_s8() {  # the tenth session's fit: every archived cache, then the seed-8 slices cached so far
  caches_archived; caches_seed 8
}

caches_s10() {  # the twelfth session's fit: seed 9 (archived, then completed) and seed 10 as it is generated
  caches_archived s9; caches_seed 9; caches_seed 10
}

caches_s11() {  # the thirteenth session's fit: seed 10 (archived) and seed 11 as it is generated
  caches_archived s10; caches_seed 11
}

caches_s12() {  # the fourteenth session's fit: seed 12's archived part (never trained on), seed 11 (joined the
  # thirteenth fit late), then the seed-12 slices generated this session (datagen resumes by key, so the
  # archived answers are not cached twice)
  caches_archived s12; caches_archived s11; caches_seed 12
}

caches_s13() {  # the fifteenth session's fit: the archived answers of seeds 12-14 (13 and 14 never trained on by
  # a committed drafter) and the seed-13 slices generated in the session, in the order their caches were begun
  caches_by_birth $R/cache_archived/s1[234].*/ $R/cache_s13/*/
}

caches_s17() {  # the seventeenth session's fit: the archive of seeds 12-14 as caches_s13, and the slices
  # generated in the session (seed 13's rest, chat under seeds 14 and 15), in the order their caches were begun
  caches_by_birth $R/cache_archived/s1[234].*/ $R/cache_s1[345]/*/
}

caches_s18() {  # the eighteenth session's fit: the archived answers no fit had read (seeds 16, 17 and the rest of
  # 13), seed 15's chat cached again, and seed 18's slices generated in the session, in the order their
  # caches were begun
  caches_by_birth $R/cache_archived/s1[3-7].*/ $R/cache_s18/*/
}

stage_seed() {  # stage_seed STAGE: the ninth session's *-s7 stages use seed 7, the *-seed ones SEED (default 8)
  [[ $1 == *-s7 ]] && echo 7 || echo ${SEED:-8}
}

eval_run() {  # eval_run LABEL DRAFTER_DIR
  for t in $TEMPS; do
    if [[ "$t" == 0 ]]; then  # greedy: rounds replayed on the target's greedy path (exact, ~40x cheaper)
      $PY -m dspark_common.cli eval --dataset $EVAL_FILES --limit "$EVAL_LIMIT" --max-new-tokens "$EVAL_TOKENS" \
        --block-size 7 --temperature 0 --replay --replay-cache $R/replay --drafter "$2" --json > "$EVAL_DIR/$1_T$t.jsonl.tmp"
    elif [[ -n ${LOOP:-} ]]; then  # LOOP=1: the real decode loop, T1_LIMIT x T1_TOKENS (sampling noise ~0.2 τ)
      $PY -m dspark_common.cli eval --dataset $EVAL_FILES --limit "$T1_LIMIT" --max-new-tokens "$T1_TOKENS" \
        --block-size 7 --temperature "$t" --drafter "$2" --json > "$EVAL_DIR/$1_T$t.jsonl.tmp"
    else  # expected rounds along one seeded target sample per prompt (train/expected_replay.py): the
      # same 50 x 128 prompts as greedy, no sampling noise, the same paths for every drafter
      $PY -m dspark_common.cli eval --dataset $EVAL_FILES --limit "$EVAL_LIMIT" --max-new-tokens "$EVAL_TOKENS" \
        --block-size 7 --temperature "$t" --seed "$T1_SEED" --replay --replay-cache $R/replay --drafter "$2" \
        --json > "$EVAL_DIR/$1_T$t.jsonl.tmp"
    fi
    mv "$EVAL_DIR/$1_T$t.jsonl.tmp" "$EVAL_DIR/$1_T$t.jsonl"
  done
}

case "${1:-}" in
  datagen)  # greedy answers + their target cache in one pass, two shards side by side (resumable)
    for i in 0 1; do
      datagen_run --prompts $TRAIN/gsm8k-head1000.jsonl $TRAIN/livecodebench.jsonl \
        $TRAIN/arena-hard-v2-head500.jsonl --limit 2400 \
        --sampling greedy --shard $i/2 --out $R/data --cache $R/cache > $R/logs/datagen.$i.log 2>&1 &
    done
    wait ;;
  datagen-more)  # prompts 1600..2554 of the same interleaved list (new to the drafter) + arena-hard again
    for i in 0 1; do
      datagen_run --prompts $TRAIN/gsm8k-head1000.jsonl $TRAIN/livecodebench.jsonl \
        $TRAIN/arena-hard-v2-head500.jsonl --limit 2555 --skip 1600 \
        --sampling greedy --shard $i/2 --out $R/data --cache $R/cache > $R/logs/datagen.$i.log 2>&1 &
    done
    wait
    datagen_run --prompts $TRAIN/arena-hard-v2-head500.jsonl --limit ${ARENA:-250} \
      --sampling greedy --out $R/data_arena --cache $R/cache \
      > $R/logs/datagen.arena.log 2>&1 ;;
  datagen-300)  # the first 300 interleaved prompts, greedy, one process (fourth session: vocabulary counts)
    datagen_run --prompts $TRAIN/gsm8k-head1000.jsonl $TRAIN/livecodebench.jsonl \
      $TRAIN/arena-hard-v2-head500.jsonl --limit 300 \
      --sampling greedy --out $R/data --cache $R/cache > $R/logs/datagen.vocab.log 2>&1 ;;
  datagen-sampled)  # temperature 0.7 / top-p 0.8 / top-k 20 answers: new sequences for prompts already seen
    datagen_run --prompts $TRAIN/gsm8k-head1000.jsonl $TRAIN/livecodebench.jsonl \
      --limit 2055 --sampling deepspec --seed 1 \
      --out $R/data_s --cache $R/cache_s > $R/logs/datagen.s.log 2>&1 ;;
  datagen-s3)  # once datagen-s2 is done and a core is free: more sampled answers (seed 3), one process
    datagen_run --prompts $TRAIN/gsm8k-head1000.jsonl $TRAIN/arena-hard-v2-head500.jsonl \
      $TRAIN/livecodebench.jsonl --sampling deepspec --seed 3 \
      --out $R/data_s3 --cache $R/cache_s3 > $R/logs/datagen.s3.log 2>&1 ;;
  datagen-s2)  # two processes side by side, each with its own cache: code / chat + math
    datagen_run --prompts $TRAIN/livecodebench.jsonl \
      --sampling deepspec --seed 2 --out $R/data_s2a --cache $R/cache_s2a > $R/logs/datagen.s2a.log 2>&1 &
    datagen_run --prompts $TRAIN/arena-hard-v2-head500.jsonl $TRAIN/gsm8k-head1000.jsonl \
      --sampling deepspec --seed 2 --out $R/data_s2b \
      --cache $R/cache_s2b > $R/logs/datagen.s2b.log 2>&1 &
    wait ;;
  datagen-s4)  # seventh session: seed 4, as datagen-s2 (a fresh checkout has no earlier caches: runs/ is not committed)
    datagen_run --prompts $TRAIN/livecodebench.jsonl \
      --sampling deepspec --seed 4 --out $R/data_s4a --cache $R/cache_s4a > $R/logs/datagen.s4a.log 2>&1 &
    datagen_run --prompts $TRAIN/gsm8k-head1000.jsonl $TRAIN/arena-hard-v2-head500.jsonl \
      --sampling deepspec --seed 4 --out $R/data_s4b \
      --cache $R/cache_s4b > $R/logs/datagen.s4b.log 2>&1 &
    wait ;;
  datagen-s5)  # eighth session: seed 5; code on one core, chat then maths on the other, so the set stays
    # balanced however early it is stopped (one shortest-first queue would answer gsm8k first)
    datagen_run --prompts $TRAIN/livecodebench.jsonl \
      --sampling deepspec --seed 5 --out $R/data_s5a --cache $R/cache_s5a > $R/logs/datagen.s5a.log 2>&1 &
    { for f in arena-hard-v2-head500 gsm8k-head1000; do
        datagen_run --prompts $TRAIN/$f.jsonl \
          --sampling deepspec --seed 5 --out $R/data_s5b --cache $R/cache_s5b
      done > $R/logs/datagen.s5b.log 2>&1; } &
    wait ;;
  datagen-s7|datagen-seed)  # ninth session (seed 7), tenth on (SEED, default 8): 250-prompt slices of code,
    # chat and maths in turn (one cache each), so the set stays balanced however early it is stopped;
    # NOCACHE=1 writes the answers only (to archive for a later session, whose cache-archived builds the cache);
    # FILES / AT narrow it to some prompt files / slice starts (e.g. the chat slices a seed's archive lacks)
    s=$(stage_seed $1)
    { for at in ${AT:-0 250 500 750 1000}; do for f in ${FILES:-livecodebench arena-hard-v2-head500 gsm8k-head1000}; do
        [[ $at -lt $(wc -l < $TRAIN/$f.jsonl) ]] || continue
        datagen_run --prompts $TRAIN/$f.jsonl \
          --limit $((at + 250)) --skip $at --sampling deepspec --seed $s \
          --out $R/data_s$s/$f.$at $([[ -n ${NOCACHE:-} ]] || echo --cache $R/cache_s$s/$f.$at)
      done; done > $R/logs/datagen.s$s.log 2>&1; } ;;
  datagen-s6)  # eighth session, one core beside the fit: seed 6, code and chat (the furthest from their floors)
    datagen_run --prompts $TRAIN/livecodebench.jsonl $TRAIN/arena-hard-v2-head500.jsonl \
      --sampling deepspec --seed 6 --out $R/data_s6 \
      --cache $R/cache_s6 > $R/logs/datagen.s6.log 2>&1 ;;
  continue-s5)  # eighth session: the committed drafter (snapshot init8) on those of CACHES8 that exist when
    # it (re)starts (read as they grow; re-run it once datagen-s6 has begun, as at step 8 650)
    continue_committed init8 "$(existing_caches $CACHES8)" \
      ${LR:-2e-4} fit8 --draft-vocab $R/init8 ;;
  finish-s5)
    finish_run fit8 "$CACHES8" docs/img/loss_curves_s5.png ;;
  archive-s7|archive-seed)  # keep a seed's answers (gzipped token ids, ~0.5 MB per 250): runs/ is not
    # committed, and rebuilding a cache from answers (`cache-archived`, ~1 s a sequence) beats
    # regenerating them (~1.8 s)
    s=$(stage_seed $1)
    for d in $R/data_s$s/*/; do
      n=$(basename $d); mkdir -p data/answers/s$s/$n
      for f in $d/answers*.jsonl; do  # an unchanged archive is kept: gzip's header (mtime) would churn git
        t=data/answers/s$s/$n/$(basename $f).gz
        [[ -e $t ]] && gunzip -c $t | cmp -s - $f || gzip -9 -c $f > $t
      done
      cp $d/datagen_config.json data/answers/s$s/$n/
    done ;;
  unarchive-seed)  # archive-seed's inverse for a partly archived seed: its answers back into runs/, so
    # `datagen-seed` resumes by key instead of regenerating them (files already there are kept)
    s=$(stage_seed $1)
    for d in data/answers/s$s/*/; do
      n=$(basename $d); mkdir -p $R/data_s$s/$n
      for f in $d/answers*.jsonl.gz; do
        t=$R/data_s$s/$n/$(basename ${f%.gz}); [[ -e $t ]] || gunzip -c $f > $t
      done
      cp -n $d/datagen_config.json $R/data_s$s/$n/
    done ;;
  cache-archived)  # a target cache for every archived answer set not cached yet (one forward per sequence);
    # SETS=s7 / SETS=s8 run two sets side by side, one core each (~1 h per 2 555 answers on one core);
    # DIRS names answer directories instead (e.g. the slices of a set that no fit has read)
    for d in ${DIRS:-data/answers/${SETS:-*}/*/}; do
      n=$(basename $(dirname $d)).$(basename $d)
      $PY -m dspark_common.cli train cache --answers $d --out $R/cache_archived/$n --shard-size 32 --batch-size 8 \
        --max-length 560
    done > $R/logs/cache_archived${SETS:+.$SETS}${DIRS:+.dirs}.log 2>&1 ;;
  cache-heldout)  # the held-out split alone of SETS (default: seeds 37-41), to calibrate a drafter trained
    # without a cache (train online); ~1 s a sequence, 5 % of the answers
    for d in $(for s in ${SETS:-s37 s38 s39 s40 s41}; do ls -d data/answers/$s/*/; done); do
      n=$(basename $(dirname $d)).$(basename $d)
      $PY -m dspark_common.cli train cache --answers $d --out $R/cache_heldout/$n --split heldout --shard-size 32 \
        --batch-size 8 --max-length 560
    done > $R/logs/cache_heldout.log 2>&1 ;;
  lease-prepare)  # the inputs of a GPU lease (gpu_lease.sh) under .gpu/ (ignored): the target GGUF in two parts
    # (a call carries 64 MiB at most, the tree included) and the gguf wheel the machine lacks
    grep -qx '/.gpu/' .git/info/exclude || echo '/.gpu/' >> .git/info/exclude
    g=$($PY -c "from verifier_svc.target_loading import smollm2_gguf_path; print(smollm2_gguf_path())")
    rm -rf .gpu/a .gpu/b .gpu/c && mkdir -p .gpu/a .gpu/b .gpu/c
    split -b 49000000 -d -a 1 "$g" .gpu/gguf.part && mv .gpu/gguf.part0 .gpu/a/ && mv .gpu/gguf.part[12] .gpu/b/
    (cd .gpu/c && python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux2014_x86_64 -d . gguf==0.19.0)
    echo "target md5 $(md5sum < "$g" | cut -c1-32)"; du -sh .gpu/* ;;
  lease-out)  # before the two calls that carry .gpu/a and .gpu/b: the drafter and the answers out of the tree
    # that travels (into .gpu/hold, ignored), so that tree + part stay under 64 MiB
    mkdir -p .gpu/hold && mv models/dspark-smollm2-135m/model.safetensors data/answers .gpu/hold/ ;;
  lease-in)  # after them, before the call that trains: everything back
    mv .gpu/hold/model.safetensors models/dspark-smollm2-135m/ && mv .gpu/hold/answers data/answers && git status --short ;;
  online-import)  # LEASE=<folder the device tool returned> N=<session>: the runs of gpu_lease.sh rebuilt
    # as run directories $R/gpuN/<run> (16-bit weights back to a training state) that average, calibrate and
    # export take
    : "${LEASE:?LEASE=<folder with runs.tgz and *_w<i>.safetensors>}" "${N:?N=<session number>}"
    mkdir -p $R/gpu$N && tar xzf $LEASE/runs.tgz -C $R/gpu$N --strip-components=2
    for w in $LEASE/*_w0.safetensors; do
      run=$(basename ${w%_w0.safetensors})
      [[ -f $R/gpu$N/$run/draft_vocab.safetensors ]] || cp models/dspark-smollm2-135m/draft_vocab.safetensors $R/gpu$N/$run/
      $PY -c "import sys; from drafter_svc.train.online import import_weights; print(import_weights(sys.argv[1], sys.argv[2:]))" \
        $R/gpu$N/$run $LEASE/${run}_w*.safetensors
    done ;;
  finish-online)  # RUN=<run directory> N=<session>: calibrate on the held-out caches (cache-heldout), export
    # the default drafter, loss curves docs/img/loss_curves_sN.png
    : "${RUN:?RUN=<run directory>}" "${N:?N=<session number>}"
    $PY -m dspark_common.cli train calibrate --cache $R/cache_heldout/*/ --run $RUN --plot docs/img/reliability.png
    $PY -m dspark_common.cli train export --run $RUN --out models/dspark-smollm2-135m
    $PY -c "from drafter_svc.train.fit import plot_curves; plot_curves('$RUN/log.jsonl', 'docs/img/loss_curves_s$N.png')" ;;
  continue-s7)  # ninth session: the committed drafter (snapshot init9) on the seed-7 slices begun when it
    # (re)starts (re-run it as datagen-s7 adds slices)
    continue_committed init9 "$(caches_s7)" ${LR:-2e-4} fit9 --draft-vocab $R/init9 ;;
  finish-s7)
    finish_run fit9 "$(caches_s7)" docs/img/loss_curves_s7.png ;;
  continue-s8)  # tenth session: the committed drafter (snapshot init10) on every archived cache (seed 7) and
    # the seed-8 slices begun when it (re)starts (re-run it as datagen-seed adds slices)
    continue_committed init10 "$(caches_s8)" ${LR:-2e-4} fit10 --draft-vocab $R/init10 ;;
  finish-s8)
    finish_run fit10 "$(caches_s8)" docs/img/loss_curves_s8.png ;;
  continue-archived)  # eleventh session: the committed drafter (snapshot init11) on every archived cache
    # (both seeds, rebuilt by cache-archived; nothing generated this session joins the fit)
    continue_committed init11 "$(caches_archived)" ${LR:-2e-4} fit11 --draft-vocab $R/init11 ;;
  finish-archived)
    finish_run fit11 "$(caches_archived)" docs/img/loss_curves_s9.png ;;
  continue-s10)  # twelfth session: the committed drafter (snapshot init12) on answers it has never seen:
    # seed 9 (archived part rebuilt by `SETS=s9 cache-archived`, the rest completed by `SEED=9 datagen-seed`)
    # and the seed-10 slices begun when it (re)starts (re-run it as `SEED=10 datagen-seed` adds slices)
    continue_committed init12 "$(caches_s10)" ${LR:-2e-4} fit12 --draft-vocab $R/init12 ;;
  finish-s10)
    finish_run fit12 "$(caches_s10)" docs/img/loss_curves_s10.png ;;
  continue-s11)  # thirteenth session: the committed drafter (snapshot init13) on seed 10 (805 of its answers
    # joined no fit, the rest one epoch late in the twelfth) and the seed-11 slices begun when it (re)starts
    continue_committed init13 "$(caches_s11)" ${LR:-2e-4} fit13 --draft-vocab $R/init13 ;;
  finish-s11)
    finish_run fit13 "$(caches_s11)" docs/img/loss_curves_s11.png ;;
  continue-s12)  # fourteenth session: the committed drafter (snapshot init14) on caches_s12 as they exist when
    # it (re)starts (re-run it as the cache builds and `SEED=12 datagen-seed` add directories)
    continue_committed init14 "$(caches_s12)" ${LR:-2e-4} fit14 --draft-vocab $R/init14 ;;
  finish-s12)
    finish_run fit14 "$(caches_s12)" docs/img/loss_curves_s12.png ;;
  continue-s13)  # fifteenth session: the committed drafter (snapshot init15) on caches_s13 as they exist when
    # it (re)starts (re-run it as cache-archived and `SEED=13 datagen-seed` add directories)
    continue_committed init15 "$(caches_s13)" ${LR:-2e-4} fit15 --draft-vocab $R/init15 ;;
  finish-s13)
    finish_run fit15 "$(caches_s13)" docs/img/loss_curves_s13.png ;;
  continue-s16)  # sixteenth session: the committed drafter (snapshot init16) on the same archive as
    # caches_s13 (seeds 12-14); start it once ~2 000 sequences are cached (fit15, started on 120, overfit)
    continue_session 16 "$(caches_s13)" ;;
  finish-s16)
    finish_session 16 "$(caches_s13)" ;;
  continue-s17)  # seventeenth session: the committed drafter (snapshot init17) on caches_s17 as they exist when
    # it (re)starts (re-run it as cache-archived and datagen-seed add directories)
    continue_session 17 "$(caches_s17)" ;;
  finish-s17)
    finish_session 17 "$(caches_s17)" ;;
  continue-s18)  # eighteenth session: the committed drafter (snapshot init18) on caches_s18 as they exist when
    # it (re)starts (re-run it as cache-archived and datagen-seed add directories)
    continue_session 18 "$(caches_s18)" ;;
  finish-s18)
    finish_session 18 "$(caches_s18)" ;;
  continue-session)  # a later session's continuation without a stage of its own: N=19 (snapshot initN, run fitN,
    # docs/img/loss_curves_sN.png) on CACHES (directory globs, passed to fit unexpanded: it reads the
    # directories that match now and takes each new one at its next checkpoint, no restart needed)
    : "${N:?N=<session number>}" "${CACHES:?CACHES=<cache directory globs>}"
    continue_session $N "$CACHES" ;;
  finish-session)
    : "${N:?N=<session number>}" "${CACHES:?CACHES=<cache directory globs>}"
    finish_session $N "$(caches_by_birth $CACHES)" ;;
  average-session)  # instead of finish-session: the fit averaged with the drafter it started from, then finished
    : "${N:?N=<session number>}" "${CACHES:?CACHES=<cache directory globs>}"
    average_session $N "$(caches_by_birth $CACHES)" ;;
  continue-s4)  # seventh session: the committed drafter (snapshot init7) trained on datagen-s4's caches
    continue_committed init7 "$CACHES7" ${LR:-2e-4} fit7 --draft-vocab $R/init7 ;;
  finish-s4)
    finish_run fit7 "$CACHES7" docs/img/loss_curves_s4.png ;;
  continue-vocab)  # the committed drafter (snapshot: export overwrites it), trained over its draft vocabulary
    continue_committed init4 "$CACHES6" ${LR:-3e-4} fit4 --draft-vocab $R/init4 ;;
  finish-vocab)
    finish_run fit4 "$CACHES6" docs/img/loss_curves_vocab.png ;;
  continue-sampled)
    continue_committed init3 $R/cache_s 2e-4 fit3 ;;
  finish-sampled)
    finish_run fit3 $R/cache_s docs/img/loss_curves_sampled.png ;;
  vocab)  # after export: the draft vocabulary from every regenerated answer
    $PY -m dspark_common.cli train vocab --answers $R/data $R/data_s --checkpoint models/dspark-smollm2-135m \
      --size ${VOCAB_SIZE:-8192} ;;
  continue)  # warm start from the committed drafter (snapshotted: export overwrites it), lower peak lr
    continue_committed init $R/cache 3e-4 fit2 ;;
  finish-continued)
    finish_run fit2 $R/cache docs/img/loss_curves_continued.png ;;
  cache)  # answers without a cache entry (e.g. written before --cache was used)
    $PY -m dspark_common.cli train cache --answers $R/data --out $R/cache --shard-size 32 --batch-size 8 --max-length 560 ;;
  fit)
    $PY -m dspark_common.cli train fit $FIT_ARGS --markov-rank 64 --out $R/fit ;;
  finish)  # calibrate, export the default drafter, loss curves
    finish_run fit $R/cache docs/img/loss_curves.png "{'rank 0 (ablation)': '$R/fit_rank0/log.jsonl'}" ;;
  ablation)  # same recipe and budget, sequential head off (Markov rank 0)
    $PY -m dspark_common.cli train fit $FIT_ARGS --markov-rank 0 --out $R/fit_rank0
    $PY -m dspark_common.cli train export --run $R/fit_rank0 --out $R/export_rank0 --verify-with '' ;;
  eval-dspark)  # DRAFTER= another directory, e.g. a run's snapshot once `finish-*` has overwritten models/
    eval_run dspark ${DRAFTER:-models/dspark-smollm2-135m} ;;
  eval-rank0)
    eval_run rank0 $R/export_rank0 ;;
  report)
    $PY -m drafter_svc.train.report $EVAL_DIR/*.jsonl --plot docs/img/acceptance_by_position.png
    $PY -c "from drafter_svc.train.fit import plot_curves; plot_curves('$R/fit/log.jsonl', 'docs/img/loss_curves.png', {'rank 0 (ablation)': '$R/fit_rank0/log.jsonl'})" ;;
  *)
    # the stages, read from this case statement (a hand-kept list fell behind it)
    echo "usage: $0 $(sed -nE 's/^  ([a-z0-9|-]+)\).*/\1/p' "$0" | paste -sd'|')" >&2; exit 2 ;;
esac
