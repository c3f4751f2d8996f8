//! Quality scores: the [`QualityScorer`] trait, the default scorer, recency.

use chrono::{DateTime, Utc};

use crate::store::MemoryItem;

/// Days after which a memory's [`recency`] has halved.
pub const RECENCY_HALF_LIFE_DAYS: f64 = 30.0;

/// How recent `created_at` is, in [0, 1]: 1 now, halving every
/// [`RECENCY_HALF_LIFE_DAYS`] days (`0.5^(age_days / 30)`). A time in the
/// future counts as now.
pub fn recency(created_at: DateTime<Utc>) -> f64 {
    let age_days = (Utc::now() - created_at).num_milliseconds().max(0) as f64 / 86_400_000.0;
    0.5f64.powf(age_days / RECENCY_HALF_LIFE_DAYS)
}

/// Decides how good a candidate memory is, in [0, 1]: below
/// `memory.quality_threshold` it is not stored, and over
/// `memory.max_memories` the lowest-scoring go first.
///
/// Any `Fn(&MemoryItem) -> f64 + Send + Sync` is a scorer:
///
/// ```
/// use troupe::memory::{recency, Memory, MemoryItem};
/// let memory = Memory::builder().quality_threshold(0.7).build();
/// memory.set_quality_scorer(|m: &MemoryItem| {
///     0.4 * m.relevance + 0.3 * recency(m.created_at) + 0.3 * m.importance
/// });
/// ```
pub trait QualityScorer: Send + Sync + 'static {
    /// The score of `item`, in [0, 1] (values outside are clamped).
    fn score(&self, item: &MemoryItem) -> f64;
}

impl<F> QualityScorer for F
where
    F: Fn(&MemoryItem) -> f64 + Send + Sync + 'static,
{
    fn score(&self, item: &MemoryItem) -> f64 {
        self(item)
    }
}

/// The default scorer: `0.4 × relevance + 0.3 × recency(created_at) + 0.3 × importance`.
#[derive(Clone, Copy, Debug, Default)]
pub struct DefaultScorer;

impl QualityScorer for DefaultScorer {
    fn score(&self, m: &MemoryItem) -> f64 {
        0.4 * m.relevance + 0.3 * recency(m.created_at) + 0.3 * m.importance
    }
}

/// `score` clamped to [0, 1]; NaN counts as 0.
pub(crate) fn clamp(score: f64) -> f64 {
    if score.is_nan() {
        0.0
    } else {
        score.clamp(0.0, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recency_halves() {
        assert!((recency(Utc::now()) - 1.0).abs() < 1e-6);
        let month = Utc::now() - chrono::Duration::days(30);
        assert!((recency(month) - 0.5).abs() < 1e-3);
        assert_eq!(recency(Utc::now() + chrono::Duration::days(3)), 1.0);
    }
}
