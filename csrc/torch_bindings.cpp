// The op surface of ahn_ops: every torch.ops.ahn schema is declared here and nowhere else.
// csrc/cpu/*.cpp and csrc/cuda/*.cu only add TORCH_LIBRARY_IMPL(ahn, CPU|CUDA, m).
#include <Python.h>  // first, as Python asks; CMake defines Py_LIMITED_API (one .so per torch, any Python)

#include <torch/library.h>

TORCH_LIBRARY(ahn, m) {
  // One decode step of AHN attention for every sequence of the batch, each at its own
  // position pos[b]: absorb the token leaving the window into the state, attend sinks + window
  // + the new token, read the state out, then write the new token (k, v, gate inputs) into the
  // cache and advance pos. Shapes: q [B,H,D]; k, v [B,HKV,D]; a, b, z [B,H]; A_log, dt_bias [H];
  // norm_weight [D] (mamba2: [H*D]); o_weight [H,D,D]; sink_k/v [B,S,HKV,D]; ring_k/v [B,W,HKV,D];
  // gates [B,W,2,H] in q's dtype (each ring token's raw a and b; the gates are made from them when
  // the token leaves the window); state [B,H,D,D] fp32; pos [B] int64. Returns [B,H,D] in q's dtype.
  // overlap_prev (CUDA, sm_90): the op may start while the previous kernel on the stream finishes
  // (programmatic dependent launch), reading only the cache until that kernel's writes are visible;
  // only for a previous kernel that writes none of the cache tensors. It changes no result.
  m.def(
      "decode_step(Tensor q, Tensor k, Tensor v, Tensor? a, Tensor? b, Tensor z, Tensor? A_log, "
      "Tensor? dt_bias, Tensor norm_weight, Tensor o_weight, Tensor(a!) sink_k, Tensor(b!) sink_v, "
      "Tensor(c!) ring_k, Tensor(d!) ring_v, Tensor(e!) gates, Tensor(f!) state, Tensor(g!) pos, "
      "int window, int sinks, str kind, bool overlap_prev=False) -> Tensor");
  // The sm_90a prefill forward (csrc/cuda/ahn_fwd_sm90.cu; built where the CUTLASS headers are found, see
  // ahn_ops._C.WITH_SM90): window + sinks attention of q [B,T,H,128] over k, v [B,T,HKV,128] (bf16 / fp16),
  // and with the memory passes' buffers (v_new [B,T,H,D], hs [B*ceil(T/64),H,D,D], gc [B,T,H] fp32) the GDN /
  // DN memory readout and epilogue (o_weight [H,D,D], z [B,T,H], norm_weight [D] fp32) added. Returns out
  // [B,T,H,D] and the softmax's natural-log lse [B,H,T] fp32. variant: 1 lets the two consumer warpgroups
  // take turns issuing their products, 0 does not (the same result), 2 is 1 with the softmax's row max and sum in
  // four partials (the sum rounded in another order). cu_seqlens (int32 [N+1]) with B = 1: N
  // sequences packed along T, the longest max_seqlen; hs then holds each sequence's ceil(T_n/64) chunks in turn,
  // sequence n's first at chunk_start[n] (int32 [N], any stride; given with cu_seqlens and the memory only).
  // pos (int64 [B]): the cache path, queries at positions pos ..; k, v [1,B*(W+T),HKV,D] each sequence's W
  // ring-tail rows then its new tokens, the sinks in sink_k, sink_v [B,S,HKV,D]. initial_state: the memory
  // started from a state (hs holds it), so every row reads the memory. yp [B,T,H,D], ss [B,T,H] fp32 (written):
  // Mamba2, whose norm spans the heads: the kernel stores the projection and the sum of squares for the norm
  // kernel after it, o the window's output alone; norm_weight is then [H*D]. ready (int32 [hs rows*H]), with
  // the memory passes running beside it: a tile whose chunks' counters are below ready_target stores o and lse
  // and sets deferred[tile] (uint8 zeros); memory_only: the launch after the passes, which adds the memory to
  // those tiles' rows of out (the first launch's o) in place, and returns two empty tensors. rows_outer: the
  // CTAs start row block by row block over all heads (the order in which a state chain beside the kernel makes
  // the chunks ready) instead of head by head; the same result.
  m.def(
      "prefill_fwd_sm90(Tensor q, Tensor k, Tensor v, Tensor? v_new, Tensor? hs, Tensor? o_weight, Tensor? gc, "
      "Tensor? z, Tensor? norm_weight, int window, int sinks, float mem_scale, int variant=1, "
      "Tensor? cu_seqlens=None, int max_seqlen=0, Tensor? pos=None, Tensor? sink_k=None, Tensor? sink_v=None, "
      "bool initial_state=False, Tensor(a!)? yp=None, Tensor(b!)? ss=None, Tensor? ready=None, int ready_target=0, "
      "Tensor(c!)? deferred=None, bool memory_only=False, Tensor(d!)? out=None, Tensor? chunk_start=None, "
      "bool rows_outer=False) -> "
      "(Tensor, Tensor)");
  // The sm_90a window band backward (csrc/cuda/ahn_bwd_sm90.cu, built with the forward's kernel): the band
  // share (keys t - window < j <= t) of the attention's gradients, added to the fp32 dq [tokens,H,128], dk, dv
  // [tokens,HKV,128]. q, dout [tokens,H,128], k, v [tokens,HKV,128] (bf16 / fp16) hold the sequences packed
  // (cu_seqlens int32 [N+1], the longest max_seqlen); ld [2,H,Tpad] fp32 the forward's lse (log2 domain, scores
  // times log2(e) / sqrt(128)) and delta = rowsum(dout * the window's output), Tpad >= tokens a multiple of 4.
  m.def(
      "band_bwd_sm90(Tensor q, Tensor k, Tensor v, Tensor dout, Tensor ld, int window, Tensor cu_seqlens, "
      "int max_seqlen, Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv) -> ()");
}

#if AHN_OPS_WITH_CUDA
namespace ahn {
void reread_decode_switches();  // csrc/cuda/ahn_decode.cu
}  // namespace ahn
#endif

// ahn_ops._C.reread_decode_switches(): read the AHN_DECODE_* / AHN_OPS_POISON debug switches of the CUDA
// decode op again (they are parsed once, on its first call; see csrc/cuda/ahn_decode.cu). A no-op without
// the CUDA kernels.
static PyObject* reread_decode_switches(PyObject*, PyObject*) {
#if AHN_OPS_WITH_CUDA
  ahn::reread_decode_switches();
#endif
  Py_RETURN_NONE;
}

// `import ahn_ops._C` runs the static registrations above; the module itself carries how it was
// built, which ahn_ops/_ext.py checks against the running torch, and reread_decode_switches.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyMethodDef methods[] = {
      {"reread_decode_switches", reread_decode_switches, METH_NOARGS,
       "Read the AHN_DECODE_* / AHN_OPS_POISON switches of the CUDA decode op again."},
      {nullptr, nullptr, 0, nullptr},
  };
  static PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "ahn_ops kernels, registered as torch.ops.ahn.*", -1, methods,
  };
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  if (PyModule_AddStringConstant(module, "TORCH_VERSION", AHN_OPS_TORCH_VERSION) < 0 ||
      PyModule_AddIntConstant(module, "WITH_CUDA", AHN_OPS_WITH_CUDA) < 0 ||
      PyModule_AddIntConstant(module, "WITH_SM90", AHN_OPS_WITH_SM90) < 0 ||
      PyModule_AddStringConstant(module, "CUDA_ARCHS", AHN_OPS_CUDA_ARCHS) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
