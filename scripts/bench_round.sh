#!/usr/bin/env bash
# One benchmark round on the device machine: spanfill at an earlier revision, then the
# working tree with its peers (FlashAttention-4, FlashInfer, Flex), on the same GPU in
# the same call, so a change can be judged against the drift of the machine.
#
#   scripts/bench_round.sh OUT COMMIT [BEFORE_DIR BEFORE_COMMIT] [PEERS_DIR]
#
# BEFORE_DIR: a checkout of the earlier revision (a git worktree carried to the device);
# its own bench/ runs, spanfill providers only. PEERS_DIR: the reassembled pieces of
# ../shared/tools/peers.sh (installed into /tmp/site). Writes OUT/before/*, OUT/after/*
# and OUT/round.log; every step has its own time limit so one slow step cannot eat the
# call, and the CSVs are written row by row.
set -u
out=${1:?usage: scripts/bench_round.sh OUT COMMIT [BEFORE_DIR BEFORE_COMMIT] [PEERS_DIR]}
commit=${2:?COMMIT}
before=${3:-}
before_commit=${4:-}
peers=${5:-}
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
log="$out/round.log"
exec > >(tee -a "$log") 2>&1
echo "# bench round at $commit, $(date -u +%Y-%m-%dT%H:%MZ)"
if [ -n "$before" ]; then
    echo "## spanfill at $before_commit (before)"
    (cd "$before" && SPANFILL_COMMIT="$before_commit" PYTHONPATH=. timeout "${BEFORE_S:-150}" \
        python3 -m bench.run --only spanfill --out "$out/before" 2>&1 | grep -v "it/s\]$" | tail -40)
fi
if [ -n "$peers" ]; then
    echo "## peers"
    timeout 120 bash "$peers/peers.sh" install "$peers" /tmp/site 2>&1 | tail -3
    export PYTHONPATH="/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:${PYTHONPATH:-}"
fi
echo "## working tree at $commit (after), with peers"
# Without a "before" step the call's time is the after step's: FlashInfer's JIT builds on
# a fresh machine take ~75 s per new shape, and 420 s ended at the padded workloads.
after_default=380
[ -z "$before" ] && after_default=540
cd "$repo" && SPANFILL_COMMIT="$commit" PYTHONPATH=".:${PYTHONPATH:-}" timeout "${AFTER_S:-$after_default}" \
    python3 -m bench.run --flashinfer --out "$out/after" ${BENCH_ARGS:-} 2>&1 | grep -v "it/s\]$" | tail -80
echo "## done $(date -u +%H:%M:%S)"
