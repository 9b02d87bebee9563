/*
 * The kernel ABI of tuning-harness (rpc-runner's measurement pipeline).
 *
 * A kernel is a shared library exporting
 *
 *     int32_t entry(DLTensor* args, int32_t num_args);   // 0 = success
 *
 * (the symbol name is configurable; "entry" by default). `args` points to
 * `num_args` DLTensors in the order of the measurement's argument info:
 * CPU tensors (device_type kDLCPU), compact row-major (`strides` is NULL),
 * `byte_offset` 0, data 64-byte aligned. Any nonzero return value fails the
 * measurement with that code.
 *
 * The three structs below are laid out exactly as in DLPack's dlpack.h
 * (v0.8 and v1.x). If dlpack.h is included first (any version: its include
 * guard or version macros are defined), its definitions are used.
 *
 * Print this file with `rpc-runner kernel-header`; LocalBuilder puts it on
 * every build's include path: `#include "tuning_harness_kernel.h"`.
 */
#ifndef TUNING_HARNESS_KERNEL_H
#define TUNING_HARNESS_KERNEL_H

#include <stdint.h>

#if !defined(DLPACK_DLPACK_H_) && !defined(DLPACK_VERSION) && !defined(DLPACK_MAJOR_VERSION)
typedef enum { kDLCPU = 1 } DLDeviceType;
typedef enum { kDLInt = 0U, kDLUInt = 1U, kDLFloat = 2U } DLDataTypeCode;

typedef struct {
  DLDeviceType device_type;
  int32_t device_id;
} DLDevice;

typedef struct {
  uint8_t code;  /* DLDataTypeCode */
  uint8_t bits;  /* bits of one lane */
  uint16_t lanes;
} DLDataType;

typedef struct {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;  /* NULL: compact row-major */
  uint64_t byte_offset;
} DLTensor;
#endif /* dlpack.h */

/* The signature of a kernel's entry point. */
typedef int32_t (*tuning_harness_kernel_fn)(DLTensor* args, int32_t num_args);

/* Marks the entry point exported (also under -fvisibility=hidden). */
#define TUNING_HARNESS_EXPORT __attribute__((visibility("default")))

#endif /* TUNING_HARNESS_KERNEL_H */
