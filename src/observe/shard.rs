//! Per-thread shards for counters that every worker adds to.

use std::sync::atomic::{AtomicUsize, Ordering};

/// The calling thread's shard index, for the stats counters and the audit aggregator:
/// assigned round-robin on a thread's first use, so the runtime's workers land on different
/// shards and a counter's cache line is not bounced between cores on every hit.
pub(crate) fn thread_shard(shards: usize) -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    INDEX.with(|index| *index) % shards
}
