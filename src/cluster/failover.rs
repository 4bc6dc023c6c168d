//! When a node dies: its leases, and the failover of its replicated volumes to their
//! freshest replicas (docs/moving.md, "When a node dies").
//!
//! A node is lost once a look at the leases, asked more than the lease duration after the
//! look that showed its last renewal, shows none, by this controller's clock, with time
//! it could not look set aside ([`Liveness`]); in Kubernetes, only once its kubelet has
//! stopped renewing too ([`Kubelets`]). Or once an
//! operator or Kubernetes (the `node.kubernetes.io/out-of-service` taint) says it is gone.
//! The node fenced its replicated primaries before that (`crate::lease`). For each
//! replicated volume whose primary was there, one compare-and-swap on the placement record
//! makes the replica with the newest snapshot the primary at epoch + 1; then that node
//! promotes its replica. Nothing else may decide ownership, so of two controllers racing,
//! one record write lands and the other's is refused.
//!
//! When the lost node answers again, its copies are stale: the record no longer names it.
//! Each is demoted ([`Cluster::demote`]): what it holds is kept as a CSI snapshot for an
//! operator, and it becomes a replica of the new primary. A node that was only cut off
//! long enough to fence, and whose volumes did not fail over, gets them back with one
//! compare-and-swap each ([`Cluster::resume`]).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_trait::async_trait;

use super::{Cluster, monitor, peer};
use crate::{
    error::{Error, Result},
    kube::{ClusterApi, KubeletLease},
    lease::LeaseTimings,
    placement::{self, FailedOver, PlacementPhase, Versioned, VolumePlacement},
    proto::agent::v1 as pb,
    service::params::Failover,
    storage::VolumeId,
    util::{failpoint, fsutil},
};

/// Where the controller reads nodes' lease renewals, and records the ones it makes.
#[async_trait]
pub trait LeaseStore: Send + Sync {
    /// Whether the controller renews the nodes' leases (a nodes file), or the nodes renew
    /// their own (Kubernetes Leases).
    fn renewed_by_controller(&self) -> bool;

    /// Records a renewal of `node`'s lease, before the node is told it holds.
    async fn renew(&self, node: &str) -> Result<()>;

    /// Every node's renewal mark: a value that changes with each renewal.
    async fn marks(&self) -> Result<BTreeMap<String, String>>;
}

/// Leases as files beside the placement records (a nodes file): every controller sharing
/// the records sees the renewals any of them made.
pub struct FileLeases {
    dir: PathBuf,
}

impl FileLeases {
    pub fn open(dir: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&dir).map_err(Error::io("create", &dir))?;
        Ok(FileLeases { dir })
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct LeaseFile {
    mark: String,
}

#[async_trait]
impl LeaseStore for FileLeases {
    fn renewed_by_controller(&self) -> bool {
        true
    }

    async fn renew(&self, node: &str) -> Result<()> {
        // Node ids are DNS names (parse_nodes), safe as file names.
        let path = self.dir.join(format!("{node}.json"));
        let mark = uuid::Uuid::new_v4().to_string();
        tokio::task::spawn_blocking(move || fsutil::write_json(&path, &LeaseFile { mark }))
            .await
            .expect("lease write panicked")
    }

    async fn marks(&self) -> Result<BTreeMap<String, String>> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || {
            let mut out = BTreeMap::new();
            for e in std::fs::read_dir(&dir).map_err(Error::io("list", &dir))? {
                let path = e.map_err(Error::io("list", &dir))?.path();
                let Some(node) = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_suffix(".json"))
                else {
                    continue;
                };
                if let Some(f) = fsutil::read_json::<LeaseFile>(&path)? {
                    out.insert(node.to_string(), f.mark);
                }
            }
            Ok(out)
        })
        .await
        .expect("lease scan panicked")
    }
}

/// Leases in Kubernetes: coordination.k8s.io Leases the nodes renew themselves
/// (`kube::node_lease`); the controller only reads them.
pub struct KubeLeases {
    api: Arc<dyn ClusterApi>,
    namespace: String,
}

impl KubeLeases {
    pub fn new(api: Arc<dyn ClusterApi>, namespace: String) -> Self {
        KubeLeases { api, namespace }
    }
}

#[async_trait]
impl LeaseStore for KubeLeases {
    fn renewed_by_controller(&self) -> bool {
        false
    }

    async fn renew(&self, node: &str) -> Result<()> {
        Err(Error::FailedPrecondition(format!(
            "node {node} renews its own Lease in Kubernetes"
        )))
    }

    async fn marks(&self) -> Result<BTreeMap<String, String>> {
        self.api.node_leases(&self.namespace).await
    }
}

/// What this controller knows of the nodes' leases.
pub struct Liveness {
    store: Arc<dyn LeaseStore>,
    pub timings: LeaseTimings,
    /// What the looks at the nodes' renewal marks showed.
    looks: Mutex<Looks>,
    /// Nodes an operator declared gone, or Kubernetes tainted out-of-service.
    gone: Mutex<BTreeSet<String>>,
    /// The Events already sent about a volume and its lost node (volume, node, message),
    /// forgotten once the node's lease holds again.
    told: Mutex<BTreeSet<(String, String, String)>>,
    rounds: std::sync::atomic::AtomicU64,
    /// The nodes Kubernetes tainted out-of-service at the last look.
    tainted: Mutex<BTreeSet<String>>,
    /// The kubelets' own Leases, in Kubernetes.
    kubelets: Mutex<Kubelets>,
}

impl Liveness {
    pub fn new(store: Arc<dyn LeaseStore>, timings: LeaseTimings) -> Self {
        Liveness {
            store,
            timings,
            looks: Mutex::new(Looks::new(timings.period)),
            gone: Mutex::default(),
            told: Mutex::default(),
            rounds: Default::default(),
            tainted: Mutex::default(),
            kubelets: Mutex::new(Kubelets::new(timings.period)),
        }
    }

    /// Renews `node`'s lease for it, when that is the controller's job, in three steps:
    /// the node notes when it answered a new token; the renewal is recorded in the store
    /// (where every controller sees it); then the token is confirmed, and the node's lease
    /// runs from when it answered, which is before any controller can have seen the
    /// renewal. A renewal whose record failed is never confirmed.
    pub async fn renew(
        &self,
        node: &str,
        agent: &mut pb::agent_client::AgentClient<tonic::transport::Channel>,
    ) {
        if !self.store.renewed_by_controller() {
            return;
        }
        let token = uuid::Uuid::new_v4().as_u64_pair().0 | 1;
        if agent
            .renew_lease(pb::RenewLeaseRequest { confirm: 0, token })
            .await
            .is_err()
        {
            return;
        }
        if let Err(e) = self.store.renew(node).await {
            tracing::warn!(node, error = %e, "cannot record a lease renewal");
            return;
        }
        let _ = agent
            .renew_lease(pb::RenewLeaseRequest {
                confirm: token,
                token: 0,
            })
            .await;
    }

    /// Looks at every mark; a changed one counts as a renewal when the look answered. A
    /// look that takes longer than fence-after fails: a store that hangs (an API server
    /// frozen) is as blind as one that refuses. (A slow look that answers is safe as it is:
    /// it is judged from when it was asked; only one that would outlast a node's fence is
    /// given up.)
    async fn refresh(&self) -> Result<()> {
        let asked = Instant::now();
        let marks = within(
            self.timings.fence_after,
            "read the lease marks",
            self.store.marks(),
        )
        .await
        .inspect_err(|_| self.looks.lock().expect("looks lock").failed())?;
        self.looks
            .lock()
            .expect("looks lock")
            .take_in(&marks, asked, Instant::now());
        Ok(())
    }

    /// Whether `node`'s lease has expired: the last look was asked more than the lease
    /// duration after the look that showed its last renewal answered (for a node never
    /// seen, after this controller's start); or the node was declared gone.
    ///
    /// Judged on the looks, never on when it is asked: a renewal made after the last look
    /// and before the node's fence keeps the node unfenced, and a long round deciding on
    /// an old look must not count it as missed. A look asked after the lease duration had
    /// run out would have shown any renewal made before the node's fence.
    pub fn lost(&self, node: &str) -> bool {
        if self.gone.lock().expect("gone lock").contains(node) {
            return true;
        }
        self.looks
            .lock()
            .expect("looks lock")
            .unrenewed(node)
            .is_some_and(|d| d > self.timings.duration)
    }

    /// When `node`'s last renewal was seen, if ever.
    fn last_seen(&self, node: &str) -> Option<Instant> {
        self.looks.lock().expect("looks lock").last_seen(node)
    }

    /// Why `node`'s host may still live, whatever became of berth's node plugin there:
    /// its kubelet still renewed its own Lease at the last look, or the kubelets' Leases
    /// cannot be read.
    fn host_may_live(&self, node: &str) -> Option<String> {
        self.kubelets.lock().expect("kubelets lock").may_live(node)
    }

    /// Forgets what was told about the nodes whose leases hold again: a node lost anew is
    /// told about anew.
    fn forget_told(&self) {
        let mut told = self.told.lock().expect("told lock");
        told.retain(|(_, node, _)| self.lost(node));
    }

    pub fn declare_gone(&self, node: &str) {
        self.gone
            .lock()
            .expect("gone lock")
            .insert(node.to_string());
    }

    /// Nodes gone by Kubernetes' say (the out-of-service taint), replacing the last list.
    /// A node whose taint was removed is lost again only by its lease; an operator's
    /// declaration stays.
    fn set_out_of_service(&self, nodes: BTreeSet<String>) {
        let mut tainted = self.tainted.lock().expect("tainted lock");
        let mut gone = self.gone.lock().expect("gone lock");
        for n in tainted.difference(&nodes) {
            gone.remove(n);
        }
        for n in nodes.difference(&tainted) {
            tracing::warn!(node = %n, "node tainted out-of-service: its volumes fail over now");
        }
        gone.extend(nodes.iter().cloned());
        *tainted = nodes;
    }
}

/// Renewal marks (one per node) as this controller's looks showed them: how long each
/// node had gone without a renewal at the last look. berth's leases and the kubelets'
/// are both kept so.
struct Looks {
    /// Each node's last mark, and when it was seen.
    seen: BTreeMap<String, Seen>,
    /// What a node never seen counts from: this controller's start, moved on by blind
    /// time set aside.
    start: Instant,
    /// When the last look that answered was asked.
    looked: Option<Instant>,
    /// A look failed since then.
    blind: bool,
    /// How much blind time counts all the same: a lease period, what one missed renewal
    /// costs a node anyway. Without it, looks that fail every other round would hold
    /// every lease back for ever.
    tolerance: Duration,
}

/// A node's last mark.
struct Seen {
    mark: String,
    /// When the look that first showed it answered.
    at: Instant,
    /// What its lack of renewal counts from: `at`, moved on by blind time set aside.
    counts_from: Instant,
}

impl Looks {
    fn new(tolerance: Duration) -> Self {
        Looks {
            seen: BTreeMap::new(),
            start: Instant::now(),
            looked: None,
            blind: false,
            tolerance,
        }
    }

    /// A look failed.
    fn failed(&mut self) {
        self.blind = true;
    }

    /// Takes in the marks of a look asked at `asked` and answered at `answered`; a
    /// changed mark counts as a renewal at `answered`, the latest it can have been made.
    ///
    /// After looks failed, the time since the last one that answered does not count
    /// towards any lease, beyond `tolerance`: the store was out of reach (the API server
    /// down, say), so the nodes' renewals most likely failed too, and each node is judged
    /// again on looks from now on, with about what was left of its lease before. Counting
    /// that time would fail over every node whose first renewal after the outage came
    /// later than this look: a mass failover of live nodes (fenced by then, so safe, but
    /// each database moved for nothing).
    fn take_in<'a>(
        &mut self,
        marks: impl IntoIterator<Item = (&'a String, &'a String)>,
        asked: Instant,
        answered: Instant,
    ) {
        if std::mem::take(&mut self.blind)
            && let Some(prev) = self.looked
        {
            let gap = asked
                .saturating_duration_since(prev)
                .saturating_sub(self.tolerance);
            for s in self.seen.values_mut() {
                s.counts_from += gap;
            }
            self.start += gap;
        }
        self.looked = Some(asked);
        for (node, mark) in marks {
            if self.seen.get(node).is_none_or(|s| s.mark != *mark) {
                let s = Seen {
                    mark: mark.clone(),
                    at: answered,
                    counts_from: answered,
                };
                self.seen.insert(node.clone(), s);
            }
        }
    }

    /// How long `node` had gone without a renewal at the last look (since this
    /// controller's start for a node never seen); None before any look answered.
    ///
    /// Judged on the looks, never on when it is asked: a renewal made after the last look
    /// may have kept the node from fencing, and a long round deciding on an old look must
    /// not count it as missed. A look asked after a lease had run out would have shown any
    /// renewal made before it ran out.
    fn unrenewed(&self, node: &str) -> Option<Duration> {
        let since = self.seen.get(node).map_or(self.start, |s| s.counts_from);
        Some(self.looked?.saturating_duration_since(since))
    }

    /// When the look that showed `node`'s last renewal answered, if one did.
    fn last_seen(&self, node: &str) -> Option<Instant> {
        self.seen.get(node).map(|s| s.at)
    }
}

/// What the controller knows of the kubelets' own Leases (`kube-node-lease/<node>`).
///
/// In Kubernetes, berth's node plugin (and the fence keeper in its container) can die
/// while its host, and the database on it, live on: a crash loop, an OOM kill, a slow
/// DaemonSet update. Nothing fences that node's volumes then, so its lapsed berth lease
/// alone must not fail them over. The kubelet renews its own Lease every quarter of its
/// duration (10 s by default) as long as the host runs, so a node's volumes fail over on
/// lease expiry only once the kubelet's renewals stopped too.
///
/// A kubelet is judged only on what the looks showed, never on the time a decision is
/// made: a decision that comes late in a round, or a list that was slow, must not turn a
/// renewal nobody looked for into a death.
struct Kubelets {
    /// The kubelets' renewal marks, as the looks showed them.
    looks: Looks,
    /// The grace of each kubelet Lease at the last look (one gone with its Node is not
    /// here).
    grace: BTreeMap<String, Duration>,
    /// Why the last look failed: then no host can be said dead.
    failed: Option<String>,
}

impl Kubelets {
    fn new(tolerance: Duration) -> Self {
        Kubelets {
            looks: Looks::new(tolerance),
            grace: BTreeMap::new(),
            failed: None,
        }
    }

    /// Takes in one look at the kubelets' Leases, asked at `asked` and answered at
    /// `answered` ([`Looks::take_in`]).
    fn observe(
        &mut self,
        look: Result<BTreeMap<String, KubeletLease>>,
        asked: Instant,
        answered: Instant,
    ) {
        let leases = match look {
            Ok(l) => l,
            Err(e) => {
                if self.failed.is_none() {
                    tracing::warn!(error = %e, "cannot read the kubelets' Leases: no node fails over on its lease alone until they are read");
                }
                self.failed = Some(e.to_string());
                self.looks.failed();
                return;
            }
        };
        self.failed = None;
        self.looks
            .take_in(leases.iter().map(|(n, l)| (n, &l.mark)), asked, answered);
        self.grace = leases
            .iter()
            .map(|(n, l)| (n.clone(), kubelet_grace(l.duration_secs)))
            .collect();
    }

    /// Why `node`'s host may still live: the last look, asked within the grace of its
    /// kubelet's last renewal seen, could not have shown a later one; or the last look
    /// failed. A kubelet is dead only once a look asked after the grace ran out showed
    /// no renewal. None for a node without a kubelet Lease (not a Kubernetes Node, or
    /// outside Kubernetes): it has no say here.
    fn may_live(&self, node: &str) -> Option<String> {
        if let Some(e) = &self.failed {
            return Some(format!("the kubelets' Leases cannot be read ({e})"));
        }
        let grace = self.grace.get(node)?;
        (self.looks.unrenewed(node)? <= *grace)
            .then(|| "the node's kubelet still renews its own Lease".to_string())
    }
}

/// How long after a kubelet renewal was seen the kubelet still counts as alive: its
/// renewal interval (a quarter of its Lease's duration, 10 s by default), plus 2 s for the
/// kubelet's jitter (4 % of the interval), the second between two looks, and the write and
/// the list in between. A host that dies is so found dead 2-14 s later by default (its
/// last renewal 0-10.4 s before the death, seen up to a look later, and the grace run out
/// at the next look), against 8-11 s by berth's own lease. One missed kubelet renewal is
/// not tolerated: a grace that did would put a failover past 20 s, and it matters only
/// while berth's plugin on that node is down as well.
fn kubelet_grace(duration_secs: u32) -> Duration {
    Duration::from_secs(u64::from(duration_secs)) / 4 + Duration::from_secs(2)
}

/// How many failover rounds (half a lease period each) between two looks at the Nodes'
/// out-of-service taints.
const TAINT_EVERY: u64 = 3;

/// How many times, 50 ms apart, a failover round tries a volume's lock before it leaves
/// the volume to the next round.
const LOCK_TRIES: u32 = 10;

/// How often releasing a lost node's pods and attachment is tried.
const RELEASE_ATTEMPTS: u32 = 4;

/// Who asked for a failover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The controller, on lease expiry: only volumes with `failover: auto`.
    Lease,
    /// An operator (`berth promote`, `berth node-gone`): any replicated volume.
    Operator,
}

/// The kept snapshot of a demoted copy: one name per volume, node and epoch, so a retry
/// finds the one it made.
fn kept_name(vol: &str, node: &str, epoch: u64) -> String {
    format!("berth-diverged-{vol}-{node}-epoch-{epoch}")
}

impl Cluster {
    /// One round of the failover loop: fail over what lost nodes held, finish failovers a
    /// crash left half-way, demote stale copies of nodes that came back, resume copies
    /// fenced by a lapse that cost nothing.
    pub async fn failover_round(&self) -> Result<()> {
        let Some(live) = &self.liveness else {
            return Ok(());
        };
        // Every round, for the kubelets' renewals to be timed to a round; before the
        // marks, so that an outage that keeps them from being read is one for both.
        self.look_at_kubelets(live).await;
        // Every record is read only when there may be something to do: a lost node, a
        // copy fenced by a lapse, or every tenth round (a promotion a crash left
        // unmade).
        live.refresh().await?;
        let round = live
            .rounds
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        live.forget_told();
        if let Some(api) = &self.events {
            // Kubernetes' non-graceful shutdown signal, every few rounds: a list of every
            // Node.
            if round % TAINT_EVERY == 0 {
                match api.out_of_service_nodes().await {
                    Ok(nodes) => live.set_out_of_service(nodes),
                    Err(e) => tracing::warn!(error = %e, "cannot list out-of-service nodes"),
                }
            }
        }
        let lost = self.node_ids().iter().any(|n| live.lost(n));
        let fenced = self
            .answering()
            .iter()
            .any(|(_, inv)| inv.volumes.iter().any(|c| c.suspended));
        if !lost && !fenced && round % 10 != 0 {
            return Ok(());
        }
        // The records first, then the marks: a node that renewed and whose volume was
        // resumed (a record write after the renewal's) is seen renewed by any decision
        // made on a record read after that write (docs/moving.md).
        let records = placement::all(self.store.as_ref()).await?;
        live.refresh().await?;
        // The primary copies the answering nodes hold, by volume, and whether each node's
        // lease holds: one pass over the inventories, not one per record.
        let mut primaries: HashMap<String, Vec<Held>> = HashMap::new();
        for (node, inv) in self.answering() {
            for c in inv
                .volumes
                .iter()
                .filter(|c| c.role == pb::Role::Primary as i32)
            {
                primaries
                    .entry(c.volume_id.clone())
                    .or_default()
                    .push(Held {
                        node: node.clone(),
                        epoch: c.epoch,
                        suspended: c.suspended,
                        lease_lapsed: inv.lease_lapsed,
                    });
            }
        }
        for r in records {
            if r.record.phase != PlacementPhase::Ready {
                continue;
            }
            let vol = match VolumeId::parse(&r.record.volume_id) {
                Some(v) => v,
                None => continue,
            };
            let held = primaries.get(vol.as_str()).map_or(&[][..], Vec::as_slice);
            let result = self.settle_one(&vol, r, held, live).await;
            if let Err(e) = result {
                // Every second until it can: a returning node still attached, say.
                tracing::info!(volume.id = %vol, error = %e, "failover step not done; retrying next round");
            }
        }
        Ok(())
    }

    /// One look at the kubelets' Leases, in Kubernetes.
    async fn look_at_kubelets(&self, live: &Liveness) {
        if let Some(api) = &self.events {
            let asked = Instant::now();
            let look = within(
                live.timings.fence_after,
                "list the kubelets' Leases",
                api.kubelet_leases(),
            )
            .await;
            self.metrics.kubelet_leases_looked(look.is_ok());
            live.kubelets
                .lock()
                .expect("kubelets lock")
                .observe(look, asked, Instant::now());
        }
    }

    /// One record's step: `held` are the primary copies of the volume on answering nodes.
    async fn settle_one(
        &self,
        vol: &VolumeId,
        r: Versioned,
        held: &[Held],
        live: &Liveness,
    ) -> Result<()> {
        let rec = &r.record;
        if rec.handoff.is_some() {
            return Ok(());
        }
        let pending_promotion = rec.failover.is_some()
            && self
                .view(&rec.primary)
                .is_some_and(|inv| holds(&inv, vol, pb::Role::Replica));
        let lost = !rec.primary.is_empty() && live.lost(&rec.primary);
        let stale = held.iter().any(|h| h.stale(rec) || h.resumable(rec));
        if !lost && !pending_promotion && !stale {
            return Ok(());
        }
        // Only a volume with something to do is locked. A publish or round of it in
        // flight goes first: a short one is waited out (a loop on the same period as this
        // one would otherwise hold the lock at every look), a long one left to the next
        // round.
        let mut tries = 0;
        let _g = loop {
            match self.inflight.try_lock([vol.to_string()]) {
                Ok(g) => break g,
                Err(_) if tries < LOCK_TRIES => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(_) => return Ok(()),
            }
        };
        if lost {
            if rec.replicas.is_empty() {
                self.tell_once(live, rec, "VolumeUnavailable", |node| {
                    format!("volume {} lives only on lost node {node} and has no replica: it cannot fail over, and comes back when node {node} does", rec.volume_id)
                });
                return Ok(());
            }
            // The node is lost by its lease alone: neither an operator nor the taint vouched
            // that it no longer writes.
            let by_lease = !live.gone.lock().expect("gone lock").contains(&rec.primary);
            let manual = Failover::of(&rec.parameters) == Failover::Manual;
            if let Some(why) = live.host_may_live(&rec.primary).filter(|_| by_lease) {
                let then = if manual {
                    "Once the node is found dead, `berth promote` fails it over (failover: manual)"
                } else {
                    "It fails over once the node is found dead"
                };
                self.tell_once(live, rec, "VolumeFailoverWaiting", |node| {
                    format!("berth's node plugin on node {node}, the primary of volume {}, stopped renewing its lease, but {why}: the database there may still be writing, unfenced, so the volume waits. {then}, when the Node is tainted node.kubernetes.io/out-of-service, or on `berth node-gone {node}`", rec.volume_id)
                });
                return Ok(());
            }
            if by_lease && manual {
                self.tell_once(live, rec, "VolumeFailoverWaiting", |node| {
                    format!("node {node}, the primary of volume {}, is lost; the volume has failover: manual, so it waits for `berth promote`", rec.volume_id)
                });
                return Ok(());
            }
            return self
                .fail_over(vol, r, None, Trigger::Lease)
                .await
                .map(|_| ());
        }
        // A promotion recorded and not yet made (a crash between the two).
        if let Some(f) = rec.failover.as_ref().filter(|_| pending_promotion) {
            self.promote_replica(vol, &rec.primary, rec.epoch, &f.snapshot)
                .await?;
            // The record keeps the cut to the second; the controller that recorded it is
            // gone with the exact time.
            let cut = f
                .snapshot_time
                .parse::<k8s_openapi::jiff::Timestamp>()
                .map_or(0, |t| t.as_nanosecond() as i64);
            self.announce(vol, rec, cut, live);
        }
        for h in held {
            if h.stale(rec) {
                self.demote(vol, rec, &h.node).await?;
            } else if h.resumable(rec) {
                self.resume(vol, &r, &h.node, h.epoch).await?;
            }
        }
        Ok(())
    }

    /// Makes `to` (default: the replica with the newest snapshot) the primary of `vol`
    /// in place of its lost primary: one compare-and-swap on the record read before the
    /// leases were, then the promotion on `to`. Returns the new primary.
    pub async fn fail_over(
        &self,
        vol: &VolumeId,
        r: Versioned,
        to: Option<&str>,
        trigger: Trigger,
    ) -> Result<String> {
        let live = self.liveness.as_ref().ok_or_else(|| {
            Error::FailedPrecondition("this controller keeps no node leases".into())
        })?;
        let rec = &r.record;
        let lost = rec.primary.clone();
        let mut candidates: Vec<(String, String, i64)> = Vec::new();
        for x in &rec.replicas {
            if x.snapshot.is_empty() || live.lost(&x.node) || to.is_some_and(|t| t != x.node) {
                continue;
            }
            let Some(inv) = self.view(&x.node) else {
                continue;
            };
            let Some(c) = inv
                .volumes
                .iter()
                .find(|c| c.volume_id == vol.as_str() && c.role == pb::Role::Replica as i32)
            else {
                continue;
            };
            if let Some(s) = c.shipping.iter().find(|s| s.snapshot_id == x.snapshot) {
                candidates.push((x.node.clone(), s.snapshot_id.clone(), s.created_unix_nanos));
            }
        }
        let Some((node, snapshot, cut)) = candidates.into_iter().max_by_key(|c| c.2) else {
            let why = if rec.replicas.is_empty() {
                format!(
                    "volume {vol} lives only on lost node {lost} and has no replica: it cannot fail over, and comes back when node {lost} does"
                )
            } else {
                format!(
                    "volume {vol} lost its primary node {lost}, and no replica of it answers with a complete snapshot{}",
                    to.map(|t| format!(" on node {t}")).unwrap_or_default()
                )
            };
            if trigger == Trigger::Lease {
                self.tell_once(live, rec, "VolumeUnavailable", |_| why.clone());
            }
            return Err(Error::FailedPrecondition(why));
        };
        let mut next = rec.clone();
        next.primary = node.clone();
        next.epoch += 1;
        next.replicas.retain(|x| x.node != node && x.node != lost);
        next.failover = Some(FailedOver {
            from: lost.clone(),
            snapshot: snapshot.clone(),
            snapshot_time: monitor::rfc3339(cut),
            at: monitor::rfc3339(now_nanos()),
        });
        // A controller that decided from the same record and writes later loses here.
        failpoint::hit("failover:before-record");
        let written = self.store.replace(&next, &r.version).await?;
        failpoint::hit("failover:after-record");
        tracing::warn!(volume.id = %vol, from = %lost, to = %node, epoch = next.epoch, snapshot.id = %snapshot, "volume failed over from a lost node");
        self.metrics.failed_over(&lost);
        self.promote_replica(vol, &node, next.epoch, &snapshot)
            .await?;
        self.announce(vol, &written.record, cut, live);
        Ok(node)
    }

    /// Once the new primary is promoted: the `VolumeFailedOver` Event, with the writes
    /// lost (from the snapshot's cut at `cut` to when the lost node was last heard from),
    /// and Kubernetes' side. Also after a promotion a crashed controller left unmade, so
    /// that its pod is released all the same.
    fn announce(&self, vol: &VolumeId, rec: &VolumePlacement, cut: i64, live: &Liveness) {
        let Some(f) = &rec.failover else {
            return;
        };
        let (lost, node) = (&f.from, &rec.primary);
        let rpo = live
            .last_seen(lost)
            .map(|at| {
                let seen = now_nanos() - at.elapsed().as_nanos() as i64;
                format!(
                    "{:.1}",
                    Duration::from_nanos((seen - cut).max(0) as u64).as_secs_f64()
                )
            })
            .unwrap_or_else(|| "an unknown number of".into());
        tracing::info!(volume.id = %vol, from = %lost, to = %node, rpo_seconds = %rpo, "failover complete: the new primary serves");
        self.pvc_event(
            monitor::claim(&rec.claim),
            "VolumeFailedOver",
            format!(
                "node {lost} was lost; volume {vol} now lives on node {node} (epoch {}), from snapshot {} cut at {}: up to {rpo} s of writes on node {lost} before it was last heard from are not in it",
                rec.epoch,
                f.snapshot,
                monitor::rfc3339(cut)
            ),
            true,
        );
        self.after_failover(vol, lost);
    }

    /// Kubernetes' side of a failover: the pods still on the lost node that use the
    /// volume are force-deleted and its attachment there goes, so the workload restarts
    /// elsewhere now rather than after Kubernetes' 6-minute forced detach. In the
    /// background, retried a few times: the volume already serves on its new node.
    pub(super) fn after_failover(&self, vol: &VolumeId, lost: &str) {
        let Some(api) = self.events.clone() else {
            return;
        };
        let (vol, lost) = (vol.to_string(), lost.to_string());
        tokio::spawn(async move {
            for attempt in 1..=RELEASE_ATTEMPTS {
                match api.release_from_node(&vol, &lost).await {
                    Ok(r) => {
                        tracing::info!(volume.id = %vol, node = %lost, pods = ?r.pods, attachments = ?r.attachments, "released the failed-over volume's hold on the lost node");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(volume.id = %vol, node = %lost, attempt, error = %e, "cannot release the lost node's hold yet");
                        tokio::time::sleep(Duration::from_secs(2 << attempt)).await;
                    }
                }
            }
        });
    }

    async fn promote_replica(
        &self,
        vol: &VolumeId,
        node: &str,
        epoch: u64,
        snapshot: &str,
    ) -> Result<()> {
        self.agent(node)?
            .promote(pb::PromoteRequest {
                volume_id: vol.to_string(),
                epoch,
                snapshot_id: snapshot.to_string(),
            })
            .await
            .map_err(|s| peer(node, s))?;
        tracing::info!(volume.id = %vol, node, epoch, "replica promoted after a failover");
        Ok(())
    }

    /// A lost node is back with a stale copy of `vol`: it keeps what it held as a snapshot
    /// and follows the new primary. The record gains the snapshot and the replica, and
    /// forgets the failover.
    async fn demote(&self, vol: &VolumeId, rec: &VolumePlacement, node: &str) -> Result<()> {
        let name = kept_name(vol.as_str(), node, rec.epoch);
        let kept = self
            .agent(node)?
            .demote(pb::DemoteRequest {
                volume_id: vol.to_string(),
                epoch: rec.epoch,
                new_primary_node_id: rec.primary.clone(),
                kept_snapshot_name: name,
            })
            .await
            .map_err(|s| peer(node, s))?
            .into_inner()
            .kept;
        let (node_s, primary) = (node.to_string(), rec.primary.clone());
        let kept2 = kept.clone();
        let written = self
            .update_record(vol, |r| {
                if let Some(k) = &kept2
                    && !r
                        .snapshots
                        .iter()
                        .any(|s| s.snapshot_id == k.snapshot_id && s.node == node_s)
                {
                    r.snapshots.push(placement::SnapshotPlacement {
                        snapshot_id: k.snapshot_id.clone(),
                        node: node_s.clone(),
                        size_bytes: k.size_bytes,
                        created_unix_nanos: now_nanos(),
                        group_snapshot_id: String::new(),
                    });
                }
                if r.failover.as_ref().is_some_and(|f| f.from == node_s) {
                    r.failover = None;
                }
            })
            .await?;
        tracing::warn!(volume.id = %vol, node, new_primary = %primary, kept = ?kept.as_ref().map(|k| &k.snapshot_id), "stale copy demoted; what it held is kept as a snapshot");
        if let Some(k) = kept {
            self.pvc_event(
                monitor::claim(&written.record.claim),
                "DivergedWritesKept",
                format!(
                    "node {node} came back with the copy of volume {vol} it held before the failover; it is kept as snapshot {} (it may hold writes made after the snapshot the volume failed over from), and node {node} now follows node {primary}",
                    k.snapshot_id
                ),
                true,
            );
        }
        Ok(())
    }

    /// `node`'s lease lapsed and came back while the record still names it: its fenced
    /// copy of `vol` is given back. The record's epoch is raised first, by compare-and-swap,
    /// so that a controller that decided to fail the volume over from an older read loses
    /// its write; the node then serves at the new epoch.
    async fn resume(&self, vol: &VolumeId, r: &Versioned, node: &str, held: u64) -> Result<()> {
        let epoch = if held < r.record.epoch {
            r.record.epoch
        } else {
            let mut next = r.record.clone();
            next.epoch += 1;
            self.store.replace(&next, &r.version).await?.record.epoch
        };
        self.agent(node)?
            .resume(pb::ResumeRequest {
                volume_id: vol.to_string(),
                epoch,
            })
            .await
            .map_err(|s| peer(node, s))?;
        tracing::info!(volume.id = %vol, node, epoch, "volume resumed after a lease lapse: no failover happened");
        Ok(())
    }

    /// `berth promote`: fails `vol` over to `to` (or its freshest replica), which only a
    /// lost primary allows: a live one hands off by a move instead.
    pub async fn promote_by_hand(&self, vol: &VolumeId, to: Option<&str>) -> Result<String> {
        let live = self.liveness.as_ref().ok_or_else(|| {
            Error::FailedPrecondition("this controller keeps no node leases".into())
        })?;
        let _g = self.inflight.try_lock([vol.to_string()])?;
        let r = self
            .store
            .get(vol)
            .await?
            .ok_or_else(|| Error::VolumeNotFound(vol.to_string()))?;
        live.refresh().await?;
        let rec = &r.record;
        if to == Some(rec.primary.as_str()) {
            return Ok(rec.primary.clone());
        }
        if rec.phase != PlacementPhase::Ready || rec.handoff.is_some() {
            return Err(Error::FailedPrecondition(format!(
                "volume {vol} is {:?}{}; promote it once that is over",
                rec.phase,
                if rec.handoff.is_some() {
                    " and moving"
                } else {
                    ""
                }
            )));
        }
        if !live.lost(&rec.primary) {
            return Err(Error::FailedPrecondition(format!(
                "node {}, the primary of volume {vol}, still holds its lease; publish the volume elsewhere to move it, or declare the node gone (`berth node-gone`) if it is and you have stopped it",
                rec.primary
            )));
        }
        // A fresh look: on a controller that does not lead, the first one, and the host
        // counts as alive until a later look shows otherwise.
        self.look_at_kubelets(live).await;
        if let Some(why) = live.host_may_live(&rec.primary) {
            return Err(Error::FailedPrecondition(format!(
                "berth's node plugin on node {}, the primary of volume {vol}, stopped renewing its lease, but {why}: the database there may still be writing, unfenced. Stop the node, then declare it gone (`berth node-gone`) or taint it node.kubernetes.io/out-of-service",
                rec.primary
            )));
        }
        self.fail_over(vol, r, to, Trigger::Operator).await
    }

    /// `berth node-gone`: `node` is lost from now on, and every replicated volume whose
    /// primary it held fails over at once. Returns what failed over and what could not.
    pub async fn declare_gone(&self, node: &str) -> Result<(Vec<String>, Vec<String>)> {
        self.member(node)?;
        let live = self.liveness.as_ref().ok_or_else(|| {
            Error::FailedPrecondition("this controller keeps no node leases".into())
        })?;
        live.declare_gone(node);
        tracing::warn!(node, "node declared gone by an operator");
        let (mut done, mut left) = (Vec::new(), Vec::new());
        for r in placement::all(self.store.as_ref()).await? {
            if r.record.primary != node || r.record.phase != PlacementPhase::Ready {
                continue;
            }
            let Some(vol) = VolumeId::parse(&r.record.volume_id) else {
                continue;
            };
            let _g = match self.inflight.try_lock([vol.to_string()]) {
                Ok(g) => g,
                Err(e) => {
                    left.push(format!("{vol}: {e}"));
                    continue;
                }
            };
            match self.fail_over(&vol, r, None, Trigger::Operator).await {
                Ok(to) => done.push(format!("{vol} -> {to}")),
                Err(e) => left.push(format!("{vol}: {e}")),
            }
        }
        Ok((done, left))
    }

    /// An Event, once per volume, lost node and message while the node stays lost.
    fn tell_once(
        &self,
        live: &Liveness,
        rec: &VolumePlacement,
        reason: &'static str,
        message: impl Fn(&str) -> String,
    ) {
        let m = message(&rec.primary);
        let key = (rec.volume_id.clone(), rec.primary.clone(), m.clone());
        if live.told.lock().expect("told lock").insert(key) {
            tracing::warn!(volume.id = %rec.volume_id, "{m}");
            self.pvc_event(monitor::claim(&rec.claim), reason, m, true);
        }
    }
}

/// A primary copy of a volume on an answering node, from its last inventory.
struct Held {
    node: String,
    epoch: u64,
    suspended: bool,
    /// The node's own lease has lapsed.
    lease_lapsed: bool,
}

impl Held {
    /// A primary the record has moved past: a failover happened while its node was away.
    fn stale(&self, rec: &VolumePlacement) -> bool {
        self.node != rec.primary && self.epoch < rec.epoch
    }

    /// Fenced by a lapse that cost nothing: the record still names it, and its node's
    /// lease holds again.
    fn resumable(&self, rec: &VolumePlacement) -> bool {
        self.node == rec.primary && self.suspended && !self.lease_lapsed
    }
}

/// `look` (named `what`), or a timeout once `limit` has passed.
async fn within<T>(
    limit: Duration,
    what: &str,
    look: impl Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(limit, look).await.unwrap_or_else(|_| {
        Err(Error::Timeout {
            command: what.to_string(),
            timeout: limit,
        })
    })
}

fn holds(inv: &pb::InventoryResponse, vol: &VolumeId, role: pb::Role) -> bool {
    inv.volumes
        .iter()
        .any(|c| c.volume_id == vol.as_str() && c.role == role as i32)
}

fn now_nanos() -> i64 {
    crate::storage::now_nanos() as i64
}

/// Runs [`Cluster::failover_round`] twice per lease period while this controller leads.
pub async fn failover_loop(
    cluster: Arc<Cluster>,
    leader: tokio::sync::watch::Receiver<bool>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let Some(period) = cluster.liveness.as_ref().map(|l| l.timings.period / 2) else {
        return;
    };
    let mut tick = ticker(period);
    while next_tick(&mut tick, &mut shutdown).await {
        if !*leader.borrow() {
            continue;
        }
        if let Err(e) = cluster.failover_round().await {
            tracing::warn!(error = %e, "failover round failed");
        }
    }
}

/// Renews every node's lease once per lease period, when that is the controller's job.
/// Each node on its own: a silent node's renewal waits out its deadline without delaying
/// anyone else's, since a late renewal brings a live node closer to fencing itself.
pub async fn renewal_loop(cluster: Arc<Cluster>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let Some(live) = &cluster.liveness else {
        return;
    };
    if !live.store.renewed_by_controller() {
        return;
    }
    let period = live.timings.period;
    let running: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let mut tick = ticker(period);
    while next_tick(&mut tick, &mut shutdown).await {
        for node in cluster.node_ids() {
            if !running.lock().expect("renewals lock").insert(node.clone()) {
                continue;
            }
            let (cluster, running) = (cluster.clone(), running.clone());
            tokio::spawn(async move {
                if let (Some(live), Ok(m)) = (&cluster.liveness, cluster.member(&node)) {
                    let mut c = pb::agent_client::AgentClient::new(m.channel);
                    let _ = tokio::time::timeout(period, live.renew(&node, &mut c)).await;
                }
                running.lock().expect("renewals lock").remove(&node);
            });
        }
    }
}

/// A tick every `period`; a late one is not made up for.
fn ticker(period: Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

/// Waits for the next tick; false once the controller shuts down.
async fn next_tick(
    tick: &mut tokio::time::Interval,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) -> bool {
    tokio::select! {
        _ = tick.tick() => {}
        _ = shutdown.changed() => return false,
    }
    !*shutdown.borrow()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leases(mark: Option<u32>, duration_secs: u32) -> Result<BTreeMap<String, KubeletLease>> {
        Ok(mark
            .map(|m| {
                (
                    "a".to_string(),
                    KubeletLease {
                        mark: m.to_string(),
                        duration_secs,
                    },
                )
            })
            .into_iter()
            .collect())
    }

    /// Renewal marks a test sets, or fails to give.
    #[derive(Default)]
    struct Marks {
        marks: Mutex<BTreeMap<String, String>>,
        failing: std::sync::atomic::AtomicBool,
        hanging: std::sync::atomic::AtomicBool,
    }

    #[async_trait]
    impl LeaseStore for Marks {
        fn renewed_by_controller(&self) -> bool {
            false
        }
        async fn renew(&self, _: &str) -> Result<()> {
            unreachable!()
        }
        async fn marks(&self) -> Result<BTreeMap<String, String>> {
            if self.hanging.load(std::sync::atomic::Ordering::Relaxed) {
                std::future::pending::<()>().await;
            }
            if self.failing.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(Error::Unreachable {
                    node: "api".into(),
                    reason: "down".into(),
                });
            }
            Ok(self.marks.lock().unwrap().clone())
        }
    }

    fn short_leases() -> (Arc<Marks>, Liveness) {
        let store = Arc::new(Marks::default());
        store.marks.lock().unwrap().insert("a".into(), "1".into());
        let timings = LeaseTimings {
            period: Duration::from_millis(100),
            duration: Duration::from_millis(500),
            fence_after: Duration::from_millis(300),
        };
        (store.clone(), Liveness::new(store, timings))
    }

    /// A node is lost only once a look asked more than the lease duration after the look
    /// that showed its last renewal shows no newer one. A decision made later than the
    /// look (a long failover round) cannot count a renewal made after the look as missed:
    /// that renewal may have come before the node's fence, and kept it unfenced.
    #[tokio::test]
    async fn a_lease_lapses_by_the_looks_not_by_when_it_is_asked_about() {
        let (store, live) = short_leases();
        live.refresh().await.unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(!live.lost("a"), "nothing looked at since the renewal");
        live.refresh().await.unwrap();
        assert!(live.lost("a"), "a look 700 ms on shows no renewal");
        store.marks.lock().unwrap().insert("a".into(), "2".into());
        live.refresh().await.unwrap();
        assert!(!live.lost("a"), "renewed");
    }

    /// Looks that fail every other time do not hold a lease back: only blind time beyond
    /// a lease period is set aside.
    #[tokio::test]
    async fn looks_that_fail_now_and_then_do_not_hold_a_lease_back() {
        use std::sync::atomic::Ordering::Relaxed;
        let (store, live) = short_leases();
        live.refresh().await.unwrap();
        let started = Instant::now();
        while !live.lost("a") {
            assert!(started.elapsed() < Duration::from_secs(2), "never lost");
            let failing = !store.failing.load(Relaxed);
            store.failing.store(failing, Relaxed);
            let _ = live.refresh().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Time the controller could not look (the API server down, or frozen: a look that
    /// takes longer than fence-after fails) does not count towards a lease's expiry:
    /// every node's renewals failed then too, and a node is judged again only on looks
    /// after it, with what was left of its lease before.
    #[tokio::test]
    async fn time_the_controller_could_not_look_does_not_count() {
        use std::sync::atomic::Ordering::Relaxed;
        let (store, live) = short_leases();
        live.refresh().await.unwrap();
        let seen = Instant::now();
        store.failing.store(true, Relaxed);
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            live.refresh().await.unwrap_err();
        }
        store.failing.store(false, Relaxed);
        store.hanging.store(true, Relaxed);
        for _ in 0..4 {
            let e = live.refresh().await.unwrap_err();
            assert!(e.to_string().contains("did not finish"), "{e}");
        }
        store.hanging.store(false, Relaxed);
        live.refresh().await.unwrap();
        assert!(!live.lost("a"), "the time without looks does not count");
        // The renewal was seen when it was (the writes a failover loses count from it),
        // whatever time was set aside.
        assert!(live.last_seen("a").unwrap() <= seen);
        tokio::time::sleep(Duration::from_millis(600)).await;
        live.refresh().await.unwrap();
        assert!(live.lost("a"), "600 ms of looks without a renewal do");
    }

    /// A kubelet counts as alive until a look asked more than a quarter of its Lease's
    /// duration plus 2 s after the look that showed its last renewal answered, still
    /// shows no newer one; never by the Lease's own times, nor by when it is asked about.
    #[test]
    fn a_host_may_live_while_its_kubelet_renews_its_lease() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        // (what, looks as (asked, answered, a's mark or no Lease) in ms, duration, alive)
        type Look = (u64, u64, Option<u32>);
        let cases: [(&str, Vec<Look>, u32, bool); 8] = [
            ("never seen", vec![(0, 100, None)], 40, false),
            ("just seen", vec![(0, 100, Some(1))], 40, true),
            (
                "unchanged at a look asked 11.9 s after: 12 s of grace",
                vec![(0, 100, Some(1)), (12_000, 12_100, Some(1))],
                40,
                true,
            ),
            (
                "unchanged at a look asked 12.1 s after",
                vec![(0, 100, Some(1)), (12_200, 12_300, Some(1))],
                40,
                false,
            ),
            (
                "a slow look that showed the renewal counts from its answer",
                vec![(0, 3_000, Some(1)), (14_900, 15_000, Some(1))],
                40,
                true,
            ),
            (
                "a changed mark is a renewal",
                vec![
                    (0, 100, Some(1)),
                    (10_000, 10_100, Some(2)),
                    (13_000, 13_100, Some(2)),
                ],
                40,
                true,
            ),
            (
                "a 10 s Lease: 4.5 s of grace",
                vec![(0, 100, Some(1)), (4_700, 4_800, Some(1))],
                10,
                false,
            ),
            (
                "a Lease deleted with its Node",
                vec![(0, 100, Some(1)), (1_000, 1_100, None)],
                40,
                false,
            ),
        ];
        for (what, looks, duration, alive) in cases {
            let mut k = Kubelets::new(Duration::ZERO);
            for (asked, answered, mark) in looks {
                k.observe(leases(mark, duration), ms(asked), ms(answered));
            }
            assert_eq!(k.may_live("a").is_some(), alive, "{what}");
        }
        // A failed look says nothing of any host: none counts as dead until one succeeds.
        let mut k = Kubelets::new(Duration::ZERO);
        k.observe(
            Err(Error::Unreachable {
                node: "api".into(),
                reason: "down".into(),
            }),
            t0,
            t0,
        );
        let why = k.may_live("b").expect("unknown");
        assert!(why.contains("cannot be read"), "{why}");
        k.observe(leases(None, 40), ms(61_000), ms(61_100));
        assert_eq!(k.may_live("b"), None);
        // Nor does the time the looks failed count against a kubelet (its renewals most
        // likely failed too): 5.9 s of looks before the outage, then 6.5 s after it.
        let mut k = Kubelets::new(Duration::ZERO);
        k.observe(leases(Some(1), 40), ms(0), ms(100));
        k.observe(leases(Some(1), 40), ms(6_000), ms(6_100));
        let down = || {
            Err(Error::Unreachable {
                node: "api".into(),
                reason: "down".into(),
            })
        };
        k.observe(down(), ms(7_000), ms(7_000));
        k.observe(leases(Some(1), 40), ms(60_000), ms(60_100));
        assert!(k.may_live("a").is_some(), "the outage does not count");
        k.observe(leases(Some(1), 40), ms(66_500), ms(66_600));
        assert!(
            k.may_live("a").is_none(),
            "12.4 s of looks without a renewal do"
        );
    }

    /// At the kubelet's own timings (a 40 s Lease renewed every 10 s with up to 4 %
    /// jitter, each write landing 0.6 s later) and a look every second taking 0.3 s, a
    /// live kubelet is never taken for dead, and a dead one is within 14 s.
    #[test]
    fn a_kubelet_at_its_default_timings_is_dead_only_once_it_stopped() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        // Renewals made at these times, the last one 0.4 s late, each visible 600 ms on.
        let renewals = [0u64, 10_400, 20_800, 31_200];
        let died = 31_200 + 1;
        let mut k = Kubelets::new(Duration::ZERO);
        let mut found_dead = None;
        for look in 0..60u64 {
            let asked = look * 1000;
            let mark = renewals.iter().filter(|r| *r + 600 <= asked).count() as u32;
            k.observe(leases(Some(mark), 40), ms(asked), ms(asked + 300));
            let alive = k.may_live("a").is_some();
            if asked < died + 10_400 {
                assert!(alive, "live at the look asked at {asked} ms");
            }
            if !alive && found_dead.is_none() {
                found_dead = Some(asked - died);
            }
        }
        let after = found_dead.expect("found dead");
        assert!(
            (10_000..=14_000).contains(&after),
            "{after} ms after the death"
        );
    }
}
