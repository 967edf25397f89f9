"""Makes the Triton CPU interpreter multiply bf16 operands correctly.

The interpreter stores bf16 tensors as their raw uint16 bits, and its
`create_dot` hands those integers straight to np.matmul (seen on triton 3.9.0):
a bf16 `tl.dot` returns garbage on the CPU while loads, stores and casts are
right. We widen bf16 operands to fp32 first. Every bf16 value is exact in fp32,
so this is the product the GPU computes, bf16 inputs with fp32 accumulation.
Only the interpreter is touched, only when TRITON_INTERPRET=1.
"""
import numpy as np
import triton.language as tl


def _bf16_to_f32(handle, tensor_handle_cls):
    widened = (handle.data.astype(np.uint32) << 16).view(np.float32)
    return tensor_handle_cls(widened, tl.float32)


def patch_bf16_dot() -> None:
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_lowrank_bf16", False):
        return
    original = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype == tl.bfloat16:
            a = _bf16_to_f32(a, interpreter.TensorHandle)
        if b.dtype == tl.bfloat16:
            b = _bf16_to_f32(b, interpreter.TensorHandle)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    create_dot._lowrank_bf16 = True
    builder.create_dot = create_dot
