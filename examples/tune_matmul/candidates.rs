//! The search space of `tune_matmul` and the C source of each candidate.
//!
//! Every candidate computes `C[M][N] = A[M][K] * B[K][N]` (float32, row-major)
//! behind the kernel ABI `int32_t entry(DLTensor* args, int32_t num_args)`,
//! with `args = [A, B, C]`. `C` arrives filled with random values, so every
//! kernel overwrites it.

use std::fmt::Write as _;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde_json::{Value, json};

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

/// Loop order inside a tile (the tile loops themselves run i0, j0, k0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Order {
    /// Dot products: the inner loop walks a column of B (strided).
    Ijk,
    /// Row updates: the inner loop streams a row of B and of C (contiguous).
    Ikj,
    /// Like `Ikj` with k outermost in the tile: one row of B reused over i.
    Kij,
}

impl Order {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Order::Ijk => "ijk",
            Order::Ikj => "ikj",
            Order::Kij => "kij",
        }
    }
}

/// What a candidate is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// The reference: untiled i-j-k loops.
    Naive,
    /// Cache tiles of `ti x tj x tk`, an inner loop order, and the innermost
    /// loop unrolled by `unroll`.
    Tiled { order: Order, ti: usize, tj: usize, tk: usize, unroll: usize },
    /// B packed transposed once per call, then dot products over contiguous
    /// rows with `lanes` independent partial sums (a vectorizable reduction),
    /// tiled `ti x tj` over C.
    PackedBt { ti: usize, tj: usize, lanes: usize },
    /// Register blocking: an `mr x nr` block of C stays in local
    /// accumulators (vector registers) while k runs over a `tk` slice; the
    /// j loop is blocked by `tj` so that the slice of B stays in cache.
    /// `wide` compiles with `-mprefer-vector-width=512` (AVX-512 machines).
    Register { mr: usize, nr: usize, tk: usize, tj: usize, wide: bool },
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
    fn new(kind: Kind) -> Self {
        let (name, expect) = match kind {
            Kind::Naive => ("naive".to_owned(), Expect::Ok),
            Kind::Tiled { order, ti, tj, tk, unroll } => {
                (format!("tiled_{}_{ti}x{tj}x{tk}_u{unroll}", order.name()), Expect::Ok)
            }
            Kind::PackedBt { ti, tj, lanes } => {
                (format!("packed_bt_{ti}x{tj}_l{lanes}"), Expect::Ok)
            }
            Kind::Register { mr, nr, tk, tj, wide } => {
                let w = if wide { "_w512" } else { "" };
                (format!("reg_{mr}x{nr}_k{tk}_j{tj}{w}"), Expect::Ok)
            }
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
            Kind::Tiled { order, ti, tj, tk, unroll } => json!({
                "kind": "tiled", "order": order.name(),
                "tile_i": ti, "tile_j": tj, "tile_k": tk, "unroll": unroll,
            }),
            Kind::PackedBt { ti, tj, lanes } => json!({
                "kind": "packed_bt", "order": "ijk",
                "tile_i": ti, "tile_j": tj, "lanes": lanes,
            }),
            Kind::Register { mr, nr, tk, tj, wide } => json!({
                "kind": "register", "order": "jkij",
                "tile_i": mr, "tile_j": nr, "tile_k": tk, "block_j": tj,
                "vector_width": if wide { json!(512) } else { Value::Null },
            }),
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
            Kind::Tiled { order, ti, tj, tk, unroll } => {
                format!("tiled {} {ti}x{tj}x{tk} unroll {unroll}", order.name())
            }
            Kind::PackedBt { ti, tj, lanes } => format!("packed B^T {ti}x{tj} lanes {lanes}"),
            Kind::Register { mr, nr, tk, tj, wide } => {
                let w = if wide { " vw512" } else { "" };
                format!("register {mr}x{nr} k{tk} j{tj}{w}")
            }
            Kind::BrokenCompile => "broken: syntax error".to_owned(),
            Kind::BrokenCrash => "broken: null write".to_owned(),
            Kind::BrokenWrong => "broken: skips a k-tile".to_owned(),
        }
    }

    /// Compiler flags of this candidate only (after the builder's own).
    pub(crate) fn extra_flags(&self) -> Vec<String> {
        match self.kind {
            Kind::Register { wide: true, .. } => vec!["-mprefer-vector-width=512".to_owned()],
            _ => Vec::new(),
        }
    }

    /// The full C translation unit.
    pub(crate) fn source(&self, size: Size) -> String {
        let mut s = String::new();
        let Size { m, n, k } = size;
        let _ = write!(
            s,
            "/* tune_matmul candidate {name}: {desc} */\n{PRELUDE}\n\
             #define M {m}\n#define N {n}\n#define K {k}\n\n",
            name = self.name,
            desc = self.describe(),
        );
        s.push_str(
            "static void matmul(const float* restrict A, const float* restrict B, \
             float* restrict C) {\n",
        );
        s.push_str(&self.body(size));
        s.push_str("}\n\n");
        s.push_str(ENTRY);
        s
    }

    fn body(&self, size: Size) -> String {
        match self.kind {
            Kind::Naive => NAIVE.to_owned(),
            Kind::Tiled { order, ti, tj, tk, unroll } => tiled(order, ti, tj, tk, unroll, false),
            Kind::PackedBt { ti, tj, lanes } => packed_bt(ti, tj, lanes),
            Kind::Register { mr, nr, tk, tj, .. } => register(mr, nr, tk, tj),
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
                tiled(Order::Ikj, 16, 64, tk, 4, true)
            }
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
  matmul((const float*)base(&args[0]), (const float*)base(&args[1]), (float*)base(&args[2]));
  return 0;
}
"#;

const NAIVE: &str = "  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float acc = 0.0f;
      for (int k = 0; k < K; ++k) acc += A[i * K + k] * B[k * N + j];
      C[i * N + j] = acc;
    }
";

/// `stmt(x)` for x in `lo..hi` unrolled by `unroll`, plus a remainder loop.
fn unrolled(
    out: &mut String,
    indent: &str,
    var: &str,
    lo: &str,
    hi: &str,
    unroll: usize,
    stmt: &dyn Fn(&str) -> String,
) {
    if unroll <= 1 {
        let _ =
            writeln!(out, "{indent}for (int {var} = {lo}; {var} < {hi}; ++{var}) {}", stmt(var));
        return;
    }
    let _ = writeln!(out, "{indent}int {var} = {lo};");
    let _ = writeln!(out, "{indent}for (; {var} + {unroll} <= {hi}; {var} += {unroll}) {{");
    for u in 0..unroll {
        let _ = writeln!(out, "{indent}  {}", stmt(&format!("{var} + {u}")));
    }
    let _ = writeln!(out, "{indent}}}");
    let _ = writeln!(out, "{indent}for (; {var} < {hi}; ++{var}) {}", stmt(var));
}

fn tiled(
    order: Order,
    ti: usize,
    tj: usize,
    tk: usize,
    unroll: usize,
    skip_last_k_tile: bool,
) -> String {
    let mut s = String::new();
    s.push_str("  memset(C, 0, sizeof(float) * M * N);\n");
    let _ = writeln!(s, "  for (int i0 = 0; i0 < M; i0 += {ti}) {{");
    let _ = writeln!(s, "    const int i1 = MIN(i0 + {ti}, M);");
    let _ = writeln!(s, "    for (int j0 = 0; j0 < N; j0 += {tj}) {{");
    let _ = writeln!(s, "      const int j1 = MIN(j0 + {tj}, N);");
    if skip_last_k_tile {
        // The bug on purpose: the last k-tile is never accumulated.
        let _ = writeln!(s, "      for (int k0 = 0; k0 + {tk} < K; k0 += {tk}) {{");
    } else {
        let _ = writeln!(s, "      for (int k0 = 0; k0 < K; k0 += {tk}) {{");
    }
    let _ = writeln!(s, "        const int k1 = MIN(k0 + {tk}, K);");
    let ind = "        ";
    match order {
        Order::Ijk => {
            let _ = writeln!(s, "{ind}for (int i = i0; i < i1; ++i)");
            let _ = writeln!(s, "{ind}  for (int j = j0; j < j1; ++j) {{");
            let _ = writeln!(s, "{ind}    float acc = C[i * N + j];");
            unrolled(&mut s, &format!("{ind}    "), "k", "k0", "k1", unroll, &|k| {
                format!("acc += A[i * K + {k}] * B[({k}) * N + j];")
            });
            let _ = writeln!(s, "{ind}    C[i * N + j] = acc;");
            let _ = writeln!(s, "{ind}  }}");
        }
        Order::Ikj | Order::Kij => {
            let (outer, inner) = if order == Order::Ikj { ("i", "k") } else { ("k", "i") };
            let range = |v: &str| if v == "i" { ("i0", "i1") } else { ("k0", "k1") };
            let (olo, ohi) = range(outer);
            let (ilo, ihi) = range(inner);
            let _ = writeln!(s, "{ind}for (int {outer} = {olo}; {outer} < {ohi}; ++{outer})");
            let _ = writeln!(s, "{ind}  for (int {inner} = {ilo}; {inner} < {ihi}; ++{inner}) {{");
            let _ = writeln!(s, "{ind}    const float a = A[i * K + k];");
            let _ = writeln!(s, "{ind}    const float* restrict b = B + k * N;");
            let _ = writeln!(s, "{ind}    float* restrict c = C + i * N;");
            unrolled(&mut s, &format!("{ind}    "), "j", "j0", "j1", unroll, &|j| {
                format!("c[{j}] += a * b[{j}];")
            });
            let _ = writeln!(s, "{ind}  }}");
        }
    }
    s.push_str("      }\n    }\n  }\n");
    s
}

fn packed_bt(ti: usize, tj: usize, lanes: usize) -> String {
    let mut s = String::new();
    // B^T lives in a static buffer: kernels run one at a time per process.
    s.push_str("  static float Bt[N * K];\n");
    s.push_str("  for (int k = 0; k < K; ++k)\n    for (int j = 0; j < N; ++j) Bt[j * K + k] = B[k * N + j];\n");
    let _ = writeln!(s, "  for (int i0 = 0; i0 < M; i0 += {ti}) {{");
    let _ = writeln!(s, "    const int i1 = MIN(i0 + {ti}, M);");
    let _ = writeln!(s, "    for (int j0 = 0; j0 < N; j0 += {tj}) {{");
    let _ = writeln!(s, "      const int j1 = MIN(j0 + {tj}, N);");
    s.push_str("      for (int i = i0; i < i1; ++i) {\n");
    s.push_str("        const float* restrict a = A + i * K;\n");
    s.push_str("        for (int j = j0; j < j1; ++j) {\n");
    s.push_str("          const float* restrict b = Bt + j * K;\n");
    let _ = writeln!(s, "          float part[{lanes}] = {{0}};");
    s.push_str("          int k = 0;\n");
    let _ = writeln!(s, "          for (; k + {lanes} <= K; k += {lanes})");
    let _ = writeln!(
        s,
        "            for (int l = 0; l < {lanes}; ++l) part[l] += a[k + l] * b[k + l];"
    );
    s.push_str("          float acc = 0.0f;\n");
    s.push_str("          for (; k < K; ++k) acc += a[k] * b[k];\n");
    let _ = writeln!(s, "          for (int l = 0; l < {lanes}; ++l) acc += part[l];");
    s.push_str("          C[i * N + j] = acc;\n");
    s.push_str("        }\n      }\n    }\n  }\n");
    s
}

fn register(mr: usize, nr: usize, tk: usize, tj: usize) -> String {
    format!(
        "  for (int j0 = 0; j0 < N; j0 += {tj}) {{
    const int j1 = MIN(j0 + {tj}, N);
    for (int k0 = 0; k0 < K; k0 += {tk}) {{
      const int k1 = MIN(k0 + {tk}, K);
      for (int i = 0; i < M; i += {mr}) {{
        for (int j = j0; j < j1; j += {nr}) {{
          if (i + {mr} <= M && j + {nr} <= j1) {{
            /* The register block: fully unrolled, kept in vector registers. */
            float acc[{mr}][{nr}];
            for (int r = 0; r < {mr}; ++r)
              for (int c = 0; c < {nr}; ++c) acc[r][c] = k0 == 0 ? 0.0f : C[(i + r) * N + j + c];
            for (int k = k0; k < k1; ++k) {{
              const float* restrict b = B + k * N + j;
              for (int r = 0; r < {mr}; ++r) {{
                const float a = A[(i + r) * K + k];
                for (int c = 0; c < {nr}; ++c) acc[r][c] += a * b[c];
              }}
            }}
            for (int r = 0; r < {mr}; ++r)
              for (int c = 0; c < {nr}; ++c) C[(i + r) * N + j + c] = acc[r][c];
          }} else {{
            /* A partial block at the bottom or right edge. */
            const int ie = MIN(i + {mr}, M), je = MIN(j + {nr}, j1);
            for (int ii = i; ii < ie; ++ii)
              for (int jj = j; jj < je; ++jj) {{
                float acc = k0 == 0 ? 0.0f : C[ii * N + jj];
                for (int k = k0; k < k1; ++k) acc += A[ii * K + k] * B[k * N + jj];
                C[ii * N + jj] = acc;
              }}
          }}
        }}
      }}
    }}
  }}
"
    )
}

/// The candidates to measure, in measurement order: the naive reference and
/// the three broken ones first, then `trials - 4` tuned ones (at least one)
/// drawn at random (with `seed`) from the search space.
pub(crate) fn generate(size: Size, trials: usize, seed: u64) -> Vec<Candidate> {
    let mut out: Vec<Candidate> =
        [Kind::Naive, Kind::BrokenCompile, Kind::BrokenCrash, Kind::BrokenWrong]
            .into_iter()
            .map(Candidate::new)
            .collect();
    let mut space = search_space(size);
    space.shuffle(&mut StdRng::seed_from_u64(seed));
    let tuned = trials.saturating_sub(out.len()).max(1);
    out.extend(space.into_iter().take(tuned).map(Candidate::new));
    out
}

/// Tile sizes from `options` that fit `dim` (at least the smallest option).
fn tiles(options: &[usize], dim: usize) -> Vec<usize> {
    let fit: Vec<usize> = options.iter().copied().filter(|&t| t <= dim).collect();
    if fit.is_empty() { vec![options[0]] } else { fit }
}

/// Every tuned configuration for `size`.
pub(crate) fn search_space(size: Size) -> Vec<Kind> {
    let mut space = Vec::new();
    for order in [Order::Ijk, Order::Ikj, Order::Kij] {
        for &ti in &tiles(&[8, 16, 32, 64], size.m) {
            for &tj in &tiles(&[16, 32, 64, 128, 256], size.n) {
                for &tk in &tiles(&[8, 16, 32, 64], size.k) {
                    for unroll in [1, 4, 8] {
                        space.push(Kind::Tiled { order, ti, tj, tk, unroll });
                    }
                }
            }
        }
    }
    for mr in [2, 4, 6, 8] {
        for nr in [16, 32, 64] {
            for &tk in &tiles(&[64, 128, 256], size.k) {
                for &tj in &tiles(&[64, 128, 256], size.n) {
                    for wide in [false, true] {
                        space.push(Kind::Register { mr, nr, tk, tj, wide });
                    }
                }
            }
        }
    }
    for &ti in &tiles(&[4, 16, 64], size.m) {
        for &tj in &tiles(&[16, 64, 256], size.n) {
            for lanes in [4, 8, 16] {
                space.push(Kind::PackedBt { ti, tj, lanes });
            }
        }
    }
    space
}
