//! Cadence jitter: uniform numbers in [0, 1) so tasks started together drift
//! apart instead of polling in lock-step. xorshift64: no need for a crypto RNG.

#[derive(Clone, Debug)]
pub struct Jitter(u64);

impl Jitter {
    /// Seeded from the OS random source (never 0, which xorshift cannot leave).
    pub fn new() -> Self {
        let mut b = [0u8; 8];
        let _ = getrandom::fill(&mut b);
        Jitter(u64::from_le_bytes(b) | 1)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        let x = &mut self.0;
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        (*x >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl Default for Jitter {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_in_the_unit_interval_and_spreads() {
        let mut j = Jitter::new();
        let xs: Vec<f64> = (0..10_000).map(|_| j.unit()).collect();
        assert!(xs.iter().all(|x| (0.0..1.0).contains(x)));
        let low = xs.iter().filter(|&&x| x < 0.5).count();
        assert!((4_000..6_000).contains(&low), "{low}");
    }
}
