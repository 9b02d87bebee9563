//! The parameterized search space of `tune_matmul`: a blocked, optionally
//! packed GEMM with an `MR x NR` register-blocked micro-kernel (explicit
//! AVX-512 or AVX2/FMA intrinsics, or portable GCC vector C), and the
//! random sampling, mutation and crossover the search uses.
//!
//! The space is a product of the option lists below (about 10^6 points),
//! restricted to the micro-kernels that fit the ISA's vector registers.

use rand::Rng;
use serde_json::{Value, json};

/// The instruction set of the micro-kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Isa {
    /// `__m512` intrinsics (AVX-512F): 16 floats a vector, 32 registers.
    Avx512,
    /// `__m256` intrinsics (AVX2 + FMA): 8 floats a vector, 16 registers.
    Avx2,
    /// GCC vector extensions of 8 floats: any target the compiler has.
    Portable,
}

impl Isa {
    pub(crate) const ALL: [Isa; 3] = [Isa::Avx512, Isa::Avx2, Isa::Portable];

    /// Floats per vector.
    pub(crate) fn lanes(self) -> usize {
        match self {
            Isa::Avx512 => 16,
            Isa::Avx2 | Isa::Portable => 8,
        }
    }

    /// Vector registers the micro-kernel may use.
    pub(crate) fn registers(self) -> usize {
        match self {
            Isa::Avx512 => 32,
            Isa::Avx2 | Isa::Portable => 16,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        }
    }

    /// Compiler flags that enable the intrinsics (on top of the builder's).
    pub(crate) fn flags(self) -> Vec<String> {
        let flags: &[&str] = match self {
            Isa::Avx512 => &["-mavx512f", "-mavx2", "-mfma"],
            Isa::Avx2 => &["-mavx2", "-mfma"],
            Isa::Portable => &[],
        };
        flags.iter().map(|f| (*f).to_owned()).collect()
    }
}

/// The order of the three cache-block loops: `j` over N in NC steps, `p`
/// over K in KC steps, `i` over M in MC steps (outermost first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Order {
    Jpi,
    Jip,
    Pji,
    Pij,
    Ipj,
    Ijp,
}

impl Order {
    pub(crate) const ALL: [Order; 6] =
        [Order::Jpi, Order::Jip, Order::Pji, Order::Pij, Order::Ipj, Order::Ijp];

    /// The loops outermost first, as `'j'`, `'p'`, `'i'`.
    pub(crate) fn loops(self) -> [char; 3] {
        let name = self.name().as_bytes();
        [name[0] as char, name[1] as char, name[2] as char]
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Order::Jpi => "jpi",
            Order::Jip => "jip",
            Order::Pji => "pji",
            Order::Pij => "pij",
            Order::Ipj => "ipj",
            Order::Ijp => "ijp",
        }
    }
}

/// One point of the space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Gemm {
    pub(crate) isa: Isa,
    /// Rows of the register block.
    pub(crate) mr: usize,
    /// Vectors per row of the register block (NR = `nrv * lanes`).
    pub(crate) nrv: usize,
    /// Cache blocks: rows of A, depth, columns of B.
    pub(crate) mc: usize,
    pub(crate) kc: usize,
    pub(crate) nc: usize,
    /// Copy each MC x KC block of A into MR-row panels.
    pub(crate) pack_a: bool,
    /// Copy each KC x NC block of B into NR-column panels.
    pub(crate) pack_b: bool,
    /// Unrolling of the micro-kernel's k loop.
    pub(crate) unroll: usize,
    pub(crate) order: Order,
    /// Inside a block: the NR-column loop outside the MR-row loop.
    pub(crate) j_outer: bool,
    /// POSIX threads, each on a contiguous range of rows (1: none).
    pub(crate) threads: usize,
}

pub(crate) const MR: &[usize] = &[1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16];
pub(crate) const NRV: &[usize] = &[1, 2, 3, 4];
pub(crate) const MC: &[usize] = &[16, 32, 48, 64, 96, 128, 192, 256, 384];
pub(crate) const KC: &[usize] = &[32, 64, 128, 192, 256, 384, 512];
pub(crate) const NC: &[usize] = &[64, 128, 256, 512, 1024, 2048];
pub(crate) const UNROLL: &[usize] = &[1, 2, 4, 8];
pub(crate) const THREADS: &[usize] = &[1, 2, 4];

/// The parameters mutation and crossover act on, one at a time.
const PARAMS: usize = 11;

impl Gemm {
    /// NR: columns of the register block.
    pub(crate) fn nr(&self) -> usize {
        self.nrv * self.isa.lanes()
    }

    /// Accumulators, the vectors of B and the broadcast of A fit the registers.
    pub(crate) fn fits(&self) -> bool {
        // One register for the broadcast of A.
        self.mr * self.nrv + self.nrv < self.isa.registers()
    }

    /// Every parameter is one of its options and the kernel fits.
    pub(crate) fn valid(&self) -> bool {
        MR.contains(&self.mr)
            && NRV.contains(&self.nrv)
            && MC.contains(&self.mc)
            && KC.contains(&self.kc)
            && NC.contains(&self.nc)
            && UNROLL.contains(&self.unroll)
            && THREADS.contains(&self.threads)
            && self.fits()
    }

    /// The largest MR option not above the current one that fits (MR 1
    /// with one vector always fits).
    fn repair(mut self) -> Self {
        while !self.fits() {
            if let Some(&smaller) = MR.iter().rev().find(|&&m| m < self.mr) {
                self.mr = smaller;
            } else {
                self.nrv = 1;
            }
        }
        debug_assert!(self.valid(), "{self:?} is in the space");
        self
    }

    /// A uniformly random point among `isas` (single-threaded).
    pub(crate) fn random(rng: &mut impl Rng, isas: &[Isa]) -> Self {
        let pick =
            |rng: &mut dyn rand::RngCore, opts: &[usize]| opts[rng.random_range(0..opts.len())];
        Gemm {
            isa: isas[rng.random_range(0..isas.len())],
            mr: pick(rng, MR),
            nrv: pick(rng, NRV),
            mc: pick(rng, MC),
            kc: pick(rng, KC),
            nc: pick(rng, NC),
            pack_a: rng.random(),
            pack_b: rng.random(),
            unroll: pick(rng, UNROLL),
            order: Order::ALL[rng.random_range(0..Order::ALL.len())],
            j_outer: rng.random(),
            threads: 1,
        }
        .repair()
    }

    /// Changes one or two parameters (a numeric one to a neighbouring
    /// option, usually); stays in the space, single-threaded stays so.
    pub(crate) fn mutate(&self, rng: &mut impl Rng, isas: &[Isa]) -> Self {
        let mut g = *self;
        let changes = if rng.random_bool(0.3) { 2 } else { 1 };
        for _ in 0..changes {
            let step = |rng: &mut dyn rand::RngCore, opts: &[usize], v: usize| {
                let i = opts.iter().position(|&o| o == v).unwrap_or(0);
                let j = match rng.random_range(0..4) {
                    0 => rng.random_range(0..opts.len()),
                    1 | 2 if i + 1 < opts.len() => i + 1,
                    _ => i.saturating_sub(1),
                };
                opts[j.min(opts.len() - 1)]
            };
            match rng.random_range(0..PARAMS - 1) {
                0 => g.isa = isas[rng.random_range(0..isas.len())],
                1 => g.mr = step(rng, MR, g.mr),
                2 => g.nrv = step(rng, NRV, g.nrv),
                3 => g.mc = step(rng, MC, g.mc),
                4 => g.kc = step(rng, KC, g.kc),
                5 => g.nc = step(rng, NC, g.nc),
                6 => g.pack_a = !g.pack_a,
                7 => g.pack_b = !g.pack_b,
                8 => g.unroll = step(rng, UNROLL, g.unroll),
                _ => {
                    if rng.random() {
                        g.order = Order::ALL[rng.random_range(0..Order::ALL.len())];
                    } else {
                        g.j_outer = !g.j_outer;
                    }
                }
            }
        }
        g.repair()
    }

    /// Each parameter from `self` or `other` at random (uniform crossover).
    pub(crate) fn crossover(&self, other: &Gemm, rng: &mut impl Rng) -> Self {
        let mut g = *self;
        let mut take = || rng.random_bool(0.5);
        if take() {
            g.isa = other.isa;
        }
        if take() {
            (g.mr, g.nrv) = (other.mr, other.nrv);
        }
        if take() {
            g.mc = other.mc;
        }
        if take() {
            g.kc = other.kc;
        }
        if take() {
            g.nc = other.nc;
        }
        if take() {
            g.pack_a = other.pack_a;
        }
        if take() {
            g.pack_b = other.pack_b;
        }
        if take() {
            g.unroll = other.unroll;
        }
        if take() {
            (g.order, g.j_outer) = (other.order, other.j_outer);
        }
        g.repair()
    }

    /// A unique, file-name-safe name.
    pub(crate) fn name(&self) -> String {
        let packs = match (self.pack_a, self.pack_b) {
            (true, true) => "pab",
            (true, false) => "pa",
            (false, true) => "pb",
            (false, false) => "p0",
        };
        format!(
            "{}_{}x{}_m{}k{}n{}_{}{}_{}_u{}_t{}",
            self.isa.name(),
            self.mr,
            self.nr(),
            self.mc,
            self.kc,
            self.nc,
            self.order.name(),
            if self.j_outer { "J" } else { "I" },
            packs,
            self.unroll,
            self.threads
        )
    }

    /// A short human description.
    pub(crate) fn describe(&self) -> String {
        let mut packs = Vec::new();
        if self.pack_a {
            packs.push("A");
        }
        if self.pack_b {
            packs.push("B");
        }
        let packs = if packs.is_empty() { "none".to_owned() } else { packs.join("+") };
        let threads = if self.threads > 1 { format!(" {}T", self.threads) } else { String::new() };
        format!(
            "{} {}x{} mc{} kc{} nc{} {} pack {} u{}{threads}",
            self.isa.name(),
            self.mr,
            self.nr(),
            self.mc,
            self.kc,
            self.nc,
            self.order.name(),
            packs,
            self.unroll
        )
    }

    /// The parameters as JSON fields (for the tuning log).
    pub(crate) fn json(&self) -> Value {
        json!({
            "kind": "gemm", "isa": self.isa.name(), "mr": self.mr, "nr": self.nr(),
            "mc": self.mc, "kc": self.kc, "nc": self.nc, "pack_a": self.pack_a,
            "pack_b": self.pack_b, "unroll": self.unroll, "order": self.order.name(),
            "inner": if self.j_outer { "jr-ir" } else { "ir-jr" }, "threads": self.threads,
        })
    }
}
