//! Background tasks: the node plugin's heartbeat and node Lease, the controller's node
//! discovery and its leader election. Each is a plain async fn that returns when `shutdown` turns true (or its
//! sender is dropped), for the caller to spawn.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use k8s_openapi::jiff::Timestamp;
use tokio::sync::watch;

use super::{
    ClusterApi,
    crd::{BerthNodeSpec, BerthNodeStatus},
};

/// Sleeps `d`; true when shutdown came first.
pub(super) async fn sleep_or_stop(d: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    if *shutdown.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = shutdown.wait_for(|stop| *stop) => true,
    }
}

/// Exponential back-off between `min` and `max`.
#[derive(Debug)]
pub(super) struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub(super) fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            next: min,
        }
    }

    pub(super) fn next(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    pub(super) fn reset(&mut self) {
        self.next = self.min;
    }
}

/// RFC 3339, to the second, as Kubernetes writes times.
pub(super) fn rfc3339_now() -> String {
    Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .map_or_else(
            |_| Timestamp::now().to_string(),
            |t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
        )
}

/// Node plugin: publishes this node's BerthNode at once and then every `every`, with the
/// pool's `(total, available)` bytes from `capacity`. A failed publish is logged and tried
/// again sooner (back-off from 1 s up to `every`), so a node that starts before its CRD is
/// installed or while the API server is away appears as soon as it can.
pub async fn node_heartbeat(
    api: Arc<dyn ClusterApi>,
    node_id: String,
    spec: BerthNodeSpec,
    capacity: impl Fn() -> (u64, u64) + Send + Sync,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(Duration::from_secs(1).min(every), every);
    let mut failing = false;
    loop {
        let (total_bytes, available_bytes) = capacity();
        let status = BerthNodeStatus {
            total_bytes,
            available_bytes,
            heartbeat_time: rfc3339_now(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        };
        let wait = match api.publish_node(&node_id, spec.clone(), status).await {
            Ok(()) => {
                if std::mem::take(&mut failing) {
                    tracing::info!(node.id = %node_id, "BerthNode published again");
                }
                backoff.reset();
                every
            }
            Err(e) => {
                failing = true;
                tracing::warn!(node.id = %node_id, error = %e, "cannot publish BerthNode");
                backoff.next()
            }
        };
        if sleep_or_stop(wait, &mut shutdown).await {
            return;
        }
    }
}

/// Controller: lists the BerthNodes of `domain` every `every` and calls `on_change` with the
/// whole membership (node id → agent address) at the first list and whenever it changes.
///
/// It lists rather than watches: every node rewrites its BerthNode status at each heartbeat,
/// so a watch would wake the controller once per node per heartbeat for no change of
/// membership, while a list per interval costs one request.
///
/// A node whose heartbeat stops stays a member; only a deleted BerthNode leaves. The
/// controller answers UNAVAILABLE for a volume while a node that may hold it does not
/// answer, which the CO retries; dropping a silent node instead would turn that into
/// NOT_FOUND, which a CO takes as final (a DeleteVolume would even count it as done) for
/// volumes that are merely on a node being rebooted. A stale heartbeat (older than three
/// intervals) is logged instead, once per node until it beats again.
///
/// A failed list keeps the membership as it was and retries with back-off.
pub async fn discover_nodes(
    api: Arc<dyn ClusterApi>,
    domain: String,
    on_change: impl Fn(BTreeMap<String, String>) + Send + Sync,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut known: Option<BTreeMap<String, String>> = None;
    let mut stale = std::collections::BTreeSet::new();
    let mut backoff = Backoff::new(Duration::from_secs(1).min(every), every);
    loop {
        let wait = match api.list_nodes().await {
            Ok(nodes) => {
                backoff.reset();
                let mut members = BTreeMap::new();
                for n in nodes {
                    if n.domain != domain {
                        tracing::debug!(node.id = %n.id, node.domain = %n.domain, "BerthNode of another domain ignored");
                        continue;
                    }
                    let age = n
                        .status
                        .as_ref()
                        .and_then(|s| s.heartbeat_time.parse::<Timestamp>().ok())
                        .and_then(|t| Timestamp::now().duration_since(t).try_into().ok());
                    let is_stale = age.is_none_or(|a: Duration| a > every * 3);
                    if is_stale && stale.insert(n.id.clone()) {
                        tracing::warn!(node.id = %n.id, age = ?age, "node's heartbeat is stale; keeping it as a member until its BerthNode is deleted");
                    } else if !is_stale && stale.remove(&n.id) {
                        tracing::info!(node.id = %n.id, "node's heartbeat is back");
                    }
                    members.insert(n.id, n.address);
                }
                stale.retain(|id| members.contains_key(id));
                if known.as_ref() != Some(&members) {
                    tracing::info!(nodes = ?members, "berth nodes changed");
                    on_change(members.clone());
                    known = Some(members);
                }
                every
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot list BerthNodes; keeping the nodes known");
                backoff.next()
            }
        };
        if sleep_or_stop(wait, &mut shutdown).await {
            return;
        }
    }
}

/// Controller replicas: tries every `duration / 3` to acquire or renew the Lease
/// `namespace/lease_name` for `holder`. `is_leader` turns true once it is held and false as
/// soon as a renewal fails or is lost (including a request that takes longer than the
/// renewal period), so the leader steps down well before another replica can take the lease
/// over (a full `duration` after the last renewal). On shutdown it steps down and releases
/// the Lease, so a standby takes over at once.
pub async fn leader_election(
    api: Arc<dyn ClusterApi>,
    namespace: String,
    lease_name: String,
    holder: String,
    duration: Duration,
    is_leader: watch::Sender<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let period = duration / 3;
    let secs = u32::try_from(duration.as_secs().max(1)).unwrap_or(u32::MAX);
    loop {
        let attempt = api.try_acquire_lease(&namespace, &lease_name, &holder, secs);
        let leading = match tokio::time::timeout(period, attempt).await {
            Ok(Ok(held)) => held,
            Ok(Err(e)) => {
                tracing::warn!(lease = %lease_name, error = %e, "lease renewal failed");
                false
            }
            Err(_) => {
                tracing::warn!(lease = %lease_name, "lease renewal timed out");
                false
            }
        };
        is_leader.send_if_modified(|was| {
            if *was != leading {
                tracing::info!(lease = %lease_name, holder = %holder, leading, "leadership changed");
            }
            std::mem::replace(was, leading) != leading
        });
        if sleep_or_stop(period, &mut shutdown).await {
            break;
        }
    }
    let was_leading = is_leader.send_replace(false);
    if was_leading {
        let release = api.release_lease(&namespace, &lease_name, &holder);
        match tokio::time::timeout(period, release).await {
            Ok(Ok(())) => tracing::info!(lease = %lease_name, "lease released"),
            Ok(Err(e)) => tracing::warn!(lease = %lease_name, error = %e, "cannot release lease"),
            Err(_) => tracing::warn!(lease = %lease_name, "releasing the lease timed out"),
        }
    }
}

/// Node plugin: renews this node's Lease (`berth-node-<node>` in `namespace`, valid
/// `duration`) at once and then every `every`, and calls `renewed` with the time each
/// renewal the API server accepted was sent.
///
/// The send time, taken before the request leaves, is what the node's self-fencing counts
/// from: the API server commits the write after it, and the controller counts the Lease's
/// duration from when it saw that write, so the node's count always starts first. A request
/// gets at most `every` to answer, so that a hung connection costs one renewal, not all
/// those after it. A failure is logged and the next renewal comes at the next tick, never
/// later: every missed renewal brings the node closer to fencing itself.
pub async fn node_lease(
    api: Arc<dyn ClusterApi>,
    namespace: String,
    node: String,
    every: Duration,
    duration: Duration,
    renewed: impl Fn(std::time::Instant) + Send + Sync,
    mut shutdown: watch::Receiver<bool>,
) {
    let secs = u32::try_from(duration.as_secs().max(1)).unwrap_or(u32::MAX);
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let sent = std::time::Instant::now();
        let attempt = api.renew_node_lease(&namespace, &node, secs);
        match tokio::time::timeout(every, attempt).await {
            Ok(Ok(())) => {
                if std::mem::take(&mut failing) {
                    tracing::info!(node.id = %node, "node Lease renewed again");
                }
                renewed(sent);
            }
            Ok(Err(e)) => {
                failing = true;
                tracing::warn!(node.id = %node, error = %e, "cannot renew the node Lease");
            }
            Err(_) => {
                failing = true;
                tracing::warn!(node.id = %node, timeout = ?every, "renewing the node Lease timed out");
            }
        }
    }
}

#[cfg(test)]
mod tests;
