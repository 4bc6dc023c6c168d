//! A cap on background rounds running at once (replication).

use std::{future::Future, sync::Arc};

use tokio::sync::Semaphore;

/// How many replication rounds run at once. A round streams a volume's changes from its
/// primary to its replicas; a few at a time keep the network and the pools' disks busy,
/// while one per due volume (every volume at once after an outage, or with many short
/// intervals) would split both between all of them, make every round slow, and leave the
/// controller's tasks and connections unbounded. Four matches the connection-level
/// concurrency a node's agent handles without its transfers slowing each other (each
/// round is one stream per replica).
pub const MAX_ROUNDS: usize = 4;

/// Starts `round` on its own task if one of `slots`' permits is free, holding it until the
/// round ends; false when all are taken (the caller tries again on its next tick).
pub fn spawn_capped<F>(slots: &Arc<Semaphore>, round: impl FnOnce() -> F) -> bool
where
    F: Future<Output = ()> + Send + 'static,
{
    let Ok(permit) = slots.clone().try_acquire_owned() else {
        return false;
    };
    let fut = round();
    tokio::spawn(async move {
        let _permit = permit;
        fut.await
    });
    true
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::{AtomicUsize, Ordering},
        time::Duration,
    };

    use super::*;

    /// Ten due rounds, four slots: four start, never more than four run, and a slot freed
    /// by a finished round takes the next.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn no_more_than_the_cap_run_at_once() {
        let slots = Arc::new(Semaphore::new(MAX_ROUNDS));
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let (release, _) = tokio::sync::broadcast::channel::<()>(1);
        let mut started = 0;
        for _ in 0..10 {
            let (running, most, mut rx) = (running.clone(), most.clone(), release.subscribe());
            started += usize::from(spawn_capped(&slots, move || async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                let _ = rx.recv().await;
                running.fetch_sub(1, Ordering::SeqCst);
            }));
        }
        assert_eq!(
            started, MAX_ROUNDS,
            "only as many rounds start as there are slots"
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while running.load(Ordering::SeqCst) < MAX_ROUNDS {
            assert!(
                tokio::time::Instant::now() < deadline,
                "rounds never started"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        release.send(()).unwrap();
        while slots.available_permits() < MAX_ROUNDS {
            assert!(tokio::time::Instant::now() < deadline, "rounds never ended");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(most.load(Ordering::SeqCst), MAX_ROUNDS);
        assert!(
            spawn_capped(&slots, || async {}),
            "a freed slot takes the next round"
        );
    }
}
