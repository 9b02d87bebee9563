/* Test kernels for rpc-runner's kernel ABI:
 *   int32_t NAME(DLTensor* args, int32_t num_args);  0 = success
 * Built at test time with `cc -O2 -shared -fPIC -I include/`. */
#define _POSIX_C_SOURCE 199309L
#include <stdint.h>
#include <time.h>

/* DLTensor and friends: the kernel ABI header shipped with rpc-runner. */
#include "tuning_harness_kernel.h"

static int is_f32_matrix(const DLTensor* t) {
  return t->ndim == 2 && t->dtype.code == 2 && t->dtype.bits == 32 && t->dtype.lanes == 1 &&
         t->strides == 0 && t->byte_offset == 0 && t->device.device_type == 1;
}

/* The default entry: C[m,n] = A[m,k] @ B[k,n] in float32; 1 on bad args. */
int32_t entry(DLTensor* args, int32_t num_args) {
  if (num_args != 3) return 1;
  const DLTensor *a = &args[0], *b = &args[1], *c = &args[2];
  if (!is_f32_matrix(a) || !is_f32_matrix(b) || !is_f32_matrix(c)) return 1;
  int64_t m = a->shape[0], k = a->shape[1], n = b->shape[1];
  if (b->shape[0] != k || c->shape[0] != m || c->shape[1] != n) return 1;
  const float* pa = (const float*)a->data;
  const float* pb = (const float*)b->data;
  float* pc = (float*)c->data;
  for (int64_t i = 0; i < m; i++) {
    for (int64_t j = 0; j < n; j++) {
      float acc = 0.0f;
      for (int64_t p = 0; p < k; p++) acc += pa[i * k + p] * pb[p * n + j];
      pc[i * n + j] = acc;
    }
  }
  return 0;
}

static int64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Spins for 200 us of CLOCK_MONOTONIC. */
int32_t busy_200us(DLTensor* args, int32_t num_args) {
  (void)args;
  (void)num_args;
  int64_t end = now_ns() + 200000;
  while (now_ns() < end) {
  }
  return 0;
}

/* Does nothing. */
int32_t empty(DLTensor* args, int32_t num_args) {
  (void)args;
  (void)num_args;
  return 0;
}

/* Fails with code 3. */
int32_t fail3(DLTensor* args, int32_t num_args) {
  (void)args;
  (void)num_args;
  return 3;
}

/* Stores through a null pointer the compiler cannot see (args[0].byte_offset
 * is 0), so it is a real SIGSEGV and not a trap instruction. */
int32_t segv(DLTensor* args, int32_t num_args) {
  (void)num_args;
  volatile int32_t* p = (volatile int32_t*)(uintptr_t)args[0].byte_offset;
  *p = 1;
  return 0;
}

/* out[0] = the sum of one int32 per 64-byte line of in: touches every cache
 * line of a (large) argument with little arithmetic, so it is memory-bound. */
int32_t sum_lines(DLTensor* args, int32_t num_args) {
  if (num_args != 2) return 1;
  const int32_t* in = (const int32_t*)args[1].data;
  int64_t len = args[1].shape[0];
  int32_t acc = 0;
  for (int64_t i = 0; i < len; i += 16) acc += in[i];
  ((int32_t*)args[0].data)[0] = acc;
  return 0;
}
