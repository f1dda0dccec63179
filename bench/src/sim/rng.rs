//! The simulator's own pseudo-random numbers: SplitMix64 seeding xoshiro256**.
//!
//! Written out here rather than taken from a crate so that a seed gives the same conference in
//! every version of this code and its dependencies.

/// SplitMix64 (Steele, Lea and Flood), used to expand seeds into xoshiro states.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator starting at `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// xoshiro256** (Blackman and Vigna): fast, 256 bits of state, good statistical quality.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// The generator of stream `stream` under `seed`: distinct streams are independent for
    /// practical purposes (each state is expanded by SplitMix64 from a distinct start).
    pub fn new(seed: u64, stream: u64) -> Self {
        let mut sm = SplitMix64::new(seed ^ SplitMix64::new(stream).next_u64());
        let mut s = [0u64; 4];
        for word in &mut s {
            *word = sm.next_u64();
        }
        // The all-zero state is the one state xoshiro cannot leave; SplitMix64 never yields four
        // zeros in a row, but be explicit.
        if s == [0; 4] {
            s[0] = 1;
        }
        Self { s }
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1), with 53 random bits.
    #[inline]
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [lo, hi).
    #[inline]
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    /// Uniform in [0, n), without bias (Lemire's multiply-and-reject); 0 when `n` is 0.
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = u128::from(self.next_u64()) * u128::from(n);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }

    /// Whether an event of probability `p` happens.
    #[inline]
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// Two independent standard normal numbers (Box–Muller).
    #[inline]
    pub fn normal_pair(&mut self) -> (f64, f64) {
        // 1 - unit() is in (0, 1], so the logarithm is finite.
        let r = (-2.0 * (1.0 - self.unit()).ln()).sqrt();
        let (s, c) = (std::f64::consts::TAU * self.unit()).sin_cos();
        (r * c, r * s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_the_reference() {
        // First outputs of the reference implementation seeded with 0.
        let mut sm = SplitMix64::new(0);
        assert_eq!(sm.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(sm.next_u64(), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(sm.next_u64(), 0x06C4_5D18_8009_454F);
    }

    #[test]
    fn xoshiro256starstar_matches_the_reference() {
        // The reference implementation from state {1, 2, 3, 4}.
        let mut rng = Rng { s: [1, 2, 3, 4] };
        let expected = [11_520u64, 0, 1_509_978_240, 1_215_971_899_390_074_240];
        for e in expected {
            assert_eq!(rng.next_u64(), e);
        }
    }

    #[test]
    fn streams_differ_and_ranges_hold() {
        assert_ne!(Rng::new(7, 1).next_u64(), Rng::new(7, 2).next_u64());
        assert_ne!(Rng::new(7, 1).next_u64(), Rng::new(8, 1).next_u64());
        assert_eq!(Rng::new(7, 1).next_u64(), Rng::new(7, 1).next_u64());
        let mut rng = Rng::new(1, 0);
        let mut counts = [0u32; 7];
        let (mut sum, mut sum2) = (0.0, 0.0);
        for _ in 0..70_000 {
            counts[rng.below(7) as usize] += 1;
            let u = rng.unit();
            assert!((0.0..1.0).contains(&u));
            let (x, y) = rng.normal_pair();
            sum += x + y;
            sum2 += x * x + y * y;
        }
        assert!(
            counts.iter().all(|&c| (9_500..10_500).contains(&c)),
            "{counts:?}"
        );
        let mean = sum / 140_000.0;
        let var = sum2 / 140_000.0 - mean * mean;
        assert!(
            mean.abs() < 0.02 && (var - 1.0).abs() < 0.03,
            "{mean} {var}"
        );
        assert_eq!(rng.below(0), 0);
        assert_eq!(rng.below(1), 0);
    }
}
