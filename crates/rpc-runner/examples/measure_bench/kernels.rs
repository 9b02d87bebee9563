//! The fixed kernel set of the fidelity benchmark, as C sources behind the
//! kernel ABI (`#include "tuning_harness_kernel.h"`).
//!
//! - busy-wait kernels: spin on `CLOCK_MONOTONIC` for a nominal time; one
//!   dummy float32 `[1]` argument;
//! - matmul candidates: `C[M][N] = A[M][K] · B[K][N]`, float32, row-major,
//!   `args = [A, B, C]`: a clearly-different set (naive ijk, ikj, two
//!   cache-tiled, a register-blocked one) and a near-equal set (one tiled
//!   kernel plus 0, 0.5, 1, 1.5% of extra work: a dependent chain of
//!   multiply-adds after the product), so the truth is a known order with
//!   gaps of about 0.5%, the first one fastest.

/// One kernel of the set.
#[derive(Debug, Clone)]
pub(crate) struct Kernel {
    /// Unique build name.
    pub(crate) name: String,
    /// C source.
    pub(crate) source: String,
    /// Argument shapes (float32 tensors).
    pub(crate) shapes: Vec<Vec<i64>>,
    /// What it is.
    pub(crate) kind: KernelKind,
}

/// What a kernel is, for the figures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum KernelKind {
    /// Busy-waits this many seconds.
    BusyWait(f64),
    /// A matmul candidate of the clearly-different set.
    Matmul,
    /// A matmul candidate of the near-equal set.
    NearEqual,
}

impl Kernel {
    /// Whether it is a matmul candidate (either set).
    pub(crate) fn is_matmul(&self) -> bool {
        !matches!(self.kind, KernelKind::BusyWait(_))
    }
}

const PRELUDE: &str = "#define _POSIX_C_SOURCE 199309L\n#include <time.h>\n\
                       #include \"tuning_harness_kernel.h\"\n";

fn busy_wait(ns: u64) -> Kernel {
    let source = format!(
        "{PRELUDE}
TUNING_HARNESS_EXPORT int32_t entry(DLTensor* args, int32_t num_args) {{
  (void)args; (void)num_args;
  struct timespec t0, t;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  do {{
    clock_gettime(CLOCK_MONOTONIC, &t);
  }} while ((t.tv_sec - t0.tv_sec) * 1000000000LL + (t.tv_nsec - t0.tv_nsec) < {ns}LL);
  return 0;
}}
"
    );
    Kernel {
        name: format!("busywait_{}us", ns / 1000),
        source,
        shapes: vec![vec![1]],
        kind: KernelKind::BusyWait(ns as f64 * 1e-9),
    }
}

fn header(m: usize, n: usize, k: usize) -> String {
    format!(
        "{PRELUDE}#define M {m}\n#define N {n}\n#define K {k}\n
TUNING_HARNESS_EXPORT int32_t entry(DLTensor* args, int32_t num_args) {{
  if (num_args != 3) return 1;
  const float* restrict A = (const float*)args[0].data;
  const float* restrict B = (const float*)args[1].data;
  float* restrict C = (float*)args[2].data;
"
    )
}

fn matmul(name: &str, m: usize, n: usize, k: usize, body: &str, kind: KernelKind) -> Kernel {
    let mut source = header(m, n, k);
    source.push_str(body);
    source.push_str("  return 0;\n}\n");
    let shapes = vec![vec![m as i64, k as i64], vec![k as i64, n as i64], vec![m as i64, n as i64]];
    Kernel { name: name.to_owned(), source, shapes, kind }
}

const NAIVE: &str = "  for (int i = 0; i < M; i++)
    for (int j = 0; j < N; j++) {
      float s = 0;
      for (int k = 0; k < K; k++) s += A[i * K + k] * B[k * N + j];
      C[i * N + j] = s;
    }
";

const IKJ: &str = "  for (int i = 0; i < M * N; i++) C[i] = 0;
  for (int i = 0; i < M; i++)
    for (int k = 0; k < K; k++) {
      const float a = A[i * K + k];
      for (int j = 0; j < N; j++) C[i * N + j] += a * B[k * N + j];
    }
";

/// Cache tiles of `ti x tj x tk` with ikj inside the tile (every tile size
/// divides the problem size, so the tile loops have no bound checks and the
/// innermost loop vectorizes).
fn tiled(ti: usize, tj: usize, tk: usize) -> String {
    format!(
        "  for (int i = 0; i < M * N; i++) C[i] = 0;
  for (int i0 = 0; i0 < M; i0 += {ti})
    for (int k0 = 0; k0 < K; k0 += {tk})
      for (int j0 = 0; j0 < N; j0 += {tj})
        for (int i = i0; i < i0 + {ti}; i++)
          for (int k = k0; k < k0 + {tk}; k++) {{
            const float a = A[i * K + k];
            for (int j = j0; j < j0 + {tj}; j++) C[i * N + j] += a * B[k * N + j];
          }}
"
    )
}

/// A dependent chain of `n` multiply-adds folded into `C[0]` as `+ 0 * x`
/// (exact for a finite `x`, and not removable without fast-math). `n` is
/// read from a volatile, so the compiled code is the same for every `n`.
fn extra_chain(n: u64) -> String {
    format!(
        "  {{
    static volatile long extra = {n}L; /* opaque: the same code for every n */
    const long n = extra;
    float x = C[0];
    for (long r = 0; r < n; r++) x = x * 0.9999999f + 1e-7f;
    C[0] = C[0] + 0.0f * x;
  }}
"
    )
}

/// A 4 x 32 register block of C accumulated over all of K (M % 4 == 0,
/// N % 32 == 0).
const REGISTER_BLOCKED: &str = "  for (int i = 0; i < M; i += 4)
    for (int j = 0; j < N; j += 32) {
      float acc[4][32] = {0};
      for (int k = 0; k < K; k++) {
        const float* b = &B[k * N + j];
        for (int r = 0; r < 4; r++) {
          const float a = A[(i + r) * K + k];
          for (int c = 0; c < 32; c++) acc[r][c] += a * b[c];
        }
      }
      for (int r = 0; r < 4; r++)
        for (int c = 0; c < 32; c++) C[(i + r) * N + j + c] = acc[r][c];
    }
";

/// The kernel set: 3 busy-waits, then the matmul candidates (`quick`: a
/// 192³ problem, 3 clearly different + 3 near-equal; otherwise 256³, 5 + 4).
/// Every tile size divides 64, so both sizes take them.
pub(crate) fn kernel_set(quick: bool) -> Vec<Kernel> {
    let mut set: Vec<Kernel> = [50_000, 500_000, 5_000_000].into_iter().map(busy_wait).collect();
    let s = if quick { 192 } else { 256 };
    let mm = |name: &str, body: &str, kind| matmul(name, s, s, s, body, kind);
    set.push(mm("mm_naive_ijk", NAIVE, KernelKind::Matmul));
    if !quick {
        set.push(mm("mm_ikj", IKJ, KernelKind::Matmul));
        set.push(mm("mm_tiled_16x16x16", &tiled(16, 16, 16), KernelKind::Matmul));
    }
    set.push(mm("mm_tiled_32x64x64", &tiled(32, 64, 64), KernelKind::Matmul));
    set.push(mm("mm_regblock_4x32", REGISTER_BLOCKED, KernelKind::Matmul));
    // The near-equal set: the 16-row tiled kernel plus a dependent chain of
    // `extra` multiply-adds (~4 cycles each) sized at 0, 0.5, 1, 1.5% of its
    // estimated time: really different, in a known order.
    let per_percent = (s * s * s / 2250) as u64;
    let steps: &[u64] = if quick { &[0, 1, 2] } else { &[0, 1, 2, 3] };
    for &step in steps {
        let extra = step * per_percent / 2;
        let body = format!("{}{}", tiled(16, s, 64), extra_chain(extra));
        set.push(mm(&format!("mm_near_plus{}permille", step * 5), &body, KernelKind::NearEqual));
    }
    set
}
