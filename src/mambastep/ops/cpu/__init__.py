"""mambastep's C++ kernels for the CPU: the implementations of the ``mambastep::`` operators
(``ops.library``) for CPU tensors, compiled and loaded by ``build``.

    selective_scan.cpp  the Mamba-1 scan, forward and backward
    ssd_scan.cpp        the Mamba-2 scan
    causal_conv.cpp     a prompt's causal conv and SiLU in one pass
    matvec.cpp          products with a few activation rows, float32 / bfloat16 / int8 weights
    amx_matmul.cpp      those products on AMX tiles, for bfloat16 and int8 weights (from 2 rows)
    mamba_step.cpp      RMSNorm, and the decode step of a whole stack of layers
    vector_math.h       exp, SiLU, softplus and bfloat16 conversions inlined for the vector loops
"""
