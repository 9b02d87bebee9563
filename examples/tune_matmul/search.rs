//! The search: evolutionary proposals (mutation and crossover of the best
//! measured so far) ranked by the cost model, plus random exploration.
//!
//! Deterministic: the same seed and the same measurements fed back with
//! [`Search::observe`] give the same proposals. Measurements are noisy, so
//! the search only looks at them on a coarse grid ([`GRID`]: speeds within
//! ~2% of each other are equal, ties go to the earlier measured), parents
//! are used as a set (in a fixed order, not in rank order), and the model's
//! predictions are on the same grid: two runs then propose the same
//! candidates unless a measurement crosses a grid line.

use std::collections::HashSet;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::{Rng, RngCore};

use crate::model::{Ridge, features};
use crate::space::{Gemm, Isa};

/// Share of each batch drawn at random (after the first round).
const EXPLORE: f64 = 0.25;

/// Candidates scored by the model for each one proposed.
const POOL_FACTOR: usize = 24;

/// Parents: the best this many measured so far.
const ELITE: usize = 8;

/// The grid, in natural-log units, speeds are compared on (2%).
const GRID: f64 = 0.02;

/// `gflops` on the [`GRID`], as a log.
fn on_grid(gflops: f64) -> f64 {
    (gflops.ln() / GRID).round() * GRID
}

/// Ridge penalty.
const LAMBDA: f64 = 0.05;

#[derive(Debug)]
pub(crate) struct Search {
    rng: StdRng,
    isas: Vec<Isa>,
    dims: (usize, usize, usize),
    /// Every configuration proposed so far.
    seen: HashSet<Gemm>,
    /// `(configuration, GFLOP/s)` of what was measured (0 for failures).
    measured: Vec<(Gemm, f64)>,
    model: Option<Ridge>,
}

impl Search {
    /// A search among the micro-kernels of `isas` (at least one) for
    /// `m x n x k`.
    pub(crate) fn new(seed: u64, isas: &[Isa], m: usize, n: usize, k: usize) -> Self {
        assert!(!isas.is_empty(), "at least one ISA");
        Search {
            rng: StdRng::seed_from_u64(seed ^ 0x7475_6e65_725f_6d6d),
            isas: isas.to_vec(),
            dims: (m, n, k),
            seen: HashSet::new(),
            measured: Vec::new(),
            model: None,
        }
    }

    /// Feeds back measured GFLOP/s (`None`: the candidate failed) and refits
    /// the model.
    pub(crate) fn observe(&mut self, results: impl IntoIterator<Item = (Gemm, Option<f64>)>) {
        for (g, gflops) in results {
            // Kept on the grid (as GFLOP/s): all the search ever looks at.
            let y = gflops.filter(|y| *y > 0.0 && y.is_finite()).map_or(0.0, |y| on_grid(y).exp());
            self.measured.push((g, y));
        }
        let (m, n, k) = self.dims;
        let ok: Vec<&(Gemm, f64)> = self.measured.iter().filter(|(_, y)| *y > 0.0).collect();
        let xs: Vec<Vec<f64>> = ok.iter().map(|(g, _)| features(g, m, n, k)).collect();
        let ys: Vec<f64> = ok.iter().map(|(_, y)| y.ln()).collect();
        self.model = if xs.len() >= 8 { Ridge::fit(&xs, &ys, LAMBDA) } else { None };
    }

    /// The model's prediction of GFLOP/s, if it is fitted.
    pub(crate) fn predict(&self, g: &Gemm) -> Option<f64> {
        let (m, n, k) = self.dims;
        self.model.as_ref().map(|r| r.predict(&features(g, m, n, k)).exp())
    }

    /// The best `count` measured so far, fastest first (ties by order).
    pub(crate) fn best(&self, count: usize) -> Vec<Gemm> {
        let mut ranked: Vec<(usize, &(Gemm, f64))> =
            self.measured.iter().enumerate().filter(|(_, (_, y))| *y > 0.0).collect();
        ranked.sort_by(|a, b| b.1.1.total_cmp(&a.1.1).then(a.0.cmp(&b.0)));
        ranked.into_iter().take(count).map(|(_, (g, _))| *g).collect()
    }

    /// The next `count` new configurations: all random while nothing is
    /// measured (or the model is not fitted yet), else mostly the children
    /// of the best with the highest predicted speed, some random.
    pub(crate) fn propose(&mut self, count: usize) -> Vec<Gemm> {
        // As a set: which of them is faster does not steer the draws.
        let mut parents = self.best(ELITE);
        parents.sort_by_cached_key(Gemm::name);
        let (_explore, exploit) = match (&self.model, parents.len()) {
            (Some(_), p) if p >= 2 => {
                let explore = ((count as f64) * EXPLORE).round() as usize;
                (explore, count - explore)
            }
            _ => (count, 0),
        };
        let mut out = Vec::with_capacity(count);
        if exploit > 0 {
            let mut pool = Vec::new();
            let mut pool_seen = HashSet::new();
            for _ in 0..exploit * POOL_FACTOR {
                let a = parents[self.rng.random_range(0..parents.len())];
                let child = if self.rng.random_bool(0.4) {
                    let b = parents[self.rng.random_range(0..parents.len())];
                    a.crossover(&b, &mut self.rng).mutate_maybe(&mut self.rng, &self.isas)
                } else {
                    a.mutate(&mut self.rng, &self.isas)
                };
                if !self.seen.contains(&child) && pool_seen.insert(child) {
                    pool.push(child);
                }
            }
            let mut scored: Vec<(f64, usize, Gemm)> = pool
                .into_iter()
                .enumerate()
                .map(|(i, g)| (self.predict(&g).map_or(f64::NEG_INFINITY, on_grid), i, g))
                .collect();
            scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            for (_, _, g) in scored.into_iter().take(exploit) {
                self.seen.insert(g);
                out.push(g);
            }
        }
        let mut tries = 0;
        while out.len() < count && tries < count * 1000 {
            tries += 1;
            let g = Gemm::random(&mut self.rng, &self.isas);
            if self.seen.insert(g) {
                out.push(g);
            }
        }
        out
    }
}

impl Gemm {
    /// `mutate` half of the time, else unchanged.
    fn mutate_maybe(self, rng: &mut impl RngCore, isas: &[Isa]) -> Gemm {
        if rng.random_bool(0.5) { self.mutate(rng, isas) } else { self }
    }
}
