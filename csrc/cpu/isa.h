// Run-time choice of the CPU instruction set for the vectorised kernels.
#pragma once

#include <string>

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
#define SHIFTADD_X86 1
#else
#define SHIFTADD_X86 0
#endif

namespace shiftadd {
namespace cpu {

enum class Isa { Generic = 0, Avx2 = 1, Avx512 = 2 };

// The widest instruction set this CPU supports (and this build contains).
Isa detect_isa();
// The one the kernels use now: detect_isa() unless set_isa() chose a narrower one.
Isa current_isa();
// Returns false (and changes nothing) when `isa` is not supported here.
bool set_isa(Isa isa);

const char* isa_name(Isa isa);
bool parse_isa(const std::string& name, Isa* out);

}  // namespace cpu
}  // namespace shiftadd
