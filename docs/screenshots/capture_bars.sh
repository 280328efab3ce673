#!/usr/bin/env bash
# Runs compare_models (step 5) in a detached tmux pane of a fixed size and captures the pane every
# EVERY seconds until the command ends: CAPTURE_DIR/cap-SSS.ansi (`tmux capture-pane -p -e`, escape
# codes kept) and CAPTURE_DIR/cap-SSS.txt (plain), SSS = seconds since the start.
#
# Usage: capture_bars.sh OUTPUT_DIR CAPTURE_DIR TRIALS ROWS NN_MAX_EPOCHS TREE_ROUNDS
# Environment: COLS (160), LINES_ (30), EVERY (3), VENV (/work/venv), PKG (a directory put first on
# PYTHONPATH, e.g. a `git archive` of one commit; empty: the installed package), SESSION (bars).
# The pane's shell starts in /tmp, so `python -m` workers import the same package as the agent.
set -u
OUT=$1 CAP=$2 TRIALS=$3 ROWS=$4 EPOCHS=$5 ROUNDS=$6
COLS=${COLS:-160} LINES_=${LINES_:-30} EVERY=${EVERY:-3} VENV=${VENV:-/work/venv} PKG=${PKG:-}
SESSION=${SESSION:-bars}
mkdir -p "$CAP"
rm -rf "$OUT" "/tmp/wc-$SESSION" "/tmp/wl-$SESSION"
tmux kill-session -t "$SESSION" 2>/dev/null
tmux new-session -d -s "$SESSION" -x "$COLS" -y "$LINES_" -c /tmp
P="{\"model_types\":[\"nn\",\"catboost\",\"lightgbm\",\"xgboost\"],\"trials\":$TRIALS,\"data\":{\"embedded\":\"survivors\",\"rows\":$ROWS},\"output_dir\":\"$OUT\",\"nn_max_epochs\":$EPOCHS,\"tree_rounds\":$ROUNDS}"
tmux send-keys -t "$SESSION" ". $VENV/bin/activate && export PYTHONPATH=$PKG && clear && WATCHER_CACHE_DIR=/tmp/wc-$SESSION WATCHER_LEASE_DIR=/tmp/wl-$SESSION watcher-agent --run-pipeline --start-step 5 --end-step 5 --params '$P'; echo DONE-\$?" Enter
start=$(date +%s)
while :; do
  sleep "$EVERY"
  t=$(( $(date +%s) - start )); n=$(printf %03d "$t")
  tmux capture-pane -p -e -t "$SESSION" > "$CAP/cap-$n.ansi"
  tmux capture-pane -p -t "$SESSION" > "$CAP/cap-$n.txt"
  grep -q "^DONE-" "$CAP/cap-$n.txt" && break
  [ "$t" -gt 1800 ] && break
done
tmux kill-session -t "$SESSION"
echo "took $t s"
