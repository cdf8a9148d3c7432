#!/usr/bin/env bash
# Profile spanfill's attention kernel with Nsight Compute on core bench workloads.
#
#   bash scripts/ncu_profile.sh OUTDIR many_small scatter15 bert_base_512
#
# Per workload: OUTDIR/ncu_<name>.log holds the details page (occupancy, throughput,
# registers, warp states) followed by scripts/ncu_stalls.py's summary of the SASS
# source page (stall reasons, the instructions with the most samples). One launch
# (the third: the first compiles, see scripts/profile_kernel.py), --set full.
# PROFILE_ARGS=--gluon: the Gluon family where the automatic choice takes the portable
# kernel (files then named ncu_<name>_gluon); --portable: the portable padded kernel
# where it takes the Gluon one (ncu_<name>_portable). PROFILE_ARGS=--fa4: FlashAttention-4's
# forward kernel on the same workload, as the bench calls it (ncu_<name>_fa4; its
# kernel's name has "fwd" or "Forward", not "_attn_fwd"). PROFILE_ARGS="--form FORM":
# one form of scripts/ab_gluon.py's (ncu_<name>_FORM), e.g. the three-group D=64 form
# with and without its padding partition. KEEP_SASS=1 keeps ncu_<name>.sass.csv.
set -euo pipefail
out=$1; shift
mkdir -p "$out"
ncu=${NCU:-$(command -v ncu || echo /usr/local/cuda/bin/ncu)}
suffix=${PROFILE_ARGS:+_${PROFILE_ARGS#--}}
suffix=${suffix/#_form /_}
kernels=regex:_attn_fwd
[ "${PROFILE_ARGS:-}" = --fa4 ] && kernels='regex:[Ff]wd|Forward'
for name in "$@"; do
    rep="$out/ncu_$name$suffix"
    "$ncu" --kernel-name "$kernels" --launch-skip 2 --launch-count 1 --set full \
        --import-source no -f -o "$rep" python3 scripts/profile_kernel.py "$name" ${PROFILE_ARGS:-} > "$rep.run.log" 2>&1
    {
        echo "# ncu --set full, one launch of the attention kernel ($kernels: the portable _attn_fwd_kernel or the Gluon _attn_fwd_dense_kernel, as the automatic choice runs it, backend=gluon with PROFILE_ARGS=--gluon, the portable padded kernel with --portable, FA4 with --fa4, an ab_gluon form with --form) on $name ${PROFILE_ARGS:-} (scripts/ncu_profile.sh)"
        nvidia-smi --query-gpu=name --format=csv,noheader
        python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
        "$ncu" -i "$rep.ncu-rep" --page details
        echo
        "$ncu" -i "$rep.ncu-rep" --page source --csv --print-source sass > "$rep.sass.csv"
        python3 scripts/ncu_stalls.py "$rep.sass.csv"
    } > "$rep.log" 2>&1
    # KEEP_SASS=1 keeps the whole source page (every instruction's samples, a few MB).
    [ -n "${KEEP_SASS:-}" ] || rm -f "$rep.sass.csv"
    echo "$name: $rep.log"
done
