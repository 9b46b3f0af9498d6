// The Python module entry point PyInit_<TORCH_EXTENSION_NAME> of the two extensions, so that
// `import vqkernels._C` / `import vqkernels._C_cpu` (the setup.py builds) runs the op
// registrations of the library; the JIT builds are loaded with torch.ops.load_library and
// never call it. TORCH_EXTENSION_NAME (set by torch's build helpers, else defaulted by the
// including file) is read where VQK_PYMODULE is used. Included by cpu/assign_cpu.cpp and
// vq_ops.cpp; it lives in cpu/ so the CPU JIT build's source hash (vqkernels/_cpu_extension.py,
// csrc/cpu/*.cpp and *.h) covers it.
#pragma once

#include <Python.h>

#define VQK_STRINGIFY_(x) #x
#define VQK_STRINGIFY(x) VQK_STRINGIFY_(x)
#define VQK_CONCAT_(a, b) a##b
#define VQK_CONCAT(a, b) VQK_CONCAT_(a, b)

// Defines PyInit_<TORCH_EXTENSION_NAME>, a module with docstring DOC and no methods.
#define VQK_PYMODULE(DOC)                                                           \
  PyMODINIT_FUNC VQK_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {                  \
    static struct PyModuleDef module_def = {                                        \
        PyModuleDef_HEAD_INIT, VQK_STRINGIFY(TORCH_EXTENSION_NAME), DOC,            \
        -1, nullptr, nullptr, nullptr, nullptr, nullptr, /* m_size .. m_free */     \
    };                                                                              \
    return PyModule_Create(&module_def);                                            \
  }
