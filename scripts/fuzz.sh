#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS each (default 20), starting from the
# committed seed corpus (fuzz/corpus/<target>/, never modified: new inputs go to
# fuzz/work/<target>/), and fails if any target crashes, panics, leaks memory under
# AddressSanitizer or times out. Crash inputs are kept in fuzz/artifacts/<target>/.
#
#   scripts/fuzz.sh [SECONDS]          every target
#   FUZZ_TARGETS="acl_xml descriptor" scripts/fuzz.sh 600     some targets, longer
#   FUZZ_JOBS=2 scripts/fuzz.sh 3600   2 libFuzzer workers per target
#
# Needs cargo-fuzz (installed here if missing) and a C++ compiler (build-essential).
# cargo-fuzz passes nightly-only flags (-Zsanitizer=address); RUSTC_BOOTSTRAP=1 lets the
# stable compiler accept them (docs/SECURITY-TESTING.md).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-20}"
jobs="${FUZZ_JOBS:-1}"
export PATH="$HOME/.cargo/bin:$PATH"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

# -O: optimised; -a: with debug assertions and overflow checks, so an arithmetic overflow
# on hostile input is a finding too.
build_flags=(--fuzz-dir fuzz -O -a)
targets="${FUZZ_TARGETS:-$(cargo fuzz list --fuzz-dir fuzz)}"
echo "fuzz: building $(echo "$targets" | wc -w) targets (AddressSanitizer, debug assertions)"
build_start=$(date +%s)
cargo fuzz build "${build_flags[@]}"
echo "fuzz: built in $(( $(date +%s) - build_start )) s"

mkdir -p fuzz/work fuzz/artifacts
failed=()
for target in $targets; do
  corpus="fuzz/corpus/$target"
  work="fuzz/work/$target"
  log="fuzz/work/$target.log"
  if [ ! -d "$corpus" ]; then
    echo "fuzz: $target has no committed corpus ($corpus)" >&2
    failed+=("$target")
    continue
  fi
  mkdir -p "$work" "fuzz/artifacts/$target"
  # -timeout: one input taking longer than 10 s is a hang finding.
  # -rss_limit_mb: the JSON and header targets stay far below; more is a memory finding.
  parallel=()
  if [ "$jobs" -gt 1 ]; then
    parallel=(-jobs="$jobs" -workers="$jobs")
  fi
  if cargo fuzz run "${build_flags[@]}" "$target" "$work" "$corpus" -- \
      -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
      "${parallel[@]}" >"$log" 2>&1; then
    runs=$( (grep -h 'stat::number_of_executed_units' "$log" fuzz-*.log 2>/dev/null || true) | awk '{s+=$2} END {print s+0}')
    echo "fuzz: $target ok ($runs runs in ${seconds} s, corpus $(ls "$corpus" | wc -l) seeds + $(ls "$work" | wc -l) found)"
  else
    echo "fuzz: $target FAILED; its log:" >&2
    grep -E 'ERROR|panicked|SUMMARY|Test unit written|artifact_prefix' "$log" | head -20 >&2 || tail -30 "$log" >&2
    failed+=("$target")
  fi
  rm -f fuzz-*.log
done

if [ "${#failed[@]}" -gt 0 ]; then
  echo "fuzz: FAILED: ${failed[*]} (inputs in fuzz/artifacts/<target>/; reproduce with" >&2
  echo "      RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz -O -a <target> <input>)" >&2
  exit 1
fi
echo "fuzz: all targets ran ${seconds} s each without a crash"
