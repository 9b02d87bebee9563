//! The C source of a [`Gemm`] configuration: cache-block loops in the
//! configured order, optional packing of A and B blocks into panels, and
//! a fully unrolled `MR x NR` micro-kernel whose accumulators are named
//! vector variables (so that they live in registers).
//!
//! Partial register blocks at the edges go through the same micro-kernel
//! on zero-padded copies, into a scratch tile. Buffers are static (one set
//! per thread): a kernel runs one call at a time per process.

use std::fmt::Write as _;

use crate::candidates::Size;
use crate::space::{Gemm, Isa};

/// The C source of the `matmul` function and what it needs, for `size`.
pub(crate) fn body_and_defs(g: &Gemm, size: Size) -> (String, String) {
    let lanes = g.isa.lanes();
    let (mr, nr) = (g.mr, g.nr());
    // Blocks in whole register blocks, no larger than the problem needs.
    let mc = (g.mc / mr).max(1) * mr;
    let nc = (g.nc / nr).max(1) * nr;
    let mut d = String::new();
    let _ = writeln!(d, "#include <stdint.h>");
    match g.isa {
        Isa::Avx512 => d.push_str(
            "#include <immintrin.h>\ntypedef __m512 vf;\n\
             #define VLOAD(p) _mm512_loadu_ps(p)\n#define VSTORE(p, v) _mm512_storeu_ps(p, v)\n\
             #define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)\n#define VSET1(x) _mm512_set1_ps(x)\n\
             #define VZERO() _mm512_setzero_ps()\n#define VADD(a, b) _mm512_add_ps(a, b)\n",
        ),
        Isa::Avx2 => d.push_str(
            "#include <immintrin.h>\ntypedef __m256 vf;\n\
             #define VLOAD(p) _mm256_loadu_ps(p)\n#define VSTORE(p, v) _mm256_storeu_ps(p, v)\n\
             #define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)\n#define VSET1(x) _mm256_set1_ps(x)\n\
             #define VZERO() _mm256_setzero_ps()\n#define VADD(a, b) _mm256_add_ps(a, b)\n",
        ),
        Isa::Portable => d.push_str(
            "typedef float vf __attribute__((vector_size(32)));\n\
             static inline vf VLOAD(const float* p) { vf v; memcpy(&v, p, sizeof v); return v; }\n\
             static inline void VSTORE(float* p, vf v) { memcpy(p, &v, sizeof v); }\n\
             #define VFMA(a, b, c) ((a) * (b) + (c))\n#define VSET1(x) ((vf){0} + (x))\n\
             #define VZERO() ((vf){0})\n#define VADD(a, b) ((a) + (b))\n",
        ),
    }
    let _ = writeln!(
        d,
        "#define MR {mr}\n#define NR {nr}\n#define LANES {lanes}\n#define MC {mc}\n\
         #define KC {kc}\n#define NC {nc}\n#define NT {nt}\n\
         #define MCB MIN(MC, (M + MR - 1) / MR * MR)\n#define KCB MIN(KC, K)\n\
         #define NCB MIN(NC, (N + NR - 1) / NR * NR)\n",
        kc = g.kc,
        nt = g.threads,
    );
    micro_kernel(&mut d, g);
    d.push_str(HELPERS);
    rows_fn(&mut d, g);
    if g.threads > 1 {
        d.push_str(THREADS);
    }
    let body = if g.threads > 1 {
        "  gemm_threads(A, B, C);\n".to_owned()
    } else {
        "  gemm_rows(A, B, C, 0, M, 0);\n".to_owned()
    };
    let _ = size;
    (d, body)
}

/// `micro(kc, a, ars, acs, b, bks, c, ldc, first)`: `C[MR][NR] (+)= A * B`
/// over `kc`, `a[r * ars + p * acs]`, `b[p * bks + col]`; `first` stores
/// instead of accumulating.
fn micro_kernel(d: &mut String, g: &Gemm) {
    let (mr, nrv) = (g.mr, g.nrv);
    d.push_str(
        "static inline __attribute__((always_inline)) void micro(int kc, const float* restrict a, \
         long ars, long acs, const float* restrict b, long bks, float* restrict c, long ldc, \
         int first) {\n",
    );
    let acc = |r: usize, v: usize| format!("c{r}_{v}");
    for r in 0..mr {
        let names: Vec<String> = (0..nrv).map(|v| acc(r, v)).collect();
        let _ = writeln!(d, "  vf {};", names.join(", "));
    }
    d.push_str("  if (first) {\n");
    for r in 0..mr {
        for v in 0..nrv {
            let _ = writeln!(d, "    {} = VZERO();", acc(r, v));
        }
    }
    d.push_str("  } else {\n");
    for r in 0..mr {
        for v in 0..nrv {
            let _ =
                writeln!(d, "    {} = VLOAD(c + {r} * ldc + {});", acc(r, v), v * g.isa.lanes());
        }
    }
    d.push_str("  }\n");
    let step = |d: &mut String, p: &str| {
        let _ = writeln!(d, "    {{\n      const float* restrict bp = b + ({p}) * bks;");
        for v in 0..nrv {
            let _ = writeln!(d, "      const vf b{v} = VLOAD(bp + {});", v * g.isa.lanes());
        }
        let _ = writeln!(d, "      const float* restrict ap = a + ({p}) * acs;");
        for r in 0..mr {
            let _ = writeln!(d, "      {{ const vf av = VSET1(ap[{r} * ars]);");
            for v in 0..nrv {
                let _ = writeln!(d, "        {0} = VFMA(av, b{v}, {0});", acc(r, v));
            }
            d.push_str("      }\n");
        }
        d.push_str("    }\n");
    };
    let u = g.unroll;
    d.push_str("  int p = 0;\n");
    let _ = writeln!(d, "  for (; p + {u} <= kc; p += {u}) {{");
    for i in 0..u {
        step(d, &format!("p + {i}"));
    }
    d.push_str("  }\n  for (; p < kc; ++p) {\n");
    step(d, "p");
    d.push_str("  }\n");
    for r in 0..mr {
        for v in 0..nrv {
            let _ = writeln!(d, "  VSTORE(c + {r} * ldc + {}, {});", v * g.isa.lanes(), acc(r, v));
        }
    }
    d.push_str("}\n\n");
}

/// Packing and the edge path (need `micro`).
const HELPERS: &str = r#"
/* An mb x kb block of A at (i0, p0) as MR-row panels: dst[panel][p][r], zero-padded. */
static void pack_a(const float* restrict A, int i0, int mb, int p0, int kb, float* restrict dst) {
  for (int ir = 0; ir < mb; ir += MR) {
    const int rows = MIN(MR, mb - ir);
    float* restrict panel = dst + (long)ir * kb;
    for (int p = 0; p < kb; ++p)
      for (int r = 0; r < MR; ++r)
        panel[p * MR + r] = r < rows ? A[(long)(i0 + ir + r) * K + p0 + p] : 0.0f;
  }
}

/* A kb x nb block of B at (p0, j0) as NR-column panels: dst[panel][p][c], zero-padded. */
static void pack_b(const float* restrict B, int p0, int kb, int j0, int nb, float* restrict dst) {
  for (int jr = 0; jr < nb; jr += NR) {
    const int cols = MIN(NR, nb - jr);
    float* restrict panel = dst + (long)jr * kb;
    for (int p = 0; p < kb; ++p) {
      const float* restrict src = B + (long)(p0 + p) * N + j0 + jr;
      if (cols == NR) {
        memcpy(panel + p * NR, src, sizeof(float) * NR);
      } else {
        for (int c = 0; c < NR; ++c) panel[p * NR + c] = c < cols ? src[c] : 0.0f;
      }
    }
  }
}

static float edge_a[NT][KCB * MR] __attribute__((aligned(64)));
static float edge_b[NT][KCB * NR] __attribute__((aligned(64)));
static float edge_c[NT][MR * NR] __attribute__((aligned(64)));

/* A partial register block of rows x cols at (i, j): padded copies, a scratch tile. */
static void edge(const float* restrict A, const float* restrict B, float* restrict C, int i, int j,
                 int p0, int kb, int rows, int cols, int first, int tid) {
  pack_a(A, i, rows, p0, kb, edge_a[tid]);
  pack_b(B, p0, kb, j, cols, edge_b[tid]);
  micro(kb, edge_a[tid], 1, MR, edge_b[tid], NR, edge_c[tid], NR, 1);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < cols; ++c) {
      const float t = edge_c[tid][r * NR + c];
      float* dst = C + (long)(i + r) * N + j + c;
      *dst = first ? t : *dst + t;
    }
}
"#;

/// `gemm_rows(A, B, C, m0, m1, tid)`: rows `m0..m1` of C, the block loops
/// in the configured order.
fn rows_fn(d: &mut String, g: &Gemm) {
    if g.pack_a {
        d.push_str("static float buf_a[NT][MCB * KCB] __attribute__((aligned(64)));\n");
    }
    if g.pack_b {
        d.push_str("static float buf_b[NT][KCB * NCB] __attribute__((aligned(64)));\n");
    }
    d.push_str(
        "static void gemm_rows(const float* restrict A, const float* restrict B, \
         float* restrict C, int m0, int m1, int tid) {\n",
    );
    let mut ind = String::from("  ");
    let mut open = Vec::new();
    for l in g.order.loops() {
        match l {
            'j' => {
                let _ = writeln!(d, "{ind}for (int j0 = 0; j0 < N; j0 += NC) {{");
                let _ = writeln!(d, "{ind}  const int nb = MIN(NC, N - j0);");
            }
            'p' => {
                let _ = writeln!(d, "{ind}for (int p0 = 0; p0 < K; p0 += KC) {{");
                let _ = writeln!(d, "{ind}  const int kb = MIN(KC, K - p0);");
            }
            _ => {
                let _ = writeln!(d, "{ind}for (int i0 = m0; i0 < m1; i0 += MC) {{");
                let _ = writeln!(d, "{ind}  const int mb = MIN(MC, m1 - i0);");
            }
        }
        ind.push_str("  ");
        open.push(l);
        let has = |c: char| open.contains(&c);
        if g.pack_b && l != 'i' && has('j') && has('p') {
            let _ = writeln!(d, "{ind}pack_b(B, p0, kb, j0, nb, buf_b[tid]);");
        }
        if g.pack_a && l != 'j' && has('i') && has('p') {
            let _ = writeln!(d, "{ind}pack_a(A, i0, mb, p0, kb, buf_a[tid]);");
        }
    }
    let _ = writeln!(d, "{ind}const int first = p0 == 0;");
    let (outer, inner) = if g.j_outer {
        ("for (int jr = 0; jr < nb; jr += NR)", "for (int ir = 0; ir < mb; ir += MR)")
    } else {
        ("for (int ir = 0; ir < mb; ir += MR)", "for (int jr = 0; jr < nb; jr += NR)")
    };
    let _ = writeln!(d, "{ind}{outer}\n{ind}  {inner} {{");
    let a = if g.pack_a {
        "buf_a[tid] + (long)ir * kb, 1, MR"
    } else {
        "A + (long)(i0 + ir) * K + p0, K, 1"
    };
    let b =
        if g.pack_b { "buf_b[tid] + (long)jr * kb, NR" } else { "B + (long)p0 * N + j0 + jr, N" };
    let _ = writeln!(
        d,
        "{ind}    if (ir + MR <= mb && jr + NR <= nb)\n\
         {ind}      micro(kb, {a}, {b}, C + (long)(i0 + ir) * N + j0 + jr, N, first);\n\
         {ind}    else\n\
         {ind}      edge(A, B, C, i0 + ir, j0 + jr, p0, kb, MIN(MR, mb - ir), MIN(NR, nb - jr), \
         first, tid);\n{ind}  }}"
    );
    for _ in 0..3 {
        ind.truncate(ind.len() - 2);
        let _ = writeln!(d, "{ind}}}");
    }
    d.push_str("}\n\n");
}

/// `gemm_threads(A, B, C)`: NT threads on contiguous row ranges (whole
/// register blocks), the calling thread taking the first. The other NT - 1
/// are created at the first call and kept, blocked on a barrier between
/// calls (creating them at every call costs about what the second core
/// gains at 256^3). If they cannot all be created, every call runs on the
/// calling thread alone (those created stay blocked until the process
/// exits).
const THREADS: &str = r#"
#include <pthread.h>
static pthread_barrier_t start_barrier, done_barrier;
static pthread_once_t pool_once = PTHREAD_ONCE_INIT;
static int pool_ok;
static const float* job_a;
static const float* job_b;
static float* job_c;
#define ROWS (((M + NT - 1) / NT + MR - 1) / MR * MR)
static void run_part(int t) {
  const int m0 = MIN(t * ROWS, M);
  gemm_rows(job_a, job_b, job_c, m0, MIN(m0 + ROWS, M), t);
}
static void* pool_thread(void* arg) {
  const int t = (int)(long)arg;
  for (;;) {
    pthread_barrier_wait(&start_barrier);
    run_part(t);
    pthread_barrier_wait(&done_barrier);
  }
  return 0;
}
static void start_pool(void) {
  if (pthread_barrier_init(&start_barrier, 0, NT) || pthread_barrier_init(&done_barrier, 0, NT))
    return;
  pthread_attr_t attr;
  if (pthread_attr_init(&attr)) return;
  pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  int started = 0;
  for (int t = 1; t < NT; ++t) {
    pthread_t th;
    if (pthread_create(&th, &attr, pool_thread, (void*)(long)t) == 0) ++started;
  }
  pthread_attr_destroy(&attr);
  pool_ok = started == NT - 1;
}
static void gemm_threads(const float* A, const float* B, float* C) {
  pthread_once(&pool_once, start_pool);
  if (!pool_ok) {
    gemm_rows(A, B, C, 0, M, 0);
    return;
  }
  job_a = A;
  job_b = B;
  job_c = C;
  pthread_barrier_wait(&start_barrier);
  run_part(0);
  pthread_barrier_wait(&done_barrier);
}
"#;
