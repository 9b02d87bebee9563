//! The random argument fill: a seeded PRNG, values in [0, 10), float16.

use super::*;

/// SplitMix64 (Steele, Lea and Flood; the constants of Vigna's reference
/// version): tiny, fast and fixed forever, so fills never change with a
/// dependency's version.
#[derive(Debug, Clone)]
pub(super) struct SplitMix64(pub(super) u64);

impl SplitMix64 {
    pub(super) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    #[cfg(test)]
    pub(super) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `[1, 10)`.
    #[cfg(test)]
    pub(super) fn float(&mut self) -> f64 {
        1.0 + 9.0 * self.unit()
    }

    /// Uniform in `[0, 10)` (the modulo bias is below 1e-18).
    #[cfg(test)]
    pub(super) fn small_int(&mut self) -> u8 {
        (self.next_u64() % 10) as u8
    }
}

/// SplitMix64's increment (the golden gamma).
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function of a state.
#[inline(always)]
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fills `bytes` (a whole number of elements) with random values of
/// `dtype`: the same bytes as drawing one value per element from `rng` in
/// order ([`fill_sequential`]), but computed from each element's index
/// (SplitMix64's state after `i + 1` draws is `state + (i + 1) * GAMMA`),
/// so the loop has no carried dependency and the compiler vectorizes it.
pub(super) fn fill(bytes: &mut [u8], dtype: DType, rng: &mut SplitMix64) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512dq")
        && std::arch::is_x86_feature_detected!("avx512vl")
    {
        // SAFETY: the CPU has AVX-512 F, DQ and VL (checked just above; DQ
        // and VL imply F).
        unsafe { fill_avx512(bytes, dtype, rng) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        unsafe { fill_avx2(bytes, dtype, rng) };
        return;
    }
    fill_indexed(bytes, dtype, rng);
}

/// [`fill_indexed`] compiled for AVX2 (the same IEEE operations in the same
/// order, so the same bytes; no FMA contraction: Rust never fuses).
///
/// # Safety
///
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn fill_avx2(bytes: &mut [u8], dtype: DType, rng: &mut SplitMix64) {
    match dtype {
        // SAFETY (both): the caller checked AVX2.
        DType::F32 | DType::F64 => unsafe { avx2::fill_float(bytes, dtype, rng) },
        _ => fill_indexed(bytes, dtype, rng),
    }
}

/// Hand-written AVX2 for the float fills (without AVX-512 the compiler
/// does 64-bit multiplies and `u64 -> f64` one lane at a time): four
/// SplitMix64 states per vector, the multiplies from 32-bit halves, the
/// 53-bit conversion from two exact 32-bit ones. Every step is exact or the
/// same IEEE operation as [`fill_indexed`]'s, in the same order (no FMA), so
/// the bytes are the same.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{DType, GAMMA, SplitMix64, fill_indexed};

    /// `a * C` modulo 2^64, lane by lane.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn mul64(a: __m256i, c: u64) -> __m256i {
        let c_lo = _mm256_set1_epi64x((c & 0xffff_ffff) as i64);
        let c_hi = _mm256_set1_epi64x((c >> 32) as i64);
        let lo = _mm256_mul_epu32(a, c_lo);
        let cross = _mm256_add_epi64(
            _mm256_mul_epu32(_mm256_srli_epi64::<32>(a), c_lo),
            _mm256_mul_epu32(a, c_hi),
        );
        _mm256_add_epi64(lo, _mm256_slli_epi64::<32>(cross))
    }

    /// `1 + 9 * unit(mix(state))` for four states, as `fill_indexed`.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn floats(state: __m256i) -> __m256d {
        let mut z = state;
        z = _mm256_xor_si256(z, _mm256_srli_epi64::<30>(z));
        z = mul64(z, 0xBF58_476D_1CE4_E5B9);
        z = _mm256_xor_si256(z, _mm256_srli_epi64::<27>(z));
        z = mul64(z, 0x94D0_49BB_1331_11EB);
        z = _mm256_xor_si256(z, _mm256_srli_epi64::<31>(z));
        // The top 53 bits as an exact f64: two exact 32-bit conversions
        // (2^52 + x has x in its mantissa), hi * 2^32 + lo (exact below 2^53).
        let v = _mm256_srli_epi64::<11>(z);
        let magic = _mm256_set1_epi64x(0x4330_0000_0000_0000);
        let two52 = _mm256_set1_pd(4_503_599_627_370_496.0);
        let low = _mm256_and_si256(v, _mm256_set1_epi64x(0xffff_ffff));
        let lo = _mm256_sub_pd(_mm256_castsi256_pd(_mm256_or_si256(low, magic)), two52);
        let high = _mm256_srli_epi64::<32>(v);
        let hi = _mm256_sub_pd(_mm256_castsi256_pd(_mm256_or_si256(high, magic)), two52);
        let x = _mm256_add_pd(_mm256_mul_pd(hi, _mm256_set1_pd(4_294_967_296.0)), lo);
        let unit = _mm256_mul_pd(x, _mm256_set1_pd(1.0 / (1u64 << 53) as f64));
        _mm256_add_pd(_mm256_set1_pd(1.0), _mm256_mul_pd(_mm256_set1_pd(9.0), unit))
    }

    /// The F32 or F64 fill of `bytes`, 8 elements per step, the tail by
    /// `fill_indexed`.
    ///
    /// # Safety
    ///
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn fill_float(bytes: &mut [u8], dtype: DType, rng: &mut SplitMix64) {
        let size = dtype.bytes();
        let n = bytes.len() / size;
        let steps = n / 8;
        let base = rng.0;
        let at = |k: u64| base.wrapping_add(GAMMA.wrapping_mul(k)) as i64;
        // Element i's state is base + (i + 1) * GAMMA.
        let mut s0 = _mm256_set_epi64x(at(4), at(3), at(2), at(1));
        let mut s1 = _mm256_set_epi64x(at(8), at(7), at(6), at(5));
        let step = _mm256_set1_epi64x(GAMMA.wrapping_mul(8) as i64);
        let ten = _mm_set1_ps(10.0);
        let below = _mm_set1_ps(super::below_ten_f32(10.0));
        let out = bytes.as_mut_ptr();
        for k in 0..steps {
            let (a, b) = (floats(s0), floats(s1));
            // SAFETY: element 8k + 7 < n, so these stores are inside `bytes`.
            unsafe {
                if size == 4 {
                    let keep = |f: __m128| _mm_blendv_ps(f, below, _mm_cmpge_ps(f, ten));
                    let p = out.add(k * 32).cast::<__m128>();
                    _mm_storeu_ps(p.cast(), keep(_mm256_cvtpd_ps(a)));
                    _mm_storeu_ps(p.add(1).cast(), keep(_mm256_cvtpd_ps(b)));
                } else {
                    let p = out.add(k * 64).cast::<f64>();
                    _mm256_storeu_pd(p, a);
                    _mm256_storeu_pd(p.add(4), b);
                }
            }
            s0 = _mm256_add_epi64(s0, step);
            s1 = _mm256_add_epi64(s1, step);
        }
        let done = steps * 8;
        rng.0 = base.wrapping_add(GAMMA.wrapping_mul(done as u64));
        fill_indexed(&mut bytes[done * size..], dtype, rng);
    }
}

/// [`fill_indexed`] compiled for AVX-512 (64-bit multiplies and
/// conversions in vector registers; the same bytes, as for AVX2).
///
/// # Safety
///
/// The CPU must support AVX-512 F, DQ and VL.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx512vl")]
unsafe fn fill_avx512(bytes: &mut [u8], dtype: DType, rng: &mut SplitMix64) {
    fill_indexed(bytes, dtype, rng);
}

#[inline(always)]
fn fill_indexed(bytes: &mut [u8], dtype: DType, rng: &mut SplitMix64) {
    #[inline(always)]
    fn each<const N: usize>(bytes: &mut [u8], base: u64, value: impl Fn(u64) -> [u8; N]) -> u64 {
        let n = bytes.len() / N;
        for (i, chunk) in bytes.chunks_exact_mut(N).enumerate() {
            let state = base.wrapping_add(GAMMA.wrapping_mul(i as u64 + 1));
            chunk.copy_from_slice(&value(mix(state)));
        }
        base.wrapping_add(GAMMA.wrapping_mul(n as u64))
    }
    let unit = |z: u64| (z >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
    let float = move |z: u64| 1.0 + 9.0 * unit(z);
    let small = |z: u64| (z % 10) as u8;
    let base = rng.0;
    rng.0 = match dtype {
        DType::F16 => {
            each(bytes, base, |z| below_ten_f16(f32_to_f16_bits(float(z) as f32)).to_ne_bytes())
        }
        DType::F32 => each(bytes, base, |z| below_ten_f32(float(z) as f32).to_ne_bytes()),
        DType::F64 => each(bytes, base, |z| float(z).to_ne_bytes()),
        DType::I8 => each(bytes, base, |z| (small(z) as i8).to_ne_bytes()),
        DType::I16 => each(bytes, base, |z| i16::from(small(z)).to_ne_bytes()),
        DType::I32 => each(bytes, base, |z| i32::from(small(z)).to_ne_bytes()),
        DType::I64 => each(bytes, base, |z| i64::from(small(z)).to_ne_bytes()),
        DType::U8 => each(bytes, base, |z| [small(z)]),
    };
}

/// The reference fill: one draw from `rng` per element, in order (what
/// [`fill`] must equal byte for byte).
#[cfg(test)]
pub(super) fn fill_sequential(bytes: &mut [u8], dtype: DType, rng: &mut SplitMix64) {
    fn each<const N: usize>(bytes: &mut [u8], mut value: impl FnMut() -> [u8; N]) {
        for chunk in bytes.chunks_exact_mut(N) {
            chunk.copy_from_slice(&value());
        }
    }
    match dtype {
        DType::F16 => {
            each(bytes, || below_ten_f16(f32_to_f16_bits(rng.float() as f32)).to_ne_bytes())
        }
        DType::F32 => each(bytes, || below_ten_f32(rng.float() as f32).to_ne_bytes()),
        DType::F64 => each(bytes, || rng.float().to_ne_bytes()),
        DType::I8 => each(bytes, || (rng.small_int() as i8).to_ne_bytes()),
        DType::I16 => each(bytes, || i16::from(rng.small_int()).to_ne_bytes()),
        DType::I32 => each(bytes, || i32::from(rng.small_int()).to_ne_bytes()),
        DType::I64 => each(bytes, || i64::from(rng.small_int()).to_ne_bytes()),
        DType::U8 => each(bytes, || [rng.small_int()]),
    }
}

/// Keeps a value rounded up to 10 inside `[1, 10)`.
pub(super) fn below_ten_f32(x: f32) -> f32 {
    if x >= 10.0 { f32::from_bits(10.0f32.to_bits() - 1) } else { x }
}

/// `f16` bits of 10.0.
pub(super) const F16_TEN: u16 = 0x4900;

/// Keeps an `f16` rounded up to 10 inside `[1, 10)`.
pub(super) fn below_ten_f16(bits: u16) -> u16 {
    if bits >= F16_TEN { F16_TEN - 1 } else { bits }
}

/// IEEE 754 binary16 bits of `x`, rounded to nearest, ties to even
/// (overflow to infinity, subnormals kept, NaN stays NaN).
pub(super) fn f32_to_f16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exp = ((bits >> 23) & 0xff) as i32;
    let man = bits & 0x007f_ffff;
    if exp == 0xff {
        // Infinity, or NaN (quiet, keeping it a NaN).
        return sign | 0x7c00 | if man != 0 { 0x0200 } else { 0 };
    }
    // The binary16 biased exponent.
    let e = exp - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        // Subnormal binary16 (or zero): value = m * 2^-24.
        if e < -10 {
            return sign;
        }
        let m = man | 0x0080_0000;
        let shift = (14 - e) as u32;
        let half = 1u32 << (shift - 1);
        let rem = m & ((1u32 << shift) - 1);
        let mut h = m >> shift;
        if rem > half || (rem == half && h & 1 == 1) {
            h += 1;
        }
        return sign | h as u16;
    }
    let mut h = ((e as u32) << 10) | (man >> 13);
    let rem = man & 0x1fff;
    if rem > 0x1000 || (rem == 0x1000 && h & 1 == 1) {
        // A carry into the exponent is right, up to infinity.
        h += 1;
    }
    sign | h as u16
}

// ---------------------------------------------------------------------------

/// The bytes of argument set 0 that [`AllocArgs`] with this `seed` fills,
/// computed on the host (for servers that do not run our tasks, e.g. TVM's:
/// the arguments are copied there, so outputs compare across backends).
///
/// # Errors
///
/// As [`AllocArgs`]: [`failure_kind::BAD_ARGS`] for a negative dimension or
/// an argument too large.
pub(crate) fn host_args(args: &[ArgInfo], seed: u64) -> Result<Vec<Vec<u8>>, TaskFailure> {
    let mut rng = SplitMix64(seed);
    args.iter()
        .enumerate()
        .map(|(index, info)| {
            let bytes =
                super::buffers::checked_nbytes(index, info).map_err(KernelError::into_failure)?;
            let mut buf = vec![0u8; bytes];
            fill(&mut buf, info.dtype, &mut rng);
            Ok(buf)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_indexed_fill_gives_the_sequential_bytes_and_state() {
        for dtype in DType::ALL {
            for (seed, elems) in [(0u64, 0usize), (1, 1), (7, 33), (u64::MAX, 1000), (42, 4097)] {
                let len = elems * dtype.bytes();
                let (mut a, mut b) = (vec![0u8; len], vec![0u8; len]);
                let (mut ra, mut rb) = (SplitMix64(seed), SplitMix64(seed));
                fill_sequential(&mut b, dtype, &mut rb);
                fill(&mut a, dtype, &mut ra);
                assert_eq!(a, b, "{dtype} seed {seed} n {elems}");
                assert_eq!(ra.0, rb.0, "{dtype} seed {seed} n {elems}: the state after");
                let (mut c, mut rc) = (vec![0u8; len], SplitMix64(seed));
                fill_indexed(&mut c, dtype, &mut rc);
                assert_eq!((c, rc.0), (b, rb.0), "{dtype} seed {seed} n {elems}: portable");
            }
        }
    }

    #[test]
    fn f16_conversion_rounds_to_nearest_even() {
        let cases: &[(f32, u16)] = &[
            (0.0, 0x0000),
            (-0.0, 0x8000),
            (1.0, 0x3c00),
            (-2.0, 0xc000),
            (1.5, 0x3e00),
            (10.0, 0x4900),
            (65504.0, 0x7bff),
            (65520.0, 0x7c00),            // tie at the top rounds to infinity
            (1.0 + 1.0 / 2048.0, 0x3c00), // tie, even stays
            (1.0 + 3.0 / 2048.0, 0x3c02), // tie, odd rounds up
            (f32::from_bits(0x3f80_1001), 0x3c01), // just above a tie
            (6.103_515_6e-5, 0x0400),     // smallest normal
            (5.960_464_5e-8, 0x0001),     // smallest subnormal
            (2.0e-8, 0x0000),             // underflow
            (f32::INFINITY, 0x7c00),
            (f32::NEG_INFINITY, 0xfc00),
        ];
        for &(x, h) in cases {
            assert_eq!(f32_to_f16_bits(x), h, "{x}");
        }
        assert_eq!(f32_to_f16_bits(f32::NAN) & 0x7c00, 0x7c00);
        assert_ne!(f32_to_f16_bits(f32::NAN) & 0x03ff, 0);
    }
}
