# Shared by scripts/gpu-check.sh and scripts/gpu-step.sh (sourced after LOG is set): the log,
# the GPU's name and clocks, and `step`, which runs one section under its own timeout.

say() { echo "$@" | tee -a "$LOG"; }

say "== $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname)"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu --format=csv 2>&1 | tee -a "$LOG"

# step SECONDS PATTERN CMD...: runs CMD under a timeout (killed 5 s later if it ignores it), its
# output into the log and into $TMP, and prints the lines of it that match PATTERN. Sets RC to
# CMD's exit status (124, or 137 if killed: timed out).
TMP=$(mktemp)
step() {
  local secs=$1 pattern=$2
  shift 2
  timeout -k 5 "$secs" "$@" >"$TMP" 2>&1
  RC=$?
  cat "$TMP" >>"$LOG"
  grep -E "$pattern" "$TMP" | tail -40
  { [ "$RC" = 124 ] || [ "$RC" = 137 ]; } && say "TIMED OUT after $secs s: $*"
  return 0
}
