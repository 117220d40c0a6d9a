// Optional arguments as plain values, for code that keeps or passes them in lists (the autograd's saved
// tensors, a recording's inputs and key): an absent tensor as the undefined tensor and back, an absent dtype as
// -1 and back.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace hyperfused {

inline at::Tensor or_undefined(const std::optional<at::Tensor>& t) { return t ? *t : at::Tensor(); }
inline std::optional<at::Tensor> or_none(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}
inline int64_t dtype_code(const std::optional<at::ScalarType>& t) { return t ? static_cast<int64_t>(*t) : -1; }
inline std::optional<at::ScalarType> dtype_of_code(int64_t code) {
  return code < 0 ? std::nullopt : std::optional<at::ScalarType>(static_cast<at::ScalarType>(code));
}

}  // namespace hyperfused
