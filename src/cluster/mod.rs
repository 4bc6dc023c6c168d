//! The cluster controller: `berth controller --nodes FILE`. It owns no pool and keeps no
//! state of its own. Truth lives on the nodes, in the pool records that also hold the data:
//! a record and the image it describes change together, on one filesystem, so nothing a
//! controller could cache can be more current than asking the nodes. The controller
//! rebuilds its view from their inventories on every decision, places new volumes, routes
//! every CSI call to the node holding the data, and drives hand-offs and replication.

pub mod admin;
pub mod controller;
pub mod failover;
pub mod metadata;
pub mod monitor;
pub mod moves;
pub mod rounds;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    sync::{Arc, RwLock},
};

use futures::future::join_all;
use tonic::{Status, transport::Channel};

use crate::{
    error::{Error, Result},
    kube::ClusterApi,
    lease::LeaseTimings,
    metrics::{AgentChannel, Metrics},
    placement::{self, PlacementStore, Versioned, VolumePlacement},
    proto::{
        agent::v1::{self as pb, agent_client::AgentClient},
        csi::v1::{
            controller_client::ControllerClient, group_controller_client::GroupControllerClient,
        },
    },
    service::identity::Health,
    storage::{VolumeId, guard::InFlight},
    tls::TlsMaterial,
};

use crate::agent::transfer::MAX_MESSAGE;

#[derive(Debug, Clone)]
pub struct Member {
    pub address: String,
    channel: Channel,
}

/// The nodes this controller drives, and the connections to their agents.
pub struct Cluster {
    /// Changes when discovery sees nodes come and go (`set_members`).
    members: RwLock<BTreeMap<String, Member>>,
    tls: TlsMaterial,
    pub domain: String,
    /// One controller-level operation per volume: a publish that moves data and a
    /// replication round of the same volume must not interleave.
    pub inflight: InFlight,
    /// Where Events about volumes go (Kubernetes), if anywhere.
    events: Option<Arc<dyn ClusterApi>>,
    /// Every call to an agent, move and replication round is recorded here.
    pub metrics: Arc<Metrics>,
    /// The placement records: which nodes hold each volume, authoritative for ownership.
    pub store: Arc<dyn PlacementStore>,
    /// The last poll of each node (`monitor`).
    views: RwLock<BTreeMap<String, monitor::NodeView>>,
    /// Nodes whose volumes all have records (`monitor::adopt`).
    adopted: RwLock<BTreeSet<String>>,
    /// The nodes' leases, when this controller fails volumes over (`failover`).
    pub liveness: Option<failover::Liveness>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("nodes", &self.node_ids())
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

/// Parses a nodes file: one `node-id host:port` per line; blank lines and `#` comments
/// are ignored.
pub fn parse_nodes(text: &str) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let mut parts = line.split_whitespace();
        let (Some(id), Some(addr), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(Error::invalid(
                "nodes",
                format!("line {}: expected `node-id host:port`, got {line:?}", n + 1),
            ));
        };
        if out.insert(id.to_string(), addr.to_string()).is_some() {
            return Err(Error::invalid(
                "nodes",
                format!("line {}: node {id} is listed twice", n + 1),
            ));
        }
    }
    if out.is_empty() {
        return Err(Error::invalid("nodes", "the file lists no nodes"));
    }
    Ok(out)
}

impl Cluster {
    pub fn new(
        nodes: BTreeMap<String, String>,
        tls: &TlsMaterial,
        domain: String,
        events: Option<Arc<dyn ClusterApi>>,
        metrics: Arc<Metrics>,
        store: Arc<dyn PlacementStore>,
    ) -> Result<Cluster> {
        let c = Cluster {
            members: RwLock::default(),
            tls: tls.clone(),
            domain,
            inflight: InFlight::default(),
            events,
            metrics,
            store,
            views: RwLock::default(),
            adopted: RwLock::default(),
            liveness: None,
        };
        c.set_members(nodes)?;
        Ok(c)
    }

    pub fn load(
        path: &Path,
        tls: &TlsMaterial,
        domain: String,
        metrics: Arc<Metrics>,
        store: Arc<dyn PlacementStore>,
    ) -> Result<Cluster> {
        let text = std::fs::read_to_string(path).map_err(Error::io("read", path))?;
        Cluster::new(parse_nodes(&text)?, tls, domain, None, metrics, store)
    }

    /// Keeps the nodes' leases in `leases` and fails volumes over when one expires.
    pub fn with_leases(
        mut self,
        leases: Arc<dyn failover::LeaseStore>,
        timings: LeaseTimings,
    ) -> Self {
        self.liveness = Some(failover::Liveness::new(leases, timings));
        self
    }

    /// Whether Events have anywhere to go.
    pub fn has_events(&self) -> bool {
        self.events.is_some()
    }

    /// Makes the member list `nodes` (node id → agent address), keeping the connections
    /// of members whose address did not change. A member whose address is unusable is
    /// left out and reported in the error, after the others took effect: one malformed
    /// BerthNode must not freeze the membership for every other node.
    pub fn set_members(&self, nodes: BTreeMap<String, String>) -> Result<()> {
        let mut next = BTreeMap::new();
        let mut refused = None;
        let current = self.members.read().expect("members lock poisoned").clone();
        for (id, address) in nodes {
            let m = match current.get(&id) {
                Some(m) if m.address == address => m.clone(),
                _ => match crate::agent::channel(&id, &address, &self.tls) {
                    Ok(channel) => Member { channel, address },
                    Err(e) => {
                        tracing::warn!(node = %id, %address, error = %e, "node left out: its agent address is unusable");
                        refused.get_or_insert(e);
                        continue;
                    }
                },
            };
            next.insert(id, m);
        }
        let ids: Vec<&String> = next.keys().collect();
        tracing::info!(nodes = ?ids, "cluster members");
        *self.members.write().expect("members lock poisoned") = next;
        refused.map_or(Ok(()), Err)
    }

    pub fn member(&self, node: &str) -> Result<Member> {
        self.members
            .read()
            .expect("members lock poisoned")
            .get(node)
            .cloned()
            .ok_or_else(|| Error::NodeNotFound(node.to_string()))
    }

    pub fn node_ids(&self) -> Vec<String> {
        self.members
            .read()
            .expect("members lock poisoned")
            .keys()
            .cloned()
            .collect()
    }

    /// Records an Event on the volume's claim, when berth runs in Kubernetes and knows the
    /// claim (from the provisioner's extra-create-metadata). Never waits, never fails the
    /// operation it reports on.
    pub fn pvc_event(
        &self,
        pvc: Option<(String, String)>,
        reason: &'static str,
        message: String,
        warning: bool,
    ) {
        let (Some(api), Some((ns, name))) = (self.events.clone(), pvc) else {
            return;
        };
        tokio::spawn(async move {
            if let Err(e) = api.pvc_event(&ns, &name, reason, &message, warning).await {
                tracing::warn!(pvc = %format!("{ns}/{name}"), reason, error = %e, "could not record an Event");
            }
        });
    }

    /// The controller's signed permission for a node to pull a snapshot from another
    /// (crate::agent::auth): senders serve nothing without one.
    pub fn grant(&self, body: pb::GrantBody) -> Result<pb::Grant> {
        crate::agent::auth::grant(&self.tls, body)
    }

    /// The connection to `node`'s agent port, every call on it counted in the metrics
    /// (`berth_agent_requests_total`) under the node's id.
    pub fn channel(&self, node: &str) -> Result<AgentChannel> {
        let channel = self.member(node)?.channel;
        Ok(self.metrics.agent_channel(channel, node))
    }

    pub fn agent(&self, node: &str) -> Result<AgentClient<AgentChannel>> {
        Ok(AgentClient::new(self.channel(node)?).max_decoding_message_size(MAX_MESSAGE))
    }

    pub fn csi(&self, node: &str) -> Result<ControllerClient<AgentChannel>> {
        Ok(ControllerClient::new(self.channel(node)?))
    }

    pub fn group(&self, node: &str) -> Result<GroupControllerClient<AgentChannel>> {
        Ok(GroupControllerClient::new(self.channel(node)?))
    }

    /// The inventories of `nodes`, asked in parallel. A node the monitor knows to be silent
    /// is polled once more ([`Cluster::reachable`]) and, if it answers now, that answer is
    /// used; one that does not answer within [`monitor::POLL_TIMEOUT`] is an error in its
    /// slot, not a failure of the whole.
    pub async fn inventories_of(
        &self,
        nodes: &[String],
    ) -> Vec<(String, Result<pb::InventoryResponse>)> {
        join_all(nodes.iter().map(|id| async move {
            let unreachable = |reason: String| Error::Unreachable {
                node: id.clone(),
                reason,
            };
            let was_silent = self.silent(id).is_some();
            let r = if let Some(reason) = self.reachable(id).await {
                Err(unreachable(reason))
            } else if let Some(inv) = self.view(id).filter(|_| was_silent) {
                // The re-poll just asked it: no second call.
                Ok((*inv).clone())
            } else {
                match self.agent(id) {
                    Ok(mut c) => match tokio::time::timeout(
                        monitor::POLL_TIMEOUT,
                        c.inventory(pb::InventoryRequest {}),
                    )
                    .await
                    {
                        Ok(r) => r.map(|r| r.into_inner()).map_err(|s| peer(id, s)),
                        Err(_) => Err(unreachable(format!(
                            "no answer within {:?}",
                            monitor::POLL_TIMEOUT
                        ))),
                    },
                    Err(Error::NodeNotFound(_)) => {
                        Err(unreachable("it is not a member of the cluster".into()))
                    }
                    Err(e) => Err(e),
                }
            };
            (id.clone(), r)
        }))
        .await
    }

    /// The placement record of `vol`. None means the volume does not exist, unless a node
    /// not adopted yet may hold it: then that is UNAVAILABLE, naming the nodes.
    pub async fn record(&self, vol: &VolumeId) -> Result<Option<Versioned>> {
        match self.store.get(vol).await? {
            Some(r) => Ok(Some(r)),
            None => self.known_absent(&format!("volume {vol}")).map(|()| None),
        }
    }

    /// What has no record is gone, once every node is adopted; before that it may be on a
    /// node not adopted yet, which is UNAVAILABLE naming those nodes.
    pub fn known_absent(&self, what: &str) -> Result<()> {
        match self.not_adopted() {
            pending if pending.is_empty() => Ok(()),
            pending => Err(Error::Unreachable {
                node: pending.join(", "),
                reason: format!(
                    "{what} has no placement record, and these nodes have not answered since records began; one of them may hold it"
                ),
            }),
        }
    }

    /// Where every copy of `vol` is: its placement record, and the inventories of the nodes
    /// the record names, no others. A node of the record that does not answer is listed in
    /// `unreachable`; nodes outside the record are never asked, so a silent one costs
    /// nothing here.
    pub async fn locate(&self, vol: &VolumeId) -> Result<Placement> {
        let Some(record) = self.record(vol).await? else {
            return Ok(Placement::default());
        };
        if record.record.phase == placement::PlacementPhase::Deleted {
            return Ok(Placement {
                record: Some(record),
                ..Default::default()
            });
        }
        let nodes = record.record.nodes();
        let mut invs = self.inventories_of(&nodes).await;
        // A fence names its target, which the record may not: two controllers each record
        // their hand-off from what they read, and the later write stays while the node's
        // fence is the earlier one's. That target may be promoted already; unasked, every
        // cancel would be refused by it and every move away from it fail.
        let mut targets: Vec<String> = invs
            .iter()
            .filter_map(|(_, i)| i.as_ref().ok())
            .flat_map(|i| &i.volumes)
            .filter(|c| c.volume_id == vol.as_str() && c.role == pb::Role::Fenced as i32)
            .map(|c| c.fenced_to.clone())
            .filter(|t| !nodes.contains(t) && self.member(t).is_ok())
            .collect();
        targets.sort();
        targets.dedup();
        invs.extend(self.inventories_of(&targets).await);
        let mut p = match Placement::of(vol, &invs) {
            Err(Error::Unreachable { node, .. }) if record.record.replicas.is_empty() => {
                return Err(Error::Unreachable {
                    node,
                    reason: format!(
                        "it holds the only copy of volume {vol}: the volume has no replica"
                    ),
                });
            }
            other => other?,
        };
        p.record = Some(record);
        self.reconcile(vol, &mut p).await;
        Ok(p)
    }

    /// Brings the record up to what the nodes' epochs say, after a step that landed on the
    /// nodes but not yet in the record (a crash between them, or another controller's
    /// step): a primary at a higher epoch is the primary, a hand-off at or below its epoch
    /// is over, and every copy the record's nodes hold is in the record. A lost
    /// compare-and-swap is left alone: whoever won wrote the newer truth.
    async fn reconcile(&self, vol: &VolumeId, p: &mut Placement) {
        let Some(current) = p.record.as_ref() else {
            return;
        };
        let next = reconciled(&current.record, p);
        if next == current.record {
            return;
        }
        match self.store.replace(&next, &current.version).await {
            Ok(v) => {
                tracing::info!(volume.id = %vol, primary = %v.record.primary, epoch = v.record.epoch, "placement record caught up with the nodes");
                p.record = Some(v);
            }
            Err(e) => {
                tracing::debug!(volume.id = %vol, error = %e, "placement record not caught up")
            }
        }
    }

    /// Changes `vol`'s record in place with `change` until the write lands
    /// (`placement::update`): for changes right whatever the record became meanwhile.
    pub async fn update_record<F>(&self, vol: &VolumeId, mut change: F) -> Result<Versioned>
    where
        F: FnMut(&mut VolumePlacement) + Send,
    {
        placement::update(self.store.as_ref(), vol, |r| {
            let mut next = r.clone();
            change(&mut next);
            Ok(next)
        })
        .await
    }
}

/// The record `r` brought up to the copies of `p` (see [`Cluster::reconcile`]).
fn reconciled(r: &VolumePlacement, p: &Placement) -> VolumePlacement {
    let mut next = r.clone();
    if let Some(c) = &p.primary
        && c.info.epoch > r.epoch
    {
        next.primary = c.node.clone();
        next.epoch = c.info.epoch;
    }
    if next.handoff.as_ref().is_some_and(|h| h.epoch <= next.epoch) {
        next.handoff = None;
    }
    let primary = next.primary.clone();
    next.replicas.retain(|x| x.node != primary);
    for c in p.replicas.iter().chain(&p.fenced).chain(&p.stale) {
        if c.node == primary {
            continue;
        }
        let fresh = monitor::replica_of(&c.node, &c.info);
        match next.replicas.iter_mut().find(|x| x.node == c.node) {
            // A replica's newest snapshot is a fact of its node; a fenced or stale copy's
            // snapshots are the ones it had as a primary, not a replica's progress.
            Some(x) if c.role() == pb::Role::Replica && !fresh.snapshot.is_empty() => *x = fresh,
            Some(_) => {}
            None => next.replicas.push(fresh),
        }
    }
    next
}

/// Maps a peer's answer into berth's error, keeping its code.
pub fn peer(node: &str, status: Status) -> Error {
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::Unknown
            if status.message().contains("transport") || status.message().contains("connect") =>
        {
            Error::Unreachable {
                node: node.to_string(),
                reason: status.message().to_string(),
            }
        }
        _ => Error::Peer {
            node: node.to_string(),
            status,
        },
    }
}

/// One node's copy of a volume.
#[derive(Debug, Clone)]
pub struct Copy {
    pub node: String,
    pub info: pb::VolumeCopy,
}

impl Copy {
    pub fn role(&self) -> pb::Role {
        pb::Role::try_from(self.info.role).unwrap_or(pb::Role::Unspecified)
    }

    /// The claim this volume serves, when the provisioner said.
    pub fn pvc(&self) -> Option<(String, String)> {
        (!self.info.pvc_name.is_empty())
            .then(|| (self.info.pvc_namespace.clone(), self.info.pvc_name.clone()))
    }
}

/// Every copy of one volume across the cluster.
#[derive(Debug, Clone, Default)]
pub struct Placement {
    /// The copy that may be written: the primary of the highest epoch.
    pub primary: Option<Copy>,
    /// Copies handing off, with their targets.
    pub fenced: Vec<Copy>,
    pub replicas: Vec<Copy>,
    /// Primaries of lower epochs than `primary`: stale, a crash's leftovers.
    pub stale: Vec<Copy>,
    /// Nodes that did not answer.
    pub unreachable: Vec<String>,
    /// The placement record the copies were looked up from.
    pub record: Option<Versioned>,
}

impl Placement {
    pub fn of(
        vol: &VolumeId,
        invs: &[(String, Result<pb::InventoryResponse>)],
    ) -> Result<Placement> {
        let mut p = Placement::default();
        let mut primaries = Vec::new();
        for (node, inv) in invs {
            let inv = match inv {
                Ok(i) => i,
                Err(_) => {
                    p.unreachable.push(node.clone());
                    continue;
                }
            };
            for c in inv.volumes.iter().filter(|c| c.volume_id == vol.as_str()) {
                let copy = Copy {
                    node: node.clone(),
                    info: c.clone(),
                };
                match copy.role() {
                    pb::Role::Primary => primaries.push(copy),
                    pb::Role::Fenced => p.fenced.push(copy),
                    pb::Role::Replica => p.replicas.push(copy),
                    pb::Role::Unspecified => {}
                }
            }
        }
        primaries.sort_by_key(|c| std::cmp::Reverse(c.info.epoch));
        let mut it = primaries.into_iter();
        p.primary = it.next();
        p.stale = it.collect();
        // Debug, not warn: after a failover the lost node's copy is stale until it is
        // demoted, and every poll would say so again; the record and an Event say it once.
        if !p.stale.is_empty() {
            tracing::debug!(volume.id = %vol, stale = ?p.stale.iter().map(|c| &c.node).collect::<Vec<_>>(),
                "volume has primaries of older epochs; the highest epoch wins");
        }
        if p.is_empty() && !p.unreachable.is_empty() {
            return Err(Error::Unreachable {
                node: p.unreachable.join(", "),
                reason: format!(
                    "it holds volume {vol}, and no other node holding it answered with a copy"
                ),
            });
        }
        Ok(p)
    }

    pub fn is_empty(&self) -> bool {
        self.primary.is_none() && self.fenced.is_empty() && self.replicas.is_empty()
    }

    /// The highest epoch any copy has or is handing off to.
    pub fn max_epoch(&self) -> u64 {
        self.primary
            .iter()
            .chain(&self.fenced)
            .chain(&self.replicas)
            .chain(&self.stale)
            .map(|c| c.info.epoch.max(c.info.fence_epoch))
            .max()
            .unwrap_or(0)
    }

    /// Every node holding anything of the volume.
    pub fn nodes(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .primary
            .iter()
            .chain(&self.fenced)
            .chain(&self.replicas)
            .chain(&self.stale)
            .map(|c| c.node.clone())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// The copy that answers for the volume: the primary, or mid hand-off the fenced copy
    /// (its data is intact and its record current).
    pub fn holder(&self) -> Option<&Copy> {
        self.primary.as_ref().or(self.fenced.first())
    }

    /// Fails when a node of the volume's record did not answer: a decision that changes
    /// copies (a hand-off, a replication round, a delete) must see them all, or a stale
    /// copy could win over one on the silent node. Nodes outside the record hold nothing
    /// of the volume and are not asked.
    pub fn require_all(&self, vol: &VolumeId) -> Result<()> {
        match self.unreachable.is_empty() {
            true => Ok(()),
            false => Err(Error::Unreachable {
                node: self.unreachable.join(", "),
                reason: format!(
                    "it holds a copy of volume {vol}, and every copy must answer before copies change"
                ),
            }),
        }
    }

    /// Fails when the volume's primary (by its record) did not answer: what only the
    /// primary serves (publishes, snapshots, expansion) cannot be answered elsewhere.
    pub fn require_primary(&self, vol: &VolumeId) -> Result<()> {
        let Some(r) = &self.record else {
            return Ok(());
        };
        let primary = &r.record.primary;
        match self.unreachable.contains(primary) {
            false => Ok(()),
            true => Err(Error::Unreachable {
                node: primary.clone(),
                reason: format!("it holds the primary of volume {vol}"),
            }),
        }
    }

    /// The claim of the volume, from whichever copy knows it.
    pub fn pvc(&self) -> Option<(String, String)> {
        self.primary
            .iter()
            .chain(&self.fenced)
            .chain(&self.replicas)
            .find_map(Copy::pvc)
    }

    pub fn copy_on(&self, node: &str) -> Option<&Copy> {
        self.primary
            .iter()
            .chain(&self.fenced)
            .chain(&self.replicas)
            .find(|c| c.node == node)
    }
}

/// The newest shipping snapshot both copies hold: the base of an incremental transfer.
pub fn common_base(a: &pb::VolumeCopy, b: &pb::VolumeCopy) -> Option<String> {
    a.shipping
        .iter()
        .rev()
        .find(|s| b.shipping.iter().any(|t| t.snapshot_id == s.snapshot_id))
        .map(|s| s.snapshot_id.clone())
}

/// The cluster controller holds no storage of its own, so it is always ready to answer;
/// whether a node can be reached is reported by each call that needs it. (A Probe failing
/// while discovery has not found nodes yet would make the liveness probe restart a healthy
/// controller.)
#[derive(Debug)]
pub struct ClusterHealth;

impl Health for ClusterHealth {
    fn check(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_file_parses_and_rejects_mistakes() {
        let ok = parse_nodes("# cluster\nnode-a 10.0.0.1:7070\n\nnode-b 10.0.0.2:7070 # rack 2\n")
            .unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!(ok["node-b"], "10.0.0.2:7070");
        for bad in [
            "",
            "# only a comment\n",
            "node-a\n",
            "a 1:1 extra\n",
            "a 1:1\na 2:2\n",
        ] {
            assert!(parse_nodes(bad).is_err(), "{bad:?}");
        }
    }

    fn copy(id: &str, role: pb::Role, epoch: u64, fence_epoch: u64) -> pb::VolumeCopy {
        pb::VolumeCopy {
            volume_id: id.into(),
            role: role as i32,
            epoch,
            fence_epoch,
            ..Default::default()
        }
    }

    #[test]
    fn highest_epoch_is_primary_and_silence_is_not_absence() {
        let v = VolumeId::for_name("pvc");
        let inv = |copies: Vec<pb::VolumeCopy>| {
            Ok(pb::InventoryResponse {
                volumes: copies,
                ..Default::default()
            })
        };
        let invs = vec![
            (
                "a".to_string(),
                inv(vec![copy(v.as_str(), pb::Role::Primary, 1, 0)]),
            ),
            (
                "b".to_string(),
                inv(vec![copy(v.as_str(), pb::Role::Primary, 3, 0)]),
            ),
            (
                "c".to_string(),
                inv(vec![copy(v.as_str(), pb::Role::Fenced, 2, 3)]),
            ),
        ];
        let p = Placement::of(&v, &invs).unwrap();
        assert_eq!(p.primary.as_ref().unwrap().node, "b");
        assert_eq!(p.stale.len(), 1);
        assert_eq!(p.max_epoch(), 3);

        let other = VolumeId::for_name("other");
        let invs = vec![
            ("a".to_string(), inv(vec![])),
            (
                "b".to_string(),
                Err(Error::Unreachable {
                    node: "b".into(),
                    reason: "down".into(),
                }),
            ),
        ];
        let e = Placement::of(&other, &invs).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
    }

    /// Records the Events it is asked for and the lost nodes' releases, answers the
    /// out-of-service nodes and the kubelets' Leases it is given; every other call is a
    /// test bug.
    #[derive(Default)]
    struct Recorder(
        std::sync::Mutex<Vec<(String, String, String, bool)>>,
        std::sync::Mutex<std::collections::BTreeSet<String>>,
        std::sync::Mutex<Vec<(String, String)>>,
        std::sync::Mutex<BTreeMap<String, crate::kube::KubeletLease>>,
    );

    #[async_trait::async_trait]
    impl ClusterApi for Recorder {
        async fn publish_node(
            &self,
            _: &str,
            _: crate::kube::crd::BerthNodeSpec,
            _: crate::kube::crd::BerthNodeStatus,
        ) -> Result<()> {
            unreachable!()
        }
        async fn list_nodes(&self) -> Result<Vec<crate::kube::DiscoveredNode>> {
            unreachable!()
        }
        async fn pvc_event(
            &self,
            ns: &str,
            name: &str,
            reason: &str,
            _: &str,
            warning: bool,
        ) -> Result<()> {
            self.0
                .lock()
                .unwrap()
                .push((ns.into(), name.into(), reason.into(), warning));
            Ok(())
        }
        async fn volume_handle(&self, _: &str, _: &str) -> Result<Option<String>> {
            unreachable!()
        }
        async fn watch_migrations(
            &self,
            _: Option<&str>,
        ) -> Result<futures::stream::BoxStream<'static, Result<crate::kube::MigrationEvent>>>
        {
            unreachable!()
        }
        async fn set_migration_status(
            &self,
            _: &str,
            _: &str,
            _: &crate::kube::crd::VolumeMigrationStatus,
        ) -> Result<()> {
            unreachable!()
        }
        async fn try_acquire_lease(&self, _: &str, _: &str, _: &str, _: u32) -> Result<bool> {
            unreachable!()
        }
        async fn release_lease(&self, _: &str, _: &str, _: &str) -> Result<()> {
            unreachable!()
        }
        async fn renew_node_lease(&self, _: &str, _: &str, _: u32) -> Result<()> {
            Ok(())
        }
        async fn node_leases(&self, _: &str) -> Result<BTreeMap<String, String>> {
            Ok(Default::default())
        }
        async fn kubelet_leases(&self) -> Result<BTreeMap<String, crate::kube::KubeletLease>> {
            Ok(self.3.lock().unwrap().clone())
        }
        async fn out_of_service_nodes(&self) -> Result<std::collections::BTreeSet<String>> {
            Ok(self.1.lock().unwrap().clone())
        }
        async fn release_from_node(&self, vol: &str, node: &str) -> Result<crate::kube::Released> {
            self.2.lock().unwrap().push((vol.into(), node.into()));
            Ok(Default::default())
        }
    }

    /// A controller whose only member "a" never answers, with node leases in `dir` and
    /// Kubernetes played by `api`; its placement records.
    fn lease_keeping_cluster(
        dir: &std::path::Path,
        api: Arc<Recorder>,
        timings: LeaseTimings,
    ) -> (Cluster, Arc<crate::placement::FileStore>) {
        crate::tls::generate(dir, &["controller".to_string()]).unwrap();
        let tls = TlsMaterial::load(&dir.join("controller")).unwrap();
        let store = Arc::new(crate::placement::FileStore::open(&dir.join("placement")).unwrap());
        let leases = failover::FileLeases::open(dir.join("leases")).unwrap();
        let c = Cluster::new(
            BTreeMap::from([("a".to_string(), "127.0.0.1:1".to_string())]),
            &tls,
            "default".into(),
            Some(api),
            Arc::default(),
            store.clone(),
        )
        .unwrap()
        .with_leases(Arc::new(leases), timings);
        (c, store)
    }

    /// The out-of-service taint makes a node lost at once, without waiting for its lease;
    /// taken off, the node is lost again only by its lease. A volume there without a
    /// replica is reported once, on its claim; a failed-over one's hold on the node is
    /// released in Kubernetes.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_tainted_node_is_lost_at_once_and_its_unreplicated_volumes_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let api = Arc::new(Recorder::default());
        api.1.lock().unwrap().insert("a".into());
        let (c, store) = lease_keeping_cluster(dir.path(), api.clone(), LeaseTimings::default());
        let vol = VolumeId::for_name("pvc-only");
        store
            .create(&VolumePlacement {
                volume_id: vol.to_string(),
                name: "pvc-only".into(),
                phase: placement::PlacementPhase::Ready,
                primary: "a".into(),
                epoch: 1,
                claim: "db/pg-data".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let live = c.liveness.as_ref().unwrap();
        assert!(
            !live.lost("a"),
            "a new controller counts a lease from its start"
        );
        for _ in 0..2 {
            c.failover_round().await.unwrap();
        }
        assert!(live.lost("a"), "tainted out-of-service: lost at once");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(
            *api.0.lock().unwrap(),
            vec![(
                "db".into(),
                "pg-data".into(),
                "VolumeUnavailable".into(),
                true
            )],
            "told once, on the claim"
        );
        api.1.lock().unwrap().clear();
        for _ in 0..3 {
            c.failover_round().await.unwrap();
        }
        assert!(!live.lost("a"), "untainted: back to its lease");
        c.after_failover(&vol, "a");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(
            *api.2.lock().unwrap(),
            vec![(vol.to_string(), "a".to_string())]
        );
    }

    /// In Kubernetes, a node whose berth lease lapsed while its kubelet still renews its
    /// own Lease keeps its volumes: berth's plugin died there, not the host, and nothing
    /// fenced the database still writing. The volume waits, said once on the claim, and
    /// `berth promote` is refused; the out-of-service taint (an operator's word that the
    /// node is down) still fails it over at once. (That it fails over once the kubelet
    /// stops: tests/csr.rs.)
    #[tokio::test(flavor = "multi_thread")]
    async fn a_node_whose_kubelet_still_renews_does_not_fail_over_on_its_lease_alone() {
        use std::time::{Duration, Instant};
        let dir = tempfile::tempdir().unwrap();
        let api = Arc::new(Recorder::default());
        let timings = LeaseTimings {
            period: Duration::from_millis(200),
            duration: Duration::from_secs(1),
            fence_after: Duration::from_millis(600),
        };
        let (c, store) = lease_keeping_cluster(dir.path(), api.clone(), timings);
        let vol = VolumeId::for_name("pvc-replicated");
        store
            .create(&VolumePlacement {
                volume_id: vol.to_string(),
                name: "pvc-replicated".into(),
                phase: placement::PlacementPhase::Ready,
                primary: "a".into(),
                epoch: 1,
                claim: "db/pg-data".into(),
                replicas: vec![crate::placement::ReplicaPlacement {
                    node: "b".into(),
                    snapshot: "s1".into(),
                    snapshot_time: String::new(),
                }],
                ..Default::default()
            })
            .await
            .unwrap();
        let reasons = || {
            api.0
                .lock()
                .unwrap()
                .iter()
                .map(|e| e.2.clone())
                .collect::<Vec<_>>()
        };
        // a's kubelet renews its 1 s Lease (2.25 s of grace) at every round.
        let mut mark = 0;
        let mut renew_and_round = async |c: &Cluster| {
            mark += 1;
            api.3.lock().unwrap().insert(
                "a".into(),
                crate::kube::KubeletLease {
                    mark: mark.to_string(),
                    duration_secs: 1,
                },
            );
            c.failover_round().await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let renewing = Instant::now();
        while renewing.elapsed() < Duration::from_millis(2000) {
            renew_and_round(&c).await;
        }
        let live = c.liveness.as_ref().unwrap();
        assert!(live.lost("a"), "a's berth lease lapsed");
        assert_eq!(
            reasons(),
            ["VolumeFailoverWaiting"],
            "told once, on the claim"
        );
        assert_eq!(store.get(&vol).await.unwrap().unwrap().record.epoch, 1);
        let refused = c.promote_by_hand(&vol, None).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        assert!(refused.to_string().contains("kubelet"), "{refused}");
        // Tainted while its kubelet still renews: it tries to fail over at once (no
        // replica answers here, which is said too), without waiting for the kubelet.
        api.1.lock().unwrap().insert("a".into());
        let tainted = Instant::now();
        while reasons().len() < 2 {
            assert!(
                tainted.elapsed() < Duration::from_secs(2),
                "{:?}",
                reasons()
            );
            renew_and_round(&c).await;
        }
        assert_eq!(reasons(), ["VolumeFailoverWaiting", "VolumeUnavailable"]);
    }

    #[tokio::test]
    async fn events_go_to_the_claim_when_it_is_known() {
        let dir = tempfile::tempdir().unwrap();
        crate::tls::generate(dir.path(), &["controller".to_string()]).unwrap();
        let tls = TlsMaterial::load(&dir.path().join("controller")).unwrap();
        let rec = Arc::new(Recorder::default());
        let c = Cluster::new(
            BTreeMap::new(),
            &tls,
            "default".into(),
            Some(rec.clone()),
            Arc::default(),
            Arc::new(crate::placement::FileStore::open(&dir.path().join("placement")).unwrap()),
        )
        .unwrap();
        c.pvc_event(
            Some(("db".into(), "pg-data".into())),
            "VolumeMoved",
            "moved".into(),
            false,
        );
        c.pvc_event(None, "VolumeMoveFailed", "no claim known".into(), true);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(
            *rec.0.lock().unwrap(),
            vec![("db".into(), "pg-data".into(), "VolumeMoved".into(), false)]
        );
        // Discovery replaces the members; an unchanged address keeps its connection.
        c.set_members(BTreeMap::from([(
            "a".to_string(),
            "127.0.0.1:1".to_string(),
        )]))
        .unwrap();
        c.set_members(BTreeMap::from([
            ("a".to_string(), "127.0.0.1:1".to_string()),
            ("b".to_string(), "127.0.0.1:2".to_string()),
        ]))
        .unwrap();
        assert_eq!(c.node_ids(), ["a", "b"]);
        assert_eq!(c.member("b").unwrap().address, "127.0.0.1:2");
        // A malformed address leaves that node out, not the others.
        c.set_members(BTreeMap::from([
            ("a".to_string(), "127.0.0.1:1".to_string()),
            ("bad".to_string(), "no such address\n".to_string()),
            ("c".to_string(), "127.0.0.1:3".to_string()),
        ]))
        .unwrap_err();
        assert_eq!(c.node_ids(), ["a", "c"]);
        c.set_members(BTreeMap::new()).unwrap();
        assert_eq!(c.member("a").unwrap_err().code(), tonic::Code::NotFound);
    }

    /// What the nodes did (by their epochs) and the record missed, the record catches up
    /// with; what the record knows that the nodes do not show, it keeps.
    #[test]
    fn the_record_catches_up_with_the_nodes_epochs() {
        use crate::placement::{Handoff, ReplicaPlacement};
        let v = VolumeId::for_name("pvc");
        let record = VolumePlacement {
            volume_id: v.to_string(),
            name: "pvc".into(),
            primary: "a".into(),
            epoch: 1,
            handoff: Some(Handoff {
                to: "b".into(),
                epoch: 2,
            }),
            replicas: vec![ReplicaPlacement {
                node: "c".into(),
                snapshot: "s1".into(),
                snapshot_time: String::new(),
            }],
            ..Default::default()
        };
        let at = |node: &str, role, epoch, fence_epoch| Copy {
            node: node.into(),
            info: copy(v.as_str(), role, epoch, fence_epoch),
        };
        let cases = [
            // (what the nodes show, primary, epoch, handoff left, replica nodes)
            (
                "the promotion landed, the record was not written",
                Placement {
                    primary: Some(at("b", pb::Role::Primary, 2, 0)),
                    fenced: vec![at("a", pb::Role::Fenced, 1, 2)],
                    ..Default::default()
                },
                "b",
                2,
                false,
                vec!["c", "a"],
            ),
            (
                "fenced, not promoted yet",
                Placement {
                    fenced: vec![at("a", pb::Role::Fenced, 1, 2)],
                    ..Default::default()
                },
                "a",
                1,
                true,
                vec!["c"],
            ),
            (
                "cancelled: the old primary unfenced above the hand-off",
                Placement {
                    primary: Some(at("a", pb::Role::Primary, 3, 0)),
                    ..Default::default()
                },
                "a",
                3,
                false,
                vec!["c"],
            ),
            (
                "a silent replica is kept",
                Placement {
                    primary: Some(at("a", pb::Role::Primary, 1, 0)),
                    unreachable: vec!["c".into()],
                    ..Default::default()
                },
                "a",
                1,
                true,
                vec!["c"],
            ),
        ];
        for (what, p, primary, epoch, handoff, replicas) in cases {
            let next = reconciled(&record, &p);
            assert_eq!(next.primary, primary, "{what}");
            assert_eq!(next.epoch, epoch, "{what}");
            assert_eq!(next.handoff.is_some(), handoff, "{what}");
            let nodes: Vec<&str> = next.replicas.iter().map(|r| r.node.as_str()).collect();
            assert_eq!(nodes, replicas, "{what}");
        }
    }

    #[test]
    fn common_base_is_the_newest_shared_snapshot() {
        let snap = |id: &str| pb::ShippingSnapshot {
            snapshot_id: id.into(),
            ..Default::default()
        };
        let a = pb::VolumeCopy {
            shipping: vec![snap("s1"), snap("s2"), snap("s3")],
            ..Default::default()
        };
        let b = pb::VolumeCopy {
            shipping: vec![snap("s1"), snap("s2")],
            ..Default::default()
        };
        assert_eq!(common_base(&a, &b).as_deref(), Some("s2"));
        assert_eq!(common_base(&a, &pb::VolumeCopy::default()), None);
    }
}
