//! A tiny deterministic PRNG for the model-based tests, so a failing
//! sequence replays exactly from its printed seed (no dependency needed).

/// xorshift64*.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator whose state is `state` as given (must be non-zero).
    pub fn from_state(state: u64) -> Rng {
        Rng(state)
    }

    /// A generator for any seed (0 too): the state is splitmix64 of it.
    pub fn seeded(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// One of `items`, which must not be empty.
    pub fn pick<'v, T>(&mut self, items: &'v [T]) -> &'v T {
        &items[self.below(items.len() as u64) as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_replays_and_seeds_differ() {
        let take = |mut rng: Rng| (0..4).map(|_| rng.next_u64()).collect::<Vec<_>>();
        assert_eq!(take(Rng::seeded(0)), take(Rng::seeded(0)));
        assert_ne!(take(Rng::seeded(0)), take(Rng::seeded(1)));
        assert_ne!(Rng::seeded(0).next_u64(), 0);
        let mut rng = Rng::from_state(7);
        assert!((0..100).all(|_| rng.below(3) < 3));
    }
}
