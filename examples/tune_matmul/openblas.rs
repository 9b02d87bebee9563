//! What the device reports about itself (a probe kernel run through the
//! same runner), and OpenBLAS's `cblas_sgemm` behind our kernel ABI.
//!
//! The probe writes into an int32 tensor: whether the device's CPU
//! supports AVX2, FMA and AVX-512F (`__builtin_cpu_supports`), whether
//! `dlopen` finds the OpenBLAS library there, and its online CPUs. The
//! kernels are built on this host but run on the device: what they may use
//! is what the device reports, never what the build host has.

use crate::space::Isa;

/// Slots of the probe's output: 5 flags and counts, then OpenBLAS's core
/// name, one character a slot, zero-terminated.
pub(crate) const PROBE_LEN: usize = 5 + CORE_NAME_LEN;

const CORE_NAME_LEN: usize = 32;

/// The probe kernel: `args = [int32 out[PROBE_LEN]]`.
pub(crate) fn probe_source(lib: &str) -> String {
    format!(
        r#"/* tune_matmul: what the device supports. */
#include <dlfcn.h>
#include <unistd.h>
#include "tuning_harness_kernel.h"

TUNING_HARNESS_EXPORT
int32_t entry(DLTensor* args, int32_t num_args) {{
  if (num_args != 1 || args[0].ndim != 1 || args[0].shape[0] != {PROBE_LEN}) return 1;
  if (args[0].dtype.code != kDLInt || args[0].dtype.bits != 32) return 2;
  int32_t* out = (int32_t*)((char*)args[0].data + args[0].byte_offset);
  __builtin_cpu_init();
  out[0] = __builtin_cpu_supports("avx2") != 0;
  out[1] = __builtin_cpu_supports("fma") != 0;
  out[2] = __builtin_cpu_supports("avx512f") != 0;
  void* lib = dlopen({lib:?}, RTLD_NOW | RTLD_LOCAL);
  out[3] = lib != 0 && dlsym(lib, "cblas_sgemm") != 0;
  for (int i = 5; i < {PROBE_LEN}; ++i) out[i] = 0;
  char* (*corename)(void) = lib ? (char* (*)(void))dlsym(lib, "openblas_get_corename") : 0;
  const char* name = corename ? corename() : 0;
  for (int i = 0; name && name[i] && i < {CORE_NAME_LEN} - 1; ++i) out[5 + i] = (unsigned char)name[i];
  if (lib) dlclose(lib);
  out[4] = (int32_t)sysconf(_SC_NPROCESSORS_ONLN);
  return 0;
}}
"#
    )
}

/// What the probe reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Device {
    pub(crate) avx2: bool,
    pub(crate) fma: bool,
    pub(crate) avx512f: bool,
    /// The OpenBLAS library loads and has `cblas_sgemm`.
    pub(crate) openblas: bool,
    pub(crate) cpus: usize,
    /// The kernels OpenBLAS picked for this CPU (`openblas_get_corename`).
    pub(crate) openblas_core: Option<String>,
}

impl Device {
    pub(crate) fn from_probe(out: &[i32]) -> Option<Device> {
        if out.len() != PROBE_LEN {
            return None;
        }
        let head: &[i32; 5] = out[..5].try_into().ok()?;
        let &[avx2, fma, avx512f, openblas, cpus] = head;
        let name = &out[5..];
        let core: String = name
            .iter()
            .take_while(|&&c| c != 0)
            .filter_map(|&c| u8::try_from(c).ok().filter(u8::is_ascii_graphic).map(char::from))
            .collect();
        Some(Device {
            openblas_core: (!core.is_empty()).then_some(core),
            avx2: avx2 != 0,
            fma: fma != 0,
            avx512f: avx512f != 0,
            openblas: openblas != 0,
            cpus: usize::try_from(cpus).unwrap_or(1).max(1),
        })
    }

    /// The micro-kernel instruction sets the device runs (portable always).
    pub(crate) fn isas(&self) -> Vec<Isa> {
        let mut isas = Vec::new();
        if self.avx512f && self.fma {
            isas.push(Isa::Avx512);
        }
        if self.avx2 && self.fma {
            isas.push(Isa::Avx2);
        }
        isas.push(Isa::Portable);
        isas
    }

    pub(crate) fn describe(&self) -> String {
        let yes = |b: bool| if b { "yes" } else { "no" };
        format!(
            "device: avx2 {}, fma {}, avx512f {}, {} CPUs online",
            yes(self.avx2),
            yes(self.fma),
            yes(self.avx512f),
            self.cpus
        )
    }
}

/// `cblas_sgemm` of `lib` (loaded at the first call, `RTLD_NOW |
/// RTLD_LOCAL`, kept loaded for the worker's life) with `threads` OpenBLAS
/// threads (0: OpenBLAS's default, all CPUs), behind our ABI
/// (`args = [A, B, C]`). Returns 10 if the library cannot be loaded, 11 if
/// it lacks `cblas_sgemm`.
pub(crate) fn shim_body(lib: &str, threads: usize) -> (String, String) {
    let defs = format!(
        r#"#include <dlfcn.h>
typedef void (*sgemm_t)(int, int, int, int, int, int, float, const float*, int, const float*, int,
                        float, float*, int);
typedef void (*set_threads_t)(int);
typedef int (*get_threads_t)(void);
static sgemm_t sgemm;
static set_threads_t set_threads;
static get_threads_t get_threads;
static int load(void) {{
  if (sgemm) return 0;
  void* lib = dlopen({lib:?}, RTLD_NOW | RTLD_LOCAL);
  if (!lib) return 10;
  set_threads = (set_threads_t)dlsym(lib, "openblas_set_num_threads");
  get_threads = (get_threads_t)dlsym(lib, "openblas_get_num_threads");
  sgemm = (sgemm_t)dlsym(lib, "cblas_sgemm");
  return sgemm ? 0 : 11;
}}
#define THREADS {threads}
"#
    );
    let body = "  if (THREADS > 0 && set_threads && (!get_threads || get_threads() != THREADS))\n\
                \x20   set_threads(THREADS);\n\
                \x20 /* CblasRowMajor, CblasNoTrans, CblasNoTrans */\n\
                \x20 sgemm(101, 111, 111, M, N, K, 1.0f, A, K, B, N, 0.0f, C, N);\n"
        .to_owned();
    (defs, body)
}
