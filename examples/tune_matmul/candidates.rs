//! The candidates of `tune_matmul` and the C source of each.
//!
//! Every candidate computes `C[M][N] = A[M][K] * B[K][N]` (float32, row-major)
//! behind the kernel ABI `int32_t entry(DLTensor* args, int32_t num_args)`,
//! with `args = [A, B, C]`. `C` arrives filled with random values, so every
//! kernel overwrites it.

use std::fmt::Write as _;

use serde_json::{Value, json};

use crate::space::Gemm;
use crate::{gemm_c, openblas};

/// The problem size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Size {
    pub(crate) m: usize,
    pub(crate) n: usize,
    pub(crate) k: usize,
}

impl Size {
    /// Floating-point operations of one matmul (a multiply and an add per term).
    pub(crate) fn flops(self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64
    }
}

/// What a candidate is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// The reference: untiled i-j-k loops.
    Naive,
    /// A point of the search space.
    Gemm(Gemm),
    /// OpenBLAS's `cblas_sgemm` through a shim, with this many threads.
    OpenBlas { threads: usize },
    /// Broken on purpose: does not compile.
    BrokenCompile,
    /// Broken on purpose: writes through a null pointer (SIGSEGV).
    BrokenCrash,
    /// Broken on purpose: a tiled kernel that skips the last k-tile.
    BrokenWrong,
}

/// How a candidate is expected to end (the broken ones on purpose).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expect {
    Ok,
    CompileError,
    Crash,
    WrongResult,
}

/// One candidate kernel.
#[derive(Debug, Clone)]
pub(crate) struct Candidate {
    /// A unique, file-name-safe name.
    pub(crate) name: String,
    pub(crate) kind: Kind,
    pub(crate) expect: Expect,
}

impl Candidate {
    pub(crate) fn new(kind: Kind) -> Self {
        let (name, expect) = match kind {
            Kind::Naive => ("naive".to_owned(), Expect::Ok),
            Kind::Gemm(g) => (g.name(), Expect::Ok),
            Kind::OpenBlas { threads: 1 } => ("openblas_1t".to_owned(), Expect::Ok),
            Kind::OpenBlas { threads } => (format!("openblas_{threads}t"), Expect::Ok),
            Kind::BrokenCompile => ("broken_compile".to_owned(), Expect::CompileError),
            Kind::BrokenCrash => ("broken_crash".to_owned(), Expect::Crash),
            Kind::BrokenWrong => ("broken_wrong_result".to_owned(), Expect::WrongResult),
        };
        Candidate { name, kind, expect }
    }

    /// The candidate's configuration as JSON fields (for the tuning log).
    pub(crate) fn config_json(&self) -> serde_json::Map<String, Value> {
        let v = match self.kind {
            Kind::Naive => json!({"kind": "naive", "order": "ijk"}),
            Kind::Gemm(g) => g.json(),
            Kind::OpenBlas { threads } => json!({"kind": "openblas", "threads": threads}),
            Kind::BrokenCompile => json!({"kind": "broken_compile"}),
            Kind::BrokenCrash => json!({"kind": "broken_crash"}),
            Kind::BrokenWrong => json!({"kind": "broken_wrong_result", "order": "ikj"}),
        };
        match v {
            Value::Object(map) => map,
            _ => unreachable!("config is an object"),
        }
    }

    /// A short human description of the configuration (for the table).
    pub(crate) fn describe(&self) -> String {
        match self.kind {
            Kind::Naive => "naive i-j-k".to_owned(),
            Kind::Gemm(g) => g.describe(),
            Kind::OpenBlas { threads } => format!("OpenBLAS cblas_sgemm, {threads} thread(s)"),
            Kind::BrokenCompile => "broken: syntax error".to_owned(),
            Kind::BrokenCrash => "broken: null write".to_owned(),
            Kind::BrokenWrong => "broken: skips a k-tile".to_owned(),
        }
    }

    /// Compiler flags of this candidate only (after the builder's own).
    pub(crate) fn extra_flags(&self) -> Vec<String> {
        match self.kind {
            Kind::Gemm(g) => {
                let mut flags = g.isa.flags();
                if g.threads > 1 {
                    flags.push("-pthread".to_owned());
                }
                flags
            }
            _ => Vec::new(),
        }
    }

    /// The full C translation unit (`lib`: the OpenBLAS library's name).
    pub(crate) fn source(&self, size: Size, lib: &str) -> String {
        let mut s = String::new();
        let Size { m, n, k } = size;
        let _ = write!(
            s,
            "/* tune_matmul candidate {name}: {desc} */\n{PRELUDE}\n\
             #define M {m}\n#define N {n}\n#define K {k}\n\n",
            name = self.name,
            desc = self.describe(),
        );
        let (defs, body) = match self.kind {
            Kind::Gemm(g) => gemm_c::body_and_defs(&g, size),
            Kind::OpenBlas { threads } => openblas::shim_body(lib, threads),
            _ => (String::new(), self.body(size)),
        };
        s.push_str(&defs);
        s.push_str(
            "static int matmul(const float* restrict A, const float* restrict B, \
             float* restrict C) {\n",
        );
        if let Kind::OpenBlas { .. } = self.kind {
            s.push_str("  { const int e = load(); if (e) return e; }\n");
        }
        s.push_str(&body);
        s.push_str("  return 0;\n}\n\n");
        s.push_str(ENTRY);
        s
    }

    fn body(&self, size: Size) -> String {
        match self.kind {
            Kind::Naive => NAIVE.to_owned(),
            Kind::BrokenCompile => {
                // An undeclared identifier and a missing semicolon.
                "  for (int i = 0; i < M * N; ++i) C[i] = undeclared_accumulator\n".to_owned()
            }
            Kind::BrokenCrash => {
                // `volatile` keeps the compiler from proving the pointer null
                // (it would emit a trap instruction instead of the store).
                "  float* volatile sink = 0;\n  *sink = A[0] + B[0];\n  C[0] = *sink;\n".to_owned()
            }
            Kind::BrokenWrong => {
                // A k-tile smaller than K, so that there is a last one to skip.
                let tk = [16, 8, 4, 2, 1].into_iter().find(|&t| t < size.k).unwrap_or(1);
                tiled_skipping_last_k_tile(16, 64, tk)
            }
            Kind::Gemm(_) | Kind::OpenBlas { .. } => unreachable!("generated elsewhere"),
        }
    }
}

const PRELUDE: &str = r#"#include <string.h>

/* DLTensor and the kernel ABI; LocalBuilder puts this header on the include path. */
#include "tuning_harness_kernel.h"

#define MIN(a, b) ((a) < (b) ? (a) : (b))
"#;

const ENTRY: &str = r#"/* A float32 CPU matrix of rows x cols, compact row-major. */
static int is_matrix(const DLTensor* t, int64_t rows, int64_t cols) {
  if (t->data == 0 || t->ndim != 2) return 0;
  if (t->dtype.code != kDLFloat || t->dtype.bits != 32 || t->dtype.lanes != 1) return 0;
  if (t->shape[0] != rows || t->shape[1] != cols) return 0;
  if (t->strides != 0 && (t->strides[1] != 1 || t->strides[0] != cols)) return 0;
  return 1;
}

static void* base(const DLTensor* t) { return (char*)t->data + t->byte_offset; }

TUNING_HARNESS_EXPORT
int32_t entry(DLTensor* args, int32_t num_args) {
  if (num_args != 3) return 1;
  if (!is_matrix(&args[0], M, K)) return 2;
  if (!is_matrix(&args[1], K, N)) return 3;
  if (!is_matrix(&args[2], M, N)) return 4;
  return matmul((const float*)base(&args[0]), (const float*)base(&args[1]),
                (float*)base(&args[2]));
}
"#;

const NAIVE: &str = "  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float acc = 0.0f;
      for (int k = 0; k < K; ++k) acc += A[i * K + k] * B[k * N + j];
      C[i * N + j] = acc;
    }
";

/// The broken-on-purpose kernel: i-k-j in `ti x tj x tk` tiles, the last
/// k-tile never accumulated.
fn tiled_skipping_last_k_tile(ti: usize, tj: usize, tk: usize) -> String {
    let mut s = String::new();
    s.push_str("  memset(C, 0, sizeof(float) * M * N);\n");
    let _ = writeln!(s, "  for (int i0 = 0; i0 < M; i0 += {ti}) {{");
    let _ = writeln!(s, "    const int i1 = MIN(i0 + {ti}, M);");
    let _ = writeln!(s, "    for (int j0 = 0; j0 < N; j0 += {tj}) {{");
    let _ = writeln!(s, "      const int j1 = MIN(j0 + {tj}, N);");
    // The bug on purpose: the last k-tile is never accumulated.
    let _ = writeln!(s, "      for (int k0 = 0; k0 + {tk} < K; k0 += {tk}) {{");
    let _ = writeln!(s, "        const int k1 = MIN(k0 + {tk}, K);");
    s.push_str("        for (int i = i0; i < i1; ++i)\n");
    s.push_str("          for (int k = k0; k < k1; ++k)\n");
    s.push_str(
        "            for (int j = j0; j < j1; ++j) C[i * N + j] += A[i * K + k] * B[k * N + j];\n",
    );
    s.push_str("      }\n    }\n  }\n");
    s
}

/// The fixed candidates of every run: the naive reference and the three
/// broken on purpose.
pub(crate) fn fixed() -> Vec<Candidate> {
    [Kind::Naive, Kind::BrokenCompile, Kind::BrokenCrash, Kind::BrokenWrong]
        .into_iter()
        .map(Candidate::new)
        .collect()
}
