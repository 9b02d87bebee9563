/*
 * The few TVM-FFI declarations a tuning-harness kernel needs to be loadable
 * by Apache TVM's runtime (`tvm.runtime.load_module`, TVM's RPC servers).
 *
 * TVM's runtime loads a plain C shared library and looks a function `name`
 * up as the symbol `__tvm_ffi_<name>` with the safe-call signature below:
 * `args` holds `num_args` packed values; 0 means success; on failure the
 * function raises an error with `TVMFFIErrorSetRaisedFromCStr` and returns
 * -1. The caller sets `result->type_index` to None before the call.
 *
 * Written for tuning-harness from TVM-FFI's documented C ABI (tvm-ffi 0.1,
 * as shipped with apache-tvm 0.21 to 0.27); the names carry a `THFFI`
 * prefix so this header can be included next to TVM's own
 * <tvm/ffi/c_api.h>, and rpc-runner's tests check that the two agree
 * (sizes, offsets, type indices). No TVM install is needed to build against
 * it. LocalBuilder puts it on every build's include path next to
 * tuning_harness_kernel.h; `LocalBuilderConfig::tvm_export` generates the
 * export from it.
 */
#ifndef TUNING_HARNESS_TVM_FFI_H
#define TUNING_HARNESS_TVM_FFI_H

#include <stdint.h>

#include "tuning_harness_kernel.h"

/* The type indices of packed values this header's users read. */
enum {
  kTHFFINone = 0,
  kTHFFIInt = 1,
  /* `v_ptr` is a `DLTensor*` (how TVM's RPC servers pass tensors). */
  kTHFFIDLTensorPtr = 7,
  /* First index of heap objects: `v_obj` points to a THFFIObject header. */
  kTHFFIStaticObjectBegin = 64,
  /* `v_obj` is a tensor object: its DLTensor follows the object header
   * (how TVM's Python passes `tvm.runtime.Tensor`s). */
  kTHFFITensor = 70
};

/* The header of every TVM-FFI heap object (24 bytes). */
typedef struct {
  uint64_t combined_ref_count;
  int32_t type_index;
  uint32_t padding;
  union {
    void (*deleter)(void* self, int flags);
    int64_t align;
  } tail;
} THFFIObject;

/* One packed value (16 bytes): a type index, 4 bytes that are zero for the
 * values read here, then the payload. */
typedef struct {
  int32_t type_index;
  uint32_t zero_padding;
  union {
    int64_t v_int64;
    double v_float64;
    void* v_ptr;
    THFFIObject* v_obj;
  } v;
} THFFIAny;

/* The safe-call signature of an exported function `__tvm_ffi_<name>`. */
typedef int (*THFFISafeCallType)(void* self, const THFFIAny* args, int32_t num_args,
                                 THFFIAny* result);

/* The DLTensor of a tensor object (the object header is followed by it). */
static inline DLTensor* th_ffi_tensor_dltensor(THFFIObject* obj) {
  return (DLTensor*)(void*)((char*)obj + sizeof(THFFIObject));
}

#ifdef __cplusplus
extern "C" {
#endif
/* TVM-FFI's error setter. Weak: it resolves inside a TVM process (TVM's
 * runtime library is loaded globally), and is NULL elsewhere (e.g. when the
 * library is loaded by rpc-runner's own workers). */
void TVMFFIErrorSetRaisedFromCStr(const char* kind, const char* message) __attribute__((weak));
#ifdef __cplusplus
}
#endif

#endif /* TUNING_HARNESS_TVM_FFI_H */
