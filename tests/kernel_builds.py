"""Compiles every variant of pack_kernels.py's kernels for an NVIDIA Hopper GPU (sm_90) with the
ptxas that Triton's wheel carries, without a GPU: each precision's tiles, dropout or none, layer 0's
shared X or stacked activations, hidden or output layer, and strides Triton may specialise on (divisible
by 16) or not. Run by test_nn_kernels_compile.py in a process of its own (Triton's interpreter off).

    python tests/kernel_builds.py
"""

from __future__ import annotations

import itertools

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from watcher_plugins.nn_batch import pack_kernels as K

HOPPER = GPUTarget("cuda", 90, 32)
INDEX_PTRS = {"k_real_ptr": "*i32", "j_real_ptr": "*i32", "i_real_ptr": "*i32"}
DROPOUT_PTRS = {"keys_ptr": "*i64", "p_ptr": "*fp32", "scale_ptr": "*fp32", "train_ptr": "*u8", "epoch_ptr": "*i64"}


def build(fn, pointers: dict[str, str], constants: dict, options: dict, aligned_strides: bool) -> None:
    """One variant; every *_ptr is float32 unless ``pointers`` says otherwise, other arguments int32."""
    signature = {name: "constexpr" if name in constants else
                 (pointers.get(name, "*fp32") if name.endswith("_ptr") else "i32") for name in fn.arg_names}
    strides = [i for i, name in enumerate(fn.arg_names) if name not in constants and not name.endswith("_ptr")
               and name not in ("n_rows", "layer")]
    attrs = {(i,): [["tt.divisibility", 16]] for i in strides} if aligned_strides else {}
    triton.compile(ASTSource(fn, signature, constants, attrs=attrs), target=HOPPER, options=options)


def main() -> int:
    built = 0
    for (precision, t), aligned in itertools.product(K.TILES.items(), (False, True)):
        bf16 = precision == "bf16"
        act = "*bf16" if bf16 else "*fp32"
        options = {"num_warps": t.warps, "num_stages": t.stages}
        tiles = {"BF16": bf16, "DOT": t.dot}
        for dropout, from_x, output in itertools.product((False, True), repeat=3):
            a = "*fp32" if from_x else act
            build(K._hidden_forward, {**INDEX_PTRS, **DROPOUT_PTRS, "a_ptr": a, "out_ptr": act},
                  {"MAX_LAYERS": 16, "HAS_DROPOUT": dropout, **tiles, "BLOCK_R": t.rows, "BLOCK_J": t.units,
                   "BLOCK_K": t.inner}, options, aligned)
            build(K._input_grad, {**INDEX_PTRS, **DROPOUT_PTRS, "g_ptr": act, "a_ptr": act, "out_ptr": act},
                  {"MAX_LAYERS": 16, "HAS_DROPOUT": dropout, **tiles, "BLOCK_R": t.rows, "BLOCK_C": t.units,
                   "BLOCK_J": K.OUTPUT_UNITS if output else t.inner}, options, aligned)
            build(K._weight_grad_chunks, {**INDEX_PTRS, "a_ptr": a, "g_ptr": act},
                  {**tiles, "BLOCK_I": t.units, "BLOCK_J": K.OUTPUT_UNITS if output else t.units,
                   "BLOCK_R": K.GRAD_ROWS}, options, aligned)
            build(K._output_forward, {**INDEX_PTRS, "a_ptr": a, "grad_ptr": act, "train_ptr": "*u8"},
                  {**tiles, "BLOCK_R": t.rows, "BLOCK_K": t.inner, "BLOCK_O": K.OUTPUT_UNITS},
                  {"num_warps": t.warps}, aligned)
            built += 4
    adam = {**INDEX_PTRS, "lr_ptr": "*fp64", "step_ptr": "*i64", "bc1_ptr": "*fp64"}
    for block_i, block_j in ((1, 256), (32, 64)):
        fn = K._adam
        signature = {name: "fp32" if name in ("beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps") else
                     "constexpr" if name in ("BLOCK_I", "BLOCK_J") else
                     (adam.get(name, "*fp32") if name.endswith("_ptr") else "i32") for name in fn.arg_names}
        triton.compile(ASTSource(fn, signature, {"BLOCK_I": block_i, "BLOCK_J": block_j}), target=HOPPER,
                       options={"num_warps": 4})
        built += 1
    build(K._held_out_loss, {"train_ptr": "*u8"}, {"BLOCK": K.ROW_BLOCK}, {"num_warps": 4}, False)
    print(f"{built + 1} kernel variants compiled for sm_90")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
