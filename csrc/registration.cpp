// The Python module shiftadd._C.  Operator schemas are defined in Python
// (shiftadd/_ops.py) and must exist before this library is imported; the kernels
// register themselves with TORCH_LIBRARY_IMPL in csrc/cpu/*.cpp and csrc/cuda/*.cpp.
// This module only exposes build facts and the CPU instruction-set switch.

#include <torch/extension.h>

#include "cpu/isa.h"

namespace {

std::vector<std::string> cpu_isas() {
  using shiftadd::cpu::Isa;
  std::vector<std::string> out;
  const int best = static_cast<int>(shiftadd::cpu::detect_isa());
  for (int i = 0; i <= best; i++) out.push_back(shiftadd::cpu::isa_name(static_cast<Isa>(i)));
  return out;
}

void set_cpu_isa(const std::string& name) {
  shiftadd::cpu::Isa isa;
  TORCH_CHECK(shiftadd::cpu::parse_isa(name, &isa), "set_cpu_isa: unknown instruction set '", name,
              "' (choose from generic, avx2, avx512)");
  TORCH_CHECK(shiftadd::cpu::set_isa(isa), "set_cpu_isa: '", name, "' is not supported on this CPU; supported: ",
              c10::Join(", ", cpu_isas()));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "shiftadd compiled kernels (CPU" 
#ifdef SHIFTADD_WITH_CUDA
            " + CUDA"
#endif
            ")";
#ifdef SHIFTADD_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("cpu_isa", []() { return std::string(shiftadd::cpu::isa_name(shiftadd::cpu::current_isa())); },
        "instruction set the CPU kernels use now");
  m.def("cpu_isas", &cpu_isas, "instruction sets this CPU and build support, narrowest first");
  m.def("set_cpu_isa", &set_cpu_isa, "force the CPU kernels onto a narrower instruction set (for tests)");
}
