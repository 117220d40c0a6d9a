// The sequence ops' own graph capture (HYPERFUSED_CUDA_GRAPHS=1): a call whose shapes, settings and parameter
// addresses were seen before replays a recording of the op's whole body (on CUDA, a CUDA graph: every step's
// GEMMs and kernel launches in one cudaGraphLaunch), instead of issuing each launch from the host.
//
// A recording reads and writes fixed addresses, so each one owns static copies of the call's activation
// inputs, which every call copies its inputs into, and the outputs the recording writes, which every call
// clones (a second forward before the first one's backward must not overwrite what the first one returned).
// The parameters are read in place: their addresses are part of the key, so a replay reads the current
// values whatever changed them (an optimizer step, `.data`), and a parameter in new storage records anew.
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <memory>
#include <vector>

namespace hyperfused {

using Body = std::function<std::vector<at::Tensor>()>;

// A recorded body that runs again on the same memory.
struct Recording {
  virtual ~Recording() = default;
  virtual void replay() = 0;
};

// How a device records: CUDA graphs (cuda/register_cuda.cpp), or under the CUDA emulator a rerun of the body
// (ops.cpp), so that the tests check everything but the capture itself without a GPU.
struct GraphBackend {
  // The caller's stream is being captured already (the caller's own CUDA graph): run eagerly, inside it.
  bool (*capturing)();
  // Records `body` (a capture runs it on a side stream: warm-up, then capture) and returns the recording, its
  // outputs set to the tensors a replay writes; null when the device could not record it (run eagerly).
  std::unique_ptr<Recording> (*record)(const Body& body, std::vector<at::Tensor>& outputs);
  void* (*stream)();  // the caller's stream: a recording replays on it, so the key holds it
};

// Whether HYPERFUSED_CUDA_GRAPHS asks for recordings ("1"; "0" or unset: never).
bool graphs_requested();

// The op's outputs, from a replay where the key was recorded before, or else from `body_on` run eagerly: the
// first call with a key runs eagerly and the second records (a key seen once may never repeat). `copied`: the
// activation inputs, copied into the recording's own (an undefined one, an absent optional, stays absent);
// `params`: read in place; `config`: every other setting that changes what the body does. At most 16
// recordings are kept, the least recently used dropped first.
std::vector<at::Tensor> run_recorded(
    const GraphBackend& backend, int64_t op, const std::vector<at::Tensor>& copied, at::TensorList params,
    const std::vector<int64_t>& config,
    const std::function<std::vector<at::Tensor>(const std::vector<at::Tensor>& inputs)>& body_on);

// Tests: (recordings made, replays run) since the process started.
std::pair<int64_t, int64_t> recording_counts();

}  // namespace hyperfused
