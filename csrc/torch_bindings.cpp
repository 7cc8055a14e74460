// The Python module glm45_ops._C. It defines nothing itself: importing it loads this shared
// library, whose static TORCH_LIBRARY_IMPL(glm45, CUDA, m) registrars then attach each family's
// CUDA kernels (registered in that family's own .cu, e.g. csrc/quant/fp8_quant.cu) to the op
// schemas Python defined (glm45_ops/<family>.py). No pybind11: a plain CPython module suffices.
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {
      PyModuleDef_HEAD_INIT,
      "_C",                                                   // m_name
      "glm45_ops CUDA kernels (registered with torch.ops.glm45 on import)",  // m_doc
      -1,                                                     // m_size
      nullptr,                                                // m_methods
  };
  return PyModule_Create(&module);
}
