"""CPU ``residual_assign``: the stages one after another with the C++ CPU ``assign``
(csrc/cpu/assign_cpu.cpp) on the fp32 residual."""
from ..assign import cpu as _assign_cpu
from .reference import staged


def residual_assign(x, codebooks, metric):
    return staged(x, codebooks, metric, _assign_cpu.assign)
