// The fused ops compute in their inputs' dtype and read the outputs of the ATen GEMMs they call through
// raw pointers of that dtype. Under torch.autocast those GEMMs would return bfloat16/float16 tensors, read
// as float32: garbage. So autocast stops at the op's boundary; the op is not on autocast's lists and runs
// in its inputs' dtype, like any op autocast leaves alone.
#pragma once
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

namespace hyperfused {

struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

}  // namespace hyperfused
