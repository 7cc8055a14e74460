// Host-side argument checks and dtype dispatch shared by the CUDA families.
//
// A direct torch.ops.glm45.<op> call on CUDA tensors reaches the C++ kernel without passing
// through Python, so the kernels repeat the Python checks (glm45_ops/<family>.py, which are
// authoritative) in the same order and must fail with the same ValueError text. Python formats
// values its own way, so the py_* formatters print them as Python does: shapes and strides as
// tuples "(8, 2)", dtypes as "torch.bfloat16", floats as repr() does. tests/test_extension.py
// (glm45_ops.testing.cuda_kernel_differs) compares the two messages character for character.
#pragma once

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace glm45 {

// ---------------------------------------------------------------------------------------------
// Python's formatting
// ---------------------------------------------------------------------------------------------

// str(dtype): "torch.float32". Python names the C-like types by width and every other type by
// its c10 name in lower case (BFloat16 -> bfloat16, Float8_e4m3fn -> float8_e4m3fn, UInt16 -> uint16).
inline std::string py_dtype(at::ScalarType t) {
  switch (t) {
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kHalf: return "torch.float16";
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kComplexHalf: return "torch.complex32";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: {
      std::string name = c10::toString(t);
      std::transform(name.begin(), name.end(), name.begin(), [](unsigned char c) { return std::tolower(c); });
      return "torch." + name;
    }
  }
}

// tuple(sizes): "()", "(8,)", "(8, 2)"
inline std::string py_tuple(c10::IntArrayRef v) {
  std::string s = "(";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + (v.size() == 1 ? ",)" : ")");
}

// list(sizes): "[]", "[8, 2]"
inline std::string py_list(c10::IntArrayRef v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

// A list of str: "['cpu', 'cuda:0']"
inline std::string py_str_list(const std::vector<std::string>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", '" : "'") + v[i] + "'";
  return s + "]";
}

// repr(float): the shortest digits that round-trip, in fixed notation when the decimal exponent
// is in [-4, 16) ("0.0001", "1.0", "1000000000000000.0"), else in C's %e form ("1e-05", "1e+16").
inline std::string py_repr(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v < 0 ? "-inf" : "inf";
  char buf[64];
  const std::string sci(buf, std::to_chars(buf, buf + sizeof(buf), v, std::chars_format::scientific).ptr);
  const size_t e = sci.find('e');
  const int exp10 = std::stoi(sci.substr(e + 1));
  if (exp10 < -4 || exp10 >= 16) return sci;
  std::string digits;
  for (size_t i = 0; i < e; ++i)
    if (std::isdigit(static_cast<unsigned char>(sci[i]))) digits += sci[i];
  const int n = int(digits.size()), point = exp10 + 1;  // digits before the decimal point
  std::string out = std::signbit(v) ? "-" : "";
  if (point <= 0) return out + "0." + std::string(-point, '0') + digits;
  if (point >= n) return out + digits + std::string(point - n, '0') + ".0";
  return out + digits.substr(0, point) + "." + digits.substr(point);
}

// ---------------------------------------------------------------------------------------------
// Checks (ValueError in Python)
// ---------------------------------------------------------------------------------------------

// "{name} must be {what}, got torch.X" unless t is one of `ok`
inline void check_dtype(const char* name, at::ScalarType t, std::initializer_list<at::ScalarType> ok,
                        const char* what) {
  TORCH_CHECK_VALUE(std::find(ok.begin(), ok.end(), t) != ok.end(), name, " must be ", what, ", got ", py_dtype(t));
}
inline void check_dtype(const char* name, const at::Tensor& t, std::initializer_list<at::ScalarType> ok,
                        const char* what) {
  check_dtype(name, t.scalar_type(), ok, what);
}

inline constexpr const char* kFloatDtypes = "bfloat16, float16 or float32";
inline bool is_float(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf || t == at::kFloat; }
inline void check_float(const char* name, const at::Tensor& t) {
  check_dtype(name, t, {at::kBFloat16, at::kHalf, at::kFloat}, kFloatDtypes);
}

// An integer argument in [1, top].
inline void check_size(const char* name, int64_t v, int64_t top) {
  TORCH_CHECK_VALUE(v >= 1 && v <= top, name, " must be in [1, ", top, "], got ", v);
}

// A unit last stride wherever the last dim has more than one index.
inline void check_unit_last_stride(const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, name,
                    " must be contiguous in its last dim (stride 1), got strides ", py_tuple(t.strides()));
}

// The C++ kernels' own check, last (Python has none: its dispatcher sends CPU tensors elsewhere),
// so every other check runs on CPU tensors called through the CUDA dispatch key.
inline void check_cuda(const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor for the cuda backend, got device ", t.device().str());
}

// ---------------------------------------------------------------------------------------------
// Alignment and strides: which kernel path a tensor can take (not errors)
// ---------------------------------------------------------------------------------------------

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }
inline bool aligned16(const at::Tensor& t) { return aligned16(t.data_ptr()); }

// t.stride(dim) is a multiple of n, or irrelevant (the dim has at most one index).
inline bool stride_multiple(const at::Tensor& t, int64_t dim, int64_t n) {
  return t.size(dim) <= 1 || t.stride(dim) % n == 0;
}

// ---------------------------------------------------------------------------------------------
// Dispatch
// ---------------------------------------------------------------------------------------------

// f.template operator()<T>() with T = float, __half or __nv_bfloat16 (CUDA's own types, so device
// code uses the cuda_fp16 / cuda_bf16 intrinsics directly): call it as
//   dispatch_float(dtype, "x", [&]<typename scalar_t>() { ... });
template <typename F>
void dispatch_float(at::ScalarType t, const char* name, F&& f) {
  switch (t) {
    case at::kFloat: return f.template operator()<float>();
    case at::kHalf: return f.template operator()<__half>();
    case at::kBFloat16: return f.template operator()<__nv_bfloat16>();
    default: TORCH_CHECK_VALUE(false, name, " must be ", kFloatDtypes, ", got ", py_dtype(t));
  }
}

}  // namespace glm45
