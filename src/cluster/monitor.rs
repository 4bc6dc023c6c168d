//! What the controller knows of each node between calls: its last inventory (free space,
//! copies, publishes), from a background poll. Placement reads free space here instead of
//! asking every node on every CreateVolume, and a node that stopped answering is known to be
//! silent: placement skips it, and a call about a volume it holds fails at once, naming it,
//! instead of waiting out a timeout.
//!
//! The poll is also where volumes made before placement records existed are adopted into
//! records (once per node, the first time it answers), and where Events tell the claims of
//! a node's volumes that it went silent or came back.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use futures::future::join_all;

use super::{Cluster, peer};
use crate::{
    error::{Error, Result},
    placement::{self, Handoff, PlacementPhase, ReplicaPlacement, VolumePlacement},
    proto::agent::v1::{self as pb, agent_client::AgentClient},
    storage::VolumeId,
};

/// How often every node is asked for its inventory. Short, because it bounds how long a
/// silent node is still offered to new volumes, and how stale ListVolumes' publishes are.
pub const POLL_PERIOD: Duration = Duration::from_secs(2);

/// A node that has not answered a poll within this long is silent. A killed node refuses
/// the connection at once; a frozen one (SIGSTOP) or one cut off keeps the connection open
/// and says nothing, so only a deadline tells. Long enough for a loaded node's inventory.
pub const POLL_TIMEOUT: Duration = Duration::from_secs(3);

/// The controller's last knowledge of one node.
#[derive(Debug, Clone, Default)]
pub struct NodeView {
    /// The last inventory it answered with.
    pub inventory: Option<Arc<pb::InventoryResponse>>,
    /// Why its last poll failed; none while it answers.
    pub silent: Option<String>,
}

/// The reserved record that lists the nodes whose volumes were adopted. Its name holds a
/// control character, which no CreateVolume name may (`convert::name`), so no volume can
/// have its id.
pub fn adoption_mark() -> VolumeId {
    VolumeId::for_name("\u{1}berth: nodes adopted into placement records")
}

impl Cluster {
    /// Why `node` is silent, if its last poll failed.
    pub fn silent(&self, node: &str) -> Option<String> {
        self.views
            .read()
            .expect("views lock poisoned")
            .get(node)
            .and_then(|v| v.silent.clone())
    }

    /// Why `node` cannot be asked now, if it cannot: a node the monitor knows to be silent
    /// is polled once more first (at most [`POLL_TIMEOUT`]), so that one back from a restart
    /// is not refused until the next round of polls.
    pub async fn reachable(&self, node: &str) -> Option<String> {
        self.silent(node)?;
        self.poll(node).await;
        self.silent(node)
    }

    /// The last inventories of the nodes that answered their last poll.
    pub fn answering(&self) -> Vec<(String, Arc<pb::InventoryResponse>)> {
        let members: BTreeSet<String> = self.node_ids().into_iter().collect();
        self.views
            .read()
            .expect("views lock poisoned")
            .iter()
            .filter(|(n, v)| v.silent.is_none() && members.contains(*n))
            .filter_map(|(n, v)| Some((n.clone(), v.inventory.clone()?)))
            .collect()
    }

    /// Every member's last inventory, silent or not (a member never heard from is an
    /// error in its slot).
    pub fn last_inventories(&self) -> Vec<(String, Result<pb::InventoryResponse>)> {
        let views = self.views.read().expect("views lock poisoned");
        self.node_ids()
            .into_iter()
            .map(|n| {
                let inv = views.get(&n).and_then(|v| v.inventory.clone());
                let r = inv.map(|i| (*i).clone()).ok_or_else(|| Error::Unreachable {
                    node: n.clone(),
                    reason: "not heard from yet".into(),
                });
                (n, r)
            })
            .collect()
    }

    /// `node`'s last inventory, if it answered its last poll.
    pub fn view(&self, node: &str) -> Option<Arc<pb::InventoryResponse>> {
        let views = self.views.read().expect("views lock poisoned");
        let v = views.get(node)?;
        v.silent.is_none().then(|| v.inventory.clone()).flatten()
    }

    /// Asks `node` for its inventory now and records the answer. Returns whether the node
    /// changed between answering and silent.
    pub async fn poll(&self, node: &str) -> bool {
        // Uncounted in berth_agent_requests: that metric is the cost of CSI calls and
        // moves, and this poll runs whatever the CO does (berth_node_polls counts it).
        let answer = match self.member(node) {
            Ok(m) => {
                let mut c = AgentClient::new(m.channel)
                    .max_decoding_message_size(crate::agent::transfer::MAX_MESSAGE);
                match tokio::time::timeout(POLL_TIMEOUT, c.inventory(pb::InventoryRequest {})).await
                {
                    Ok(Ok(r)) => Ok(r.into_inner()),
                    Ok(Err(s)) => Err(peer(node, s).to_string()),
                    Err(_) => Err(format!("no answer within {POLL_TIMEOUT:?}")),
                }
            }
            Err(e) => Err(e.to_string()),
        };
        self.metrics.node_polled(node, answer.is_ok());
        let mut views = self.views.write().expect("views lock poisoned");
        let v = views.entry(node.to_string()).or_default();
        let was_silent = v.silent.is_some() || v.inventory.is_none();
        match answer {
            Ok(inv) => {
                v.inventory = Some(Arc::new(inv));
                v.silent = None;
                was_silent
            }
            Err(reason) => {
                v.silent = Some(reason);
                !was_silent
            }
        }
    }

    /// Refreshes `node`'s view in the background (after a change there).
    pub fn repoll(self: &Arc<Self>, node: &str) {
        let (me, node) = (self.clone(), node.to_string());
        tokio::spawn(async move { me.poll(&node).await });
    }

    /// One round: poll every member, adopt what needs it, tell the claims of volumes on
    /// nodes that went silent or came back.
    pub async fn poll_all(&self) {
        let nodes = self.node_ids();
        let changed: Vec<String> = join_all(
            nodes
                .iter()
                .map(|n| async move { self.poll(n).await.then(|| n.clone()) }),
        )
        .await
        .into_iter()
        .flatten()
        .collect();
        self.views
            .write()
            .expect("views lock poisoned")
            .retain(|n, _| nodes.contains(n));
        if let Err(e) = self.adopt().await {
            tracing::warn!(error = %e, "adopting volumes into placement records failed; retrying with the next poll");
        }
        for node in changed {
            match self.silent(&node) {
                Some(reason) => {
                    tracing::warn!(
                        node,
                        reason,
                        "node is silent: calls about its volumes fail until it answers again"
                    );
                    self.tell_claims(&node, "NodeUnreachable", true, |vol| {
                        format!("node {node}, which holds a copy of volume {vol}, does not answer ({reason}); operations that need that copy fail until it does")
                    })
                    .await;
                }
                None => {
                    tracing::info!(node, "node answers");
                    self.tell_claims(&node, "NodeReachable", false, |vol| {
                        format!("node {node}, which holds a copy of volume {vol}, answers again")
                    })
                    .await;
                }
            }
        }
    }

    /// An Event on the claim of every volume with a copy on `node`.
    async fn tell_claims(
        &self,
        node: &str,
        reason: &'static str,
        warning: bool,
        message: impl Fn(&str) -> String,
    ) {
        if !self.has_events() {
            return;
        }
        let records = match placement::all(self.store.as_ref()).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "could not list placement records for Events");
                return;
            }
        };
        for r in records {
            let r = r.record;
            if r.is_live() && r.nodes().iter().any(|n| n == node) {
                self.pvc_event(claim(&r.claim), reason, message(&r.volume_id), warning);
            }
        }
    }

    /// Adopts the volumes of every answering node that was not adopted yet: volumes made
    /// before placement records existed get one, from what the nodes hold. A node is
    /// adopted once (the mark is in the store): after that, a copy without a record is a
    /// leftover, never a volume to bring back.
    pub async fn adopt(&self) -> Result<()> {
        if self.not_adopted().is_empty() {
            return Ok(());
        }
        let mark_id = adoption_mark();
        let mark = self.store.get(&mark_id).await?;
        let done: BTreeSet<String> = mark
            .as_ref()
            .map(|m| m.record.parameters.keys().cloned().collect())
            .unwrap_or_default();
        *self.adopted.write().expect("adopted lock poisoned") = done.clone();
        let answering = self.answering();
        let fresh: Vec<&(String, Arc<pb::InventoryResponse>)> = answering
            .iter()
            .filter(|(n, _)| !done.contains(n))
            .collect();
        if fresh.is_empty() {
            return Ok(());
        }
        // Primaries (and fenced copies, which are primaries mid hand-off) first, the highest
        // epoch of each volume winning; then the replicas join the records.
        let mut owners: BTreeMap<String, (String, pb::VolumeCopy)> = BTreeMap::new();
        for (node, inv) in &answering {
            for c in &inv.volumes {
                let role = pb::Role::try_from(c.role).unwrap_or(pb::Role::Unspecified);
                if !matches!(role, pb::Role::Primary | pb::Role::Fenced) {
                    continue;
                }
                let better = owners
                    .get(&c.volume_id)
                    .is_none_or(|(_, o)| c.epoch > o.epoch);
                if better {
                    owners.insert(c.volume_id.clone(), (node.clone(), c.clone()));
                }
            }
        }
        for (_, inv) in &fresh {
            for c in &inv.volumes {
                let Some(id) = VolumeId::parse(&c.volume_id) else {
                    continue;
                };
                if self.store.get(&id).await?.is_some() {
                    continue;
                }
                let Some((owner, primary)) = owners.get(&c.volume_id) else {
                    // A replica whose primary's node has not answered yet: adopted with it.
                    continue;
                };
                let replicas = answering
                    .iter()
                    .filter(|(n, _)| n != owner)
                    .filter_map(|(n, inv)| {
                        let r = inv.volumes.iter().find(|r| {
                            r.volume_id == c.volume_id && r.role == pb::Role::Replica as i32
                        })?;
                        Some(replica_of(n, r))
                    })
                    .collect();
                let record = VolumePlacement {
                    volume_id: primary.volume_id.clone(),
                    name: primary.name.clone(),
                    phase: PlacementPhase::Ready,
                    primary: owner.clone(),
                    epoch: primary.epoch,
                    replicas,
                    handoff: (primary.role == pb::Role::Fenced as i32).then(|| Handoff {
                        to: primary.fenced_to.clone(),
                        epoch: primary.fence_epoch,
                    }),
                    capacity_bytes: primary.capacity_bytes,
                    parameters: BTreeMap::new(),
                    claim: if primary.pvc_name.is_empty() {
                        String::new()
                    } else {
                        format!("{}/{}", primary.pvc_namespace, primary.pvc_name)
                    },
                    // From every answering node: a volume moves without its snapshots.
                    snapshots: snapshots_of(answering.iter(), &c.volume_id),
                    failover: None,
                };
                match self.store.create(&record).await {
                    Ok(_) | Err(Error::Conflict { .. }) => {
                        tracing::info!(volume.id = %id, primary = %owner, "volume adopted into a placement record");
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        // A record is made from the first node holding a copy of its volume, with that node's
        // snapshots; a volume's copies and snapshots can span nodes, adopted now or later
        // (a volume moves without its CSI snapshots, and leaves its old copy as a replica).
        // Every adopted node's share joins the record: its copy as a replica (a copy of a
        // higher epoch is then seen by the next look-up, which asks the record's nodes),
        // its snapshots where they are. Else a snapshot would be unknown (listed nowhere,
        // deleted as if gone, not restorable) and a copy never reached by a delete.
        for node_inv in &fresh {
            let (node, inv) = node_inv;
            let ids: BTreeSet<&str> = inv
                .volumes
                .iter()
                .map(|c| c.volume_id.as_str())
                .chain(inv.snapshots.iter().map(|s| s.source_volume_id.as_str()))
                .collect();
            for id in ids {
                let Some(vol) = VolumeId::parse(id) else {
                    continue;
                };
                let Some(cur) = self.store.get(&vol).await?.filter(|r| r.record.is_live()) else {
                    continue;
                };
                let copy = inv.volumes.iter().find(|c| c.volume_id == id);
                let named = |r: &VolumePlacement| {
                    &r.primary == node || r.replicas.iter().any(|x| &x.node == node)
                };
                let held = |r: &VolumePlacement, s: &placement::SnapshotPlacement| {
                    r.snapshots
                        .iter()
                        .any(|x| x.snapshot_id == s.snapshot_id && x.node == s.node)
                };
                let snaps = snapshots_of(std::iter::once(*node_inv), id);
                if (copy.is_none() || named(&cur.record))
                    && snaps.iter().all(|s| held(&cur.record, s))
                {
                    continue;
                }
                self.update_record(&vol, |r| {
                    if let Some(c) = copy
                        && !named(r)
                    {
                        r.replicas.push(replica_of(node, c));
                    }
                    for s in &snaps {
                        if !held(r, s) {
                            r.snapshots.push(s.clone());
                        }
                    }
                })
                .await?;
            }
        }
        // CSI snapshots whose volume has no record, and no copy on an answering node: the
        // volume was deleted before the upgrade and its snapshots kept (a VolumeSnapshot
        // outlives its claim), or its copies are on a node that has not answered. Only when
        // every member is adopted or answering is it the first, and the snapshots get a
        // record of a deleted volume, as DeleteVolume leaves one: listed, restorable,
        // deletable. Until then the node holding them is not adopted (a name or snapshot
        // without a record stays UNAVAILABLE, as it is anyway while a member is missing).
        let everyone = self
            .node_ids()
            .iter()
            .all(|n| done.contains(n) || answering.iter().any(|(a, _)| a == n));
        let mut waiting = BTreeSet::new();
        for (node, inv) in &fresh {
            for s in &inv.snapshots {
                let Some(vol) = VolumeId::parse(&s.source_volume_id) else {
                    continue;
                };
                if owners.contains_key(&s.source_volume_id) || self.store.get(&vol).await?.is_some()
                {
                    continue;
                }
                if !everyone {
                    waiting.insert(node.clone());
                    continue;
                }
                let record = VolumePlacement {
                    volume_id: s.source_volume_id.clone(),
                    // The volume's name is not known any more; its id stands in.
                    name: s.source_volume_id.clone(),
                    phase: PlacementPhase::Deleted,
                    snapshots: snapshots_of(answering.iter(), &s.source_volume_id),
                    ..Default::default()
                };
                match self.store.create(&record).await {
                    Ok(_) | Err(Error::Conflict { .. }) => {
                        tracing::info!(volume.id = %vol, "snapshots of a deleted volume adopted into a placement record");
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        let nodes: Vec<String> = fresh
            .iter()
            .map(|(n, _)| n.clone())
            .filter(|n| !waiting.contains(n))
            .collect();
        if nodes.is_empty() {
            return Ok(());
        }
        placement::upsert(self.store.as_ref(), &mark_id, |r| {
            let mut r = r.cloned().unwrap_or_else(|| VolumePlacement {
                volume_id: mark_id.to_string(),
                name: "adoption marks".into(),
                phase: PlacementPhase::Deleted,
                ..Default::default()
            });
            for n in &nodes {
                r.parameters.insert(n.clone(), "adopted".into());
            }
            Ok(r)
        })
        .await?;
        tracing::info!(nodes = ?nodes, "nodes adopted into placement records");
        self.adopted
            .write()
            .expect("adopted lock poisoned")
            .extend(nodes);
        Ok(())
    }

    /// Members whose volumes may not have records yet (they have not answered since
    /// records began). A name or id without a record may belong to one of them.
    pub fn not_adopted(&self) -> Vec<String> {
        let adopted = self.adopted.read().expect("adopted lock poisoned");
        self.node_ids()
            .into_iter()
            .filter(|n| !adopted.contains(n))
            .collect()
    }
}

/// The CSI snapshots of volume `id` that `invs` hold, with the node holding each.
fn snapshots_of<'a>(
    invs: impl Iterator<Item = &'a (String, Arc<pb::InventoryResponse>)>,
    id: &str,
) -> Vec<placement::SnapshotPlacement> {
    invs.flat_map(|(node, inv)| {
        inv.snapshots
            .iter()
            .filter(move |s| s.source_volume_id == id)
            .map(move |s| placement::SnapshotPlacement {
                snapshot_id: s.snapshot_id.clone(),
                node: node.clone(),
                size_bytes: s.size_bytes,
                created_unix_nanos: 0,
                group_snapshot_id: String::new(),
            })
    })
    .collect()
}

/// A replica's entry in a record, from its copy.
pub fn replica_of(node: &str, c: &pb::VolumeCopy) -> ReplicaPlacement {
    let newest = c.shipping.last();
    ReplicaPlacement {
        node: node.to_string(),
        snapshot: newest.map(|s| s.snapshot_id.clone()).unwrap_or_default(),
        snapshot_time: newest
            .map(|s| rfc3339(s.created_unix_nanos))
            .unwrap_or_default(),
    }
}

/// A Unix time in nanoseconds as RFC 3339 (what a CRD `date` column reads).
pub fn rfc3339(nanos: i64) -> String {
    k8s_openapi::jiff::Timestamp::from_nanosecond(i128::from(nanos))
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}

/// `namespace/name` as a claim, when set.
pub fn claim(s: &str) -> Option<(String, String)> {
    let (ns, name) = s.split_once('/')?;
    Some((ns.to_string(), name.to_string()))
}

/// Polls every node every [`POLL_PERIOD`] until shutdown.
pub async fn monitor_loop(cluster: Arc<Cluster>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(POLL_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => cluster.poll_all().await,
            _ = shutdown.changed() => return,
        }
        if *shutdown.borrow() {
            return;
        }
    }
}
