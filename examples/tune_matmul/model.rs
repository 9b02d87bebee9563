//! The cheap cost model of the search: ridge regression of log GFLOP/s on
//! hand-made features of a configuration, refitted after every round.

use crate::space::{Gemm, Isa, Order};

/// Hand-made features of `g` for a problem of `m x n x k`.
pub(crate) fn features(g: &Gemm, m: usize, n: usize, k: usize) -> Vec<f64> {
    let (mr, nr) = (g.mr as f64, g.nr() as f64);
    let l2 = |x: usize| (x as f64).log2();
    // Work in full register blocks (the edges run through a padded copy).
    let rows = m.div_ceil(g.mr) * g.mr;
    let cols = n.div_ceil(g.nr()) * g.nr();
    let waste = (rows * cols) as f64 / (m * n) as f64 - 1.0;
    let kc = g.kc.min(k);
    let mut f = vec![
        1.0,
        mr,
        nr / 16.0,
        // Flops per loaded element of the micro-kernel.
        mr * nr / (mr + nr),
        (g.mr * g.nrv + g.nrv + 1) as f64 / g.isa.registers() as f64,
        l2(g.mc),
        l2(g.kc),
        l2(g.nc),
        // The B panel against L1 (48 KiB), the A block against L2 (1 MiB).
        l2(kc * g.nr() * 4) - l2(48 << 10),
        (l2(g.mc.min(m) * kc * 4) - l2(1 << 20)).max(0.0),
        (l2(g.mc.min(m) * kc * 4) - l2(1 << 20)).min(0.0),
        waste,
        f64::from(u8::from(g.pack_a)),
        f64::from(u8::from(g.pack_b)),
        l2(g.unroll),
        f64::from(u8::from(g.j_outer)),
        (l2(g.kc) - 8.0).powi(2),
        (l2(g.mc) - 6.5).powi(2),
    ];
    f.extend(Isa::ALL.iter().map(|&i| f64::from(u8::from(g.isa == i))));
    f.extend(Order::ALL.iter().map(|&o| f64::from(u8::from(g.order == o))));
    f
}

/// A linear model `y = w . x` fitted by ridge regression.
#[derive(Debug, Clone)]
pub(crate) struct Ridge {
    w: Vec<f64>,
}

impl Ridge {
    /// Fits `ys` on `xs` (rows of the same length) with penalty `lambda`
    /// on every weight; `None` without data or on a singular system.
    pub(crate) fn fit(xs: &[Vec<f64>], ys: &[f64], lambda: f64) -> Option<Ridge> {
        let d = xs.first()?.len();
        if xs.len() != ys.len() || xs.iter().any(|x| x.len() != d) {
            return None;
        }
        // Normal equations (X^T X + lambda I) w = X^T y, by Cholesky.
        let mut a = vec![vec![0.0; d]; d];
        let mut b = vec![0.0; d];
        for (x, &y) in xs.iter().zip(ys) {
            for i in 0..d {
                b[i] += x[i] * y;
                for j in 0..d {
                    a[i][j] += x[i] * x[j];
                }
            }
        }
        for (i, row) in a.iter_mut().enumerate() {
            row[i] += lambda;
        }
        let l = cholesky(&a)?;
        // L z = b, then L^T w = z.
        let mut z = vec![0.0; d];
        for i in 0..d {
            let s: f64 = (0..i).map(|j| l[i][j] * z[j]).sum();
            z[i] = (b[i] - s) / l[i][i];
        }
        let mut w = vec![0.0; d];
        for i in (0..d).rev() {
            let s: f64 = (i + 1..d).map(|j| l[j][i] * w[j]).sum();
            w[i] = (z[i] - s) / l[i][i];
        }
        w.iter().all(|v| v.is_finite()).then_some(Ridge { w })
    }

    pub(crate) fn predict(&self, x: &[f64]) -> f64 {
        self.w.iter().zip(x).map(|(w, x)| w * x).sum()
    }
}

/// The lower-triangular `L` with `L L^T = a`, if `a` is positive definite.
fn cholesky(a: &[Vec<f64>]) -> Option<Vec<Vec<f64>>> {
    let d = a.len();
    let mut l = vec![vec![0.0; d]; d];
    for i in 0..d {
        for j in 0..=i {
            let s: f64 = (0..j).map(|p| l[i][p] * l[j][p]).sum();
            if i == j {
                let v = a[i][i] - s;
                if v <= 0.0 || !v.is_finite() {
                    return None;
                }
                l[i][j] = v.sqrt();
            } else {
                l[i][j] = (a[i][j] - s) / l[j][j];
            }
        }
    }
    Some(l)
}
