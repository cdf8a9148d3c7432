"""Every kernel compiles for Hopper (sm_90) on a machine without a GPU.

The Triton interpreter runs the kernels' Python; it does not type-check them the
way the compiler does (loop-carried values, constexpr branches, descriptor
loads). Compiling for sm_90 here catches those errors before a GPU run, and
``scripts/compare_kernel_ir.py`` uses the same path to show a refactor leaves
the GPU code unchanged (tested here against HEAD).

The compile runs in a subprocess without ``TRITON_INTERPRET`` and with an empty
Triton cache: in this process Triton was imported in interpreter mode, where
compiling works only for kernels already in the cache (a fresh CI machine has none).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
ROOT = SCRIPTS.parent

# Cases of scripts/compile_sm90.py: every kernel family (split and unsplit, paged and
# dense, padded zero-fill, merge, append, plan) at the integer values Triton
# specialises (1: a compile-time constant; multiples of 16).
SPECIALISED_CASES = [
    "span_split_t1_mqa_d128", "span_split_t1_gqa_d64_page1", "span_split_t16_d256_page256",
    "span_split_t1_window1_shard_softcap", "span_unsplit_t1_d128",
    "span_unsplit_t32_page16_nolse", "padded_zero_fill_b1_d64", "padded_zero_fill_tma_d128",
    "varlen_dense_causal_split_d128", "append_t1_page1_hk1", "append_t16_page16",
    "merge_one_state_one_head", "merge_16_rows", "plan_one_request", "plan_padded_16",
    "span_fp8_e4m3_head_scales_split_t1", "span_fp8_e5m2_float_scales_t32",
    "padded_fp8_e5m2_head_scales_d64", "append_fp8_e4m3_head_scales_t1",
    "append_fp8_e5m2_float_scales", "span_fused_append_t1_split",
    "span_fused_append_t32_window_shard_softcap", "span_fused_append_fp8_e4m3_head_scales",
    "gluon_dense_padded_d128", "gluon_dense_causal_gqa_d64", "gluon_dense_warp_specialized_d128",
    "gluon_dense_two_warpgroups_d128", "gluon_dense_two_warpgroups_producer_d64",
    "gluon_dense_d256", "gluon_dense_overlap_d128", "gluon_dense_overlap_producer_m128_d64",
    "gluon_dense_overlap_d256", "gluon_paged_page16_d128",
    "gluon_paged_page256_overlap_producer_d64", "gluon_paged_page64_m128_overlap_d128",
    "gluon_paged_stack4_m128_overlap_producer_d128", "gluon_dense_stack2_padded_d64",
    "gluon_dense_split3_varlen_d128", "gluon_paged_split2_page256_overlap_producer_d128",
    "gluon_paged_page1_gather_d128", "gluon_paged_page4_gather_overlap_producer_stack4_d64",
    "gluon_paged_registry_d256_page16_split4", "gluon_dense_registry_m128_producer_d128",
    "gluon_paged_registry_stack4_d128",
    "gluon_dense_pingpong_padded_d128", "gluon_paged_pingpong_stack4_split2_d128",
    "gluon_paged_pingpong_page4_gather_d64", "gluon_paged_split_consumers_stack4_d128",
    "gluon_paged_split_consumers_d256_page16_split4", "gluon_dense_split_consumers_padded_d64",
    "gluon_dense_pingpong_stagger_padded_d128",
    "gluon_paged_split_consumers_stagger_stack4_split2_d128",
    "gluon_paged_pingpong_turns_stack4_d128",
    "gluon_dense_pingpong_stagger_splitq_padded_d128",
    "gluon_paged_pingpong_splitq_early_stack4_d128",
    "gluon_paged_split_consumers_splitq_stack2_d256",
    "gluon_dense_pingpong_early_padded_d64",
    "gluon_dense_three_groups_padded_d64",
    "gluon_dense_pingpong_stagger_pin_padded_d128",
    "gluon_paged_pingpong_pin_splitq_stack4_d128",
    "gluon_dense_three_groups_stagger_splitq_causal_d64",
    "gluon_dense_pingpong_stagger_tmastore_padded_d128",
    "gluon_paged_pingpong_stagger_tmastore_stack2_d128",
    "gluon_paged_pingpong_stagger_tmastore_stack4_d128",
    "gluon_dense_pingpong_stagger_early_q_padded_d128",
    "gluon_dense_pingpong_stagger_tmastore_early_q_padded_d128",
    "gluon_paged_pingpong_stagger_tmastore_early_q_stack4_d128",
    "gluon_dense_pingpong_stagger_tmastore_early_q_pin_padded_d128",
    "gluon_paged_pingpong_stagger_tmastore_pin_stack4_d128",
    "gluon_paged_pingpong_stagger_tmastore_pinmax_stack4_d128",
    "gluon_dense_three_groups_named_turns_early_q_pinmax_padded_d64",
    "gluon_paged_pingpong_stagger_tmastore_pinmax_reload_stack4_d128",
    "gluon_dense_pingpong_stagger_k_staged_pinmax_reload_padded_d128",
    "gluon_dense_three_groups_named_turns_early_q_pinmax_reload_padded_d64",
    "gluon_dense_three_groups_early_q_padded_d64",
    "gluon_dense_pingpong_stagger_named_turns_padded_d128",
    "gluon_dense_three_groups_stagger_named_turns_padded_d64",
    "gluon_dense_pingpong_k_staged_pinmax_fill2_padded_d128",
    "gluon_dense_three_groups_named_turns_early_q_fill2_padded_d64",
    "gluon_dense_split_consumers_fill1_stack2_causal_d256",
]


_CACHE: dict[str, str] = {}


def _compile_env(tmp_path_factory) -> dict[str, str]:
    """The compile subprocesses' environment: no interpreter, and one Triton cache for
    this module's tests, empty at its first compile. Later tests that compile the same
    kernels (the comparison against HEAD, on identical source) read them from it: the
    first compile of every case is what tests the kernels; the others test the tools, and
    compiling each case three times took about 300 of CI's seconds."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if "dir" not in _CACHE:
        _CACHE["dir"] = str(tmp_path_factory.mktemp("triton_cache"))
    env["TRITON_CACHE_DIR"] = _CACHE["dir"]
    return env


# On a GPU machine the kernels compile at every real launch the suite makes; these
# tests are for CI, which has no GPU (and the GPU machine's Triton is another version).
pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="CPU-only: on a GPU the suite's launches compile the kernels")


@pytest.fixture(scope="module")
def specialised(tmp_path_factory) -> dict[str, dict]:
    """Every case compiled, in one process per CPU (up to 4), each taking every N-th case:
    compiling is most of this module's CI time, and it parallelises."""
    pytest.importorskip("triton.backends.nvidia")
    shards = max(1, min(4, os.cpu_count() or 1))
    env = _compile_env(tmp_path_factory)
    procs = [subprocess.Popen([sys.executable, str(SCRIPTS / "compile_sm90.py"), "--json",
                               "--shard", f"{i}/{shards}"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(shards)]
    results = {}
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        assert out.strip(), err[-3000:]
        results.update({r["case"]: r for r in json.loads(out.strip().splitlines()[-1])})
    return results


def test_every_case_is_listed(specialised):
    assert sorted(specialised) == sorted(SPECIALISED_CASES)


@pytest.mark.parametrize("case", SPECIALISED_CASES)
def test_kernel_compiles_at_specialised_ints(specialised, case):
    """The launch compiles, and the integers the case names really became constants
    (a case that stopped hitting the value 1 would otherwise pass without testing it)."""
    got = specialised[case]
    assert "error" not in got, got.get("error", "") + got.get("trace", "")
    assert got["missing_constexpr"] == [], f"not specialised: {got['missing_constexpr']}"
    assert got["ok"]
    if case.startswith(("span", "padded", "varlen")):
        assert got["wgmma"]
        assert got["tma"] == ("tma" in case)
    if case.startswith("gluon"):  # the Hopper family: TMA copies and wgmma, by construction
        assert got["wgmma"] and got["tma"]


def _from_compile_sm90(name: str):
    """A function of scripts/compile_sm90.py (canonical_ttgir, canonical_ptx)."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        import compile_sm90
    finally:
        sys.path.remove(str(SCRIPTS))
    return getattr(compile_sm90, name)


IR = """#loc = loc("a.py":1:0)
  tt.func public @k(%Q: !tt.ptr<bf16> loc("Q"(#loc)), %n: i32 loc("n"(#loc))) {
    %c1 = arith.constant 1 : i32 loc(#loc1)
    %c0 = arith.constant 0.5 : f32 loc(#loc1)
    %x = arith.addi %n, %c1 : i32 loc(#loc2)
    %y = arith.muli %x, %x : i32 loc(#loc3)
"""


def test_canonical_ttgir_ignores_names_locations_and_constant_order() -> None:
    canonical = _from_compile_sm90("canonical_ttgir")
    renamed = (IR.replace("%Q", "%plan.0").replace("%x", "%row").replace("%n", "%num_rows")
               .replace("#loc2", "#loc9"))
    lines = renamed.splitlines()
    lines[2], lines[3] = lines[3], lines[2]  # constants materialised in another order
    assert canonical("\n".join(lines)) == canonical(IR)
    assert "loc" not in canonical(IR)
    assert canonical(canonical(IR)) == canonical(IR)  # idempotent


def test_canonical_ttgir_sees_a_changed_program() -> None:
    canonical = _from_compile_sm90("canonical_ttgir")
    assert canonical(IR.replace("constant 1 : i32", "constant 2 : i32")) != canonical(IR)
    assert canonical(IR.replace("arith.muli %x, %x", "arith.muli %x, %n")) != canonical(IR)
    assert canonical(IR.replace("arith.addi", "arith.subi")) != canonical(IR)


CALLS = """  tt.func public @k(%n: i32) {
    %a = tt.call @"pkg.f__(3,)cconstexpr_64_"(%n) : (i32) -> i32
    %b = tt.call @"pkg.g__(3,)cconstexpr_64_"(%a) : (i32) -> i32
  }
  tt.func private @"pkg.f__(3,)cconstexpr_64_"(%x: i32) -> i32 {
  tt.func private @"pkg.g__(3,)cconstexpr_64_"(%x: i32) -> i32 {
"""


def test_canonical_ttgir_ignores_function_symbols_but_not_calls() -> None:
    """A new constexpr parameter renames each jit function's symbol; which function each
    call reaches still counts."""
    canonical = _from_compile_sm90("canonical_ttgir")
    respelled = CALLS.replace("cconstexpr_64_", "cconstexpr_64__(4,)cconstexpr_0_")
    assert canonical(respelled) == canonical(CALLS)
    assert canonical(canonical(CALLS)) == canonical(CALLS)
    swapped = CALLS.replace('@"pkg.f__(3,)cconstexpr_64_"(%n)', '@"pkg.g__(3,)cconstexpr_64_"(%n)')
    assert canonical(swapped) != canonical(CALLS)


PTX = """//
// Generated by LLVM NVPTX Back-End
.visible .entry k(
.param .u64 k_param_0
)
{
.loc 1 10 0
$L__tmp0:
ld.param.u64 %rd1, [k_param_0];   // a comment
$L__BB0_2:
st.global.u32 [%rd1], %r1;
ret;
}
.section .debug_info
.b8 47 // /path/to/source.py
"""


def test_canonical_ptx_ignores_debug_information_not_instructions() -> None:
    """Debug sections, line markers and their labels go; instructions and branch labels
    stay."""
    canonical_ptx = _from_compile_sm90("canonical_ptx")
    moved = (PTX.replace(".loc 1 10 0\n$L__tmp0:\n", "")
             .replace("st.global", "$L__tmp7:\n.loc 1 99 3\nst.global")
             .replace(".b8 47 // /path/to/source.py", ".b8 48 // /other/path.py"))
    assert canonical_ptx(moved) == canonical_ptx(PTX)
    assert "debug" not in canonical_ptx(PTX) and "$L__BB0_2:" in canonical_ptx(PTX)
    assert canonical_ptx(PTX.replace("%r1;", "%r2;")) != canonical_ptx(PTX)


def test_compare_kernel_ir_against_head(tmp_path_factory) -> None:
    """The comparison tool itself: the working tree against HEAD (the same kernels on a
    clean checkout, as in CI), every launch compiled on both sides."""
    pytest.importorskip("triton.backends.nvidia")
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True).returncode:
        pytest.skip("not a git checkout")
    if subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "spanfill/kernels", "scripts"],
                      cwd=ROOT).returncode:
        pytest.skip("kernels or scripts changed since HEAD: run the script by hand")
    done = subprocess.run([sys.executable, str(SCRIPTS / "compare_kernel_ir.py"), "HEAD"],
                          env=_compile_env(tmp_path_factory), capture_output=True, text=True,
                          timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " 0 differ" in done.stdout
    for case in SPECIALISED_CASES:  # every case's launches were compiled on both sides
        assert f"\n{case}.0." in "\n" + done.stdout, case


def test_ptxas_usage_of_a_gluon_form() -> None:
    """scripts/ptxas_usage.py reads registers and spills off Triton's own ptxas."""
    pytest.importorskip("triton.backends.nvidia")
    done = subprocess.run(
        [sys.executable, "-c",
         "import json, sys; sys.path.insert(0, 'scripts'); import ptxas_usage as p; "
         "from compile_sm90 import compile_attention, gluon_paged_case\n"
         "entry = compile_attention(gluon_paged_case(40, 16, 8, 8, 2, 64))\n"
         "print(json.dumps(p.ptxas_usage(entry['ptx'])))"],
        cwd=SCRIPTS.parent, capture_output=True, text=True, timeout=300,
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert done.returncode == 0, done.stderr[-3000:]
    usage = json.loads(done.stdout.strip().splitlines()[-1])
    assert 0 < usage["registers"] <= 255 and usage["spill_stores"] >= 0
    assert set(usage) == {"registers", "spill_stores", "spill_loads"}


@pytest.mark.parametrize("case", ["gluon_dense_pingpong_stagger_pin_padded_d128",
                                  "gluon_dense_three_groups_stagger_splitq_causal_d64"])
def test_pinned_softmax_runs_before_the_pv_wait(tmp_path_factory, case):
    """With ``pin_softmax`` every exponential of the overlapped KV loop comes before the
    loop's wait for PV in the SASS (``scripts/sass_overlap.py``): the softmax runs under
    the PV wgmma. Without it ptxas puts them all after that wait."""
    for loop in _pv_loops(case, tmp_path_factory):
        assert loop["exp2"] > 0 and loop["exp2_before_pv_wait"] == loop["exp2"], loop


def _pv_loops(case: str, tmp_path_factory) -> list[dict]:
    """``scripts/sass_overlap.py``'s account of each KV loop of ``case`` (at least one)."""
    pytest.importorskip("triton.backends.nvidia")
    done = subprocess.run([sys.executable, str(SCRIPTS / "sass_overlap.py"), "--json", case],
                          env=_compile_env(tmp_path_factory), capture_output=True, text=True,
                          timeout=900)
    assert done.stdout.strip(), done.stderr[-3000:]
    loops = json.loads(done.stdout.strip().splitlines()[-1])[0]["loops"]
    assert loops, "no KV loop with a PV wgmma found"
    return loops


@pytest.mark.parametrize("case", ["gluon_paged_pingpong_stagger_tmastore_pinmax_stack4_d128",
                                  "gluon_dense_three_groups_named_turns_early_q_pinmax_padded_d64"])
def test_pinned_row_max_runs_before_the_pv_wait(tmp_path_factory, case):
    """With ``pin_softmax="max"`` every compare of the row max (``FMNMX``) comes before
    the overlapped loop's wait for PV in the SASS: the max runs under the PV wgmma.
    Without it ptxas puts the whole softmax, max included, after that wait."""
    for loop in _pv_loops(case, tmp_path_factory):
        assert loop["fmnmx"] > 0 and loop["fmnmx_before_pv_wait"] == loop["fmnmx"], loop


@pytest.mark.parametrize("case", [
    "gluon_paged_pingpong_stagger_tmastore_pinmax_reload_stack4_d128",
    "gluon_dense_three_groups_named_turns_early_q_pinmax_reload_padded_d64"])
def test_reloaded_row_max_leaves_the_release_first(tmp_path_factory, case):
    """With ``pin_softmax="max_reload"`` the row max still comes before the PV wait, and no
    exponential sits between that wait and the release of PV's ring stage (with
    ``"max"`` ptxas puts 9-12 there, delaying the producer's next copy into the stage)."""
    for loop in _pv_loops(case, tmp_path_factory):
        assert loop["fmnmx"] > 0 and loop["fmnmx_before_pv_wait"] == loop["fmnmx"], loop
        assert loop["exp2"] > 0 and loop["exp2_between_pv_wait_and_release"] == 0, loop
