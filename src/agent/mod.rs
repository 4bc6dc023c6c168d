//! The node agent: berth's own API on every node (`--agent-listen`), over mutual TLS only.
//!
//! Beside `berth.agent.v1.Agent` the same port serves the node's own CSI Controller and
//! GroupController for its pool: the cluster controller forwards provisioning there, so one
//! implementation decides every CSI answer whether berth runs on one node or fifty.

pub mod auth;
pub mod transfer;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Request, Response, Status,
    transport::{Channel, Endpoint, Server},
};

use crate::{
    error::{Error, Result},
    lease::NodeLease,
    proto::{
        agent::v1::{
            self as pb,
            agent_server::{Agent, AgentServer},
        },
        csi::v1::{
            controller_server::ControllerServer, group_controller_server::GroupControllerServer,
            snapshot_metadata_server::SnapshotMetadataServer,
        },
    },
    service::{
        Context, controller::ControllerService, group::GroupService, metadata::MetadataService,
        respond,
    },
    storage::{RecordState, SnapshotId, VolumeId, VolumeRecord, guard::InFlight},
    tls::{Peer, TlsMaterial},
    util::failpoint,
};

use transfer::{Counters, Fetch, MAX_MESSAGE};

/// Dials the agent of `node` at `address`. Connections are made lazily and reused by tonic.
/// TLS is berth's own (not tonic's) so that the handshake checks the certificate names
/// `node`, not just any member of the cluster (crate::tls::TlsMaterial::client_for_node).
pub fn channel(node: &str, address: &str, tls: &TlsMaterial) -> Result<Channel> {
    let unreachable = |e: tonic::transport::Error| Error::Unreachable {
        node: address.to_string(),
        reason: e.to_string(),
    };
    let connector = tokio_rustls::TlsConnector::from(tls.client_for_node(node)?);
    let connect = tower::service_fn(move |uri: tonic::codegen::http::Uri| {
        let connector = connector.clone();
        async move {
            let host = uri.host().unwrap_or_default();
            // An IPv6 literal comes bracketed in a URI.
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            socket2::SockRef::from(&tcp).set_tcp_keepalive(
                &socket2::TcpKeepalive::new().with_time(Duration::from_secs(30)),
            )?;
            // The name only selects webpki's chain check; the identity check that matters is
            // the node id (NodeVerifier).
            let name = rustls::pki_types::ServerName::try_from(crate::tls::AGENT_SERVER_NAME)
                .expect("a valid DNS name");
            let stream = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
        }
    });
    Ok(Endpoint::from_shared(format!("http://{address}"))
        .map_err(unreachable)?
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(15))
        .keep_alive_timeout(Duration::from_secs(20))
        .connect_with_connector_lazy(connect))
}

#[derive(Debug, Clone)]
pub struct AgentService {
    ctx: Arc<Context>,
    tls: TlsMaterial,
    counters: Arc<Counters>,
    /// One shipping operation per volume or snapshot at a time (two rounds racing would
    /// cut and drop each other's snapshots). Separate from the CSI guard: a replication
    /// round must not make a NodePublish on the same volume fail with ABORTED.
    shipping: InFlight,
    fetches: Arc<Fetches>,
    /// Renewed by the controller's RenewLease when it renews this node's lease for it.
    lease: Option<Arc<NodeLease>>,
}

/// The receives running here, by volume, so that forgetting a volume (its deletion) stops
/// them and keeps them from recording anything after it.
#[derive(Debug, Default)]
struct Fetches(Mutex<HashMap<VolumeId, watch::Sender<bool>>>);

impl Fetches {
    fn start(&self, vol: &VolumeId) -> watch::Receiver<bool> {
        let mut m = self.0.lock().expect("fetches lock poisoned");
        m.retain(|_, s| s.receiver_count() > 0);
        m.entry(vol.clone())
            .or_insert_with(|| watch::channel(false).0)
            .subscribe()
    }

    fn cancel(&self, vol: &VolumeId) {
        if let Some(s) = self.0.lock().expect("fetches lock poisoned").remove(vol) {
            s.send_replace(true);
        }
    }
}

impl AgentService {
    /// `counters` are shared with /metrics.
    pub fn new(
        ctx: Arc<Context>,
        tls: TlsMaterial,
        counters: Arc<Counters>,
        lease: Option<Arc<NodeLease>>,
    ) -> Self {
        Self {
            lease,
            ctx,
            tls,
            counters,
            shipping: InFlight::default(),
            fetches: Arc::default(),
        }
    }

    fn inventory(&self) -> Result<pb::InventoryResponse> {
        let pool = &self.ctx.pool;
        let cap = pool.capacity()?;
        // Every snapshot record is read once per inventory and indexed by volume: the
        // controller asks every node every second, and reading them all again for each
        // volume cost O(volumes × snapshots) record reads per ask.
        let all_snapshots = pool.snapshots()?;
        let mut by_volume: HashMap<&VolumeId, Vec<&crate::storage::SnapshotRecord>> =
            HashMap::new();
        for s in all_snapshots
            .iter()
            .filter(|s| s.shipping && s.state == RecordState::Ready)
        {
            by_volume.entry(&s.source_volume).or_default().push(s);
        }
        // Oldest first, as Pool::shipping_snapshots orders them.
        let shipping = |v: &VolumeId| -> Result<Vec<pb::ShippingSnapshot>> {
            let mut snaps = by_volume.get(v).cloned().unwrap_or_default();
            snaps.sort_by_key(|s| s.created_unix_nanos);
            Ok(snaps.into_iter().map(shipping_proto).collect())
        };
        let mut volumes = Vec::new();
        for v in pool.volumes()? {
            if v.state != RecordState::Ready {
                continue;
            }
            volumes.push(pb::VolumeCopy {
                role: if v.fence.is_some() {
                    pb::Role::Fenced
                } else {
                    pb::Role::Primary
                } as i32,
                fenced_to: v.fence.as_ref().map(|f| f.to.clone()).unwrap_or_default(),
                suspended: v.suspended,
                fence_epoch: v.fence.as_ref().map_or(0, |f| f.epoch),
                published_node_ids: v.published.keys().cloned().collect(),
                shipping: shipping(&v.id)?,
                primary_node_id: String::new(),
                ..copy_of(&v, v.epoch)
            });
        }
        for r in pool.replicas()? {
            volumes.push(pb::VolumeCopy {
                role: pb::Role::Replica as i32,
                shipping: shipping(&r.volume.id)?,
                primary_node_id: r.primary.clone(),
                ..copy_of(&r.volume, r.epoch)
            });
        }
        let snapshots = all_snapshots
            .iter()
            .filter(|s| s.state == RecordState::Ready && !s.shipping)
            .map(|s| pb::SnapshotCopy {
                snapshot_id: s.id.to_string(),
                source_volume_id: s.source_volume.to_string(),
                size_bytes: s.size_bytes,
            })
            .collect();
        Ok(pb::InventoryResponse {
            node_id: self.ctx.info.node_id.clone(),
            total_bytes: cap.total_bytes,
            available_bytes: cap.available_bytes,
            volumes,
            snapshots,
            counters: Some(self.counters.to_proto()),
            reflink: pool.reflink(),
            lease_lapsed: self.lease.as_ref().is_some_and(|l| l.lapsed()),
        })
    }
}

fn copy_of(v: &VolumeRecord, epoch: u64) -> pb::VolumeCopy {
    let label = |k: &str| v.labels.get(k).cloned().unwrap_or_default();
    pb::VolumeCopy {
        pvc_namespace: label("csi.storage.k8s.io/pvc/namespace"),
        pvc_name: label("csi.storage.k8s.io/pvc/name"),
        volume_id: v.id.to_string(),
        name: v.name.clone(),
        epoch,
        capacity_bytes: v.capacity_bytes,
        replicas: v.replication.replicas,
        replication_interval_seconds: v.replication.interval_seconds,
        keep_source: v.replication.keep_source,
        ..Default::default()
    }
}

fn shipping_proto(s: &crate::storage::SnapshotRecord) -> pb::ShippingSnapshot {
    pb::ShippingSnapshot {
        snapshot_id: s.id.to_string(),
        created_unix_nanos: s.created_unix_nanos as i64,
        size_bytes: s.size_bytes,
    }
}

fn template(v: &VolumeRecord) -> pb::VolumeTemplate {
    let t = VolumeRecord {
        fence: None,
        suspended: false,
        published: Default::default(),
        ..v.clone()
    };
    pb::VolumeTemplate {
        name: v.name.clone(),
        record_json: serde_json::to_string(&t).expect("records serialize"),
    }
}

fn volume_id(s: &str) -> Result<VolumeId> {
    VolumeId::parse(s)
        .ok_or_else(|| Error::invalid("volume_id", format!("{s:?} is not a volume id")))
}

fn snapshot_ids(ids: &[String]) -> Result<Vec<SnapshotId>> {
    ids.iter()
        .map(|s| transfer::parse_snapshot(s, "keep"))
        .collect()
}

type FetchStream = ReceiverStream<Result<pb::FetchProgress, Status>>;

#[tonic::async_trait]
impl Agent for AgentService {
    async fn inventory(
        &self,
        _: Request<pb::InventoryRequest>,
    ) -> Result<Response<pb::InventoryResponse>, Status> {
        let this = self.clone();
        respond(
            tokio::task::spawn_blocking(move || this.inventory())
                .await
                .expect("inventory task panicked"),
        )
    }

    #[tracing::instrument(skip_all, fields(volume.id = %req.get_ref().volume_id))]
    async fn sync_snapshot(
        &self,
        req: Request<pb::SyncSnapshotRequest>,
    ) -> Result<Response<pb::SyncSnapshotResponse>, Status> {
        let req = req.into_inner();
        respond(
            async {
                let id = volume_id(&req.volume_id)?;
                let keep = snapshot_ids(&req.keep)?;
                let _g = self.shipping.try_lock([id.to_string()])?;
                let v = self.ctx.pool.ready_volume(&id)?;
                if v.fence.is_some() {
                    return Err(Error::FailedPrecondition(format!(
                        "volume {id} is handing off; its final snapshot is the fence's"
                    )));
                }
                let s = self.ctx.pool.cut_shipping_snapshot(&id, &keep).await?;
                Ok(pb::SyncSnapshotResponse {
                    snapshot: Some(shipping_proto(&s)),
                    template: Some(template(&v)),
                })
            }
            .await,
        )
    }

    type SendStream = transfer::SendStream;

    async fn send(
        &self,
        req: Request<pb::SendRequest>,
    ) -> Result<Response<Self::SendStream>, Status> {
        let caller = req.extensions().get::<Peer>().cloned();
        let req = req.into_inner();
        respond(
            async {
                let caller = caller.ok_or_else(|| {
                    Error::PermissionDenied("the caller's identity is unknown".into())
                })?;
                auth::check_grant(&self.tls, &self.ctx.info.node_id, &caller, &req)?;
                transfer::send(self.ctx.pool.clone(), self.counters.clone(), req).await
            }
            .await,
        )
    }

    type FetchStream = FetchStream;

    #[tracing::instrument(skip_all, fields(volume.id = %req.get_ref().volume_id, snapshot.id = %req.get_ref().snapshot_id))]
    async fn fetch(
        &self,
        req: Request<pb::FetchRequest>,
    ) -> Result<Response<Self::FetchStream>, Status> {
        let req = req.into_inner();
        let start = || -> Result<_> {
            let job = Fetch::from_proto(&req)?;
            let guard = self.shipping.try_lock([job.snapshot.to_string()])?;
            // A fetch of one snapshot of a volume makes the idle partial receives of its
            // other snapshots obsolete (a cancelled hand-off's, say): the controller always
            // ships the newest. Running receives, this one included, hold their lock.
            self.ctx
                .pool
                .discard_incoming_of(&job.volume, |s| self.shipping.is_busy(s.as_str()))?;
            let channel = channel(&req.source_node_id, &req.source_address, &self.tls)?;
            Ok((job, guard, channel))
        };
        let (job, guard, channel) = match start() {
            Ok(x) => x,
            Err(e) => return respond(Err(e)),
        };
        let (tx, rx) = mpsc::channel(16);
        let (pool, counters) = (self.ctx.pool.clone(), self.counters.clone());
        let bounds = transfer::Bounds {
            inflight: self.ctx.inflight.clone(),
            forgotten: self.fetches.start(&job.volume),
        };
        // The transfer runs in its own task, so it can finish in order when the asker
        // disconnects (tonic then drops this handler's stream): it stops at the next
        // message, keeps its last checkpoint for a retry to resume, and records nothing.
        tokio::spawn(async move {
            let _guard = guard;
            if let Err(e) =
                transfer::receive(pool, counters, channel, job, tx.clone(), bounds).await
            {
                tracing::warn!(error = %e, "fetch failed");
                let _ = tx.send(Err(e.into())).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    #[tracing::instrument(skip_all, fields(volume.id = %req.get_ref().volume_id))]
    async fn fence(
        &self,
        req: Request<pb::FenceRequest>,
    ) -> Result<Response<pb::FenceResponse>, Status> {
        let req = req.into_inner();
        respond(async {
            let id = volume_id(&req.volume_id)?;
            let keep = snapshot_ids(&req.keep)?;
            let _g = self.ctx.inflight.try_lock([id.to_string()])?;
            let _s = self.shipping.try_lock([id.to_string()])?;
            let (snap, v) = self
                .ctx
                .pool
                .fence(&id, &req.to_node_id, req.epoch, &keep)
                .await?;
            tracing::info!(to = %req.to_node_id, epoch = req.epoch, snapshot.id = %snap.id, "volume fenced for a hand-off");
            Ok(pb::FenceResponse {
                snapshot: Some(shipping_proto(&snap)),
                template: Some(template(&v)),
            })
        }
        .await)
    }

    async fn unfence(
        &self,
        req: Request<pb::UnfenceRequest>,
    ) -> Result<Response<pb::UnfenceResponse>, Status> {
        respond((|| {
            let id = volume_id(&req.get_ref().volume_id)?;
            let _g = self.ctx.inflight.try_lock([id.to_string()])?;
            let epoch = self.ctx.pool.unfence(&id, req.get_ref().epoch)?;
            tracing::info!(volume.id = %id, epoch, "hand-off cancelled; primary again");
            Ok(pb::UnfenceResponse { epoch })
        })())
    }

    #[tracing::instrument(skip_all, fields(volume.id = %req.get_ref().volume_id, epoch = req.get_ref().epoch))]
    async fn raise_epoch_floor(
        &self,
        req: Request<pb::RaiseEpochFloorRequest>,
    ) -> Result<Response<pb::RaiseEpochFloorResponse>, Status> {
        respond((|| {
            let id = volume_id(&req.get_ref().volume_id)?;
            // The lock Promote holds: a promotion is wholly before this or wholly after.
            let _g = self.ctx.inflight.try_lock([id.to_string()])?;
            self.ctx.pool.raise_epoch_floor(&id, req.get_ref().epoch)?;
            tracing::info!("epoch floor raised: older promotions are refused here");
            Ok(pb::RaiseEpochFloorResponse {})
        })())
    }

    #[tracing::instrument(skip_all, fields(volume.id = %req.get_ref().volume_id, epoch = req.get_ref().epoch))]
    async fn promote(
        &self,
        req: Request<pb::PromoteRequest>,
    ) -> Result<Response<pb::PromoteResponse>, Status> {
        let req = req.into_inner();
        respond(
            async {
                let id = volume_id(&req.volume_id)?;
                let snap = transfer::parse_snapshot(&req.snapshot_id, "snapshot_id")?;
                // A promotion still on its way here (tests hold it to race a cancel).
                failpoint::hit("promote:start");
                let _g = self.ctx.inflight.try_lock([id.to_string()])?;
                self.ctx.pool.promote(&id, req.epoch, &snap).await?;
                tracing::info!("promoted to primary");
                Ok(pb::PromoteResponse {})
            }
            .await,
        )
    }

    #[tracing::instrument(skip_all, fields(volume.id = %req.get_ref().volume_id, epoch = req.get_ref().epoch))]
    async fn settle(
        &self,
        req: Request<pb::SettleRequest>,
    ) -> Result<Response<pb::SettleResponse>, Status> {
        let req = req.into_inner();
        respond(
            async {
                let id = volume_id(&req.volume_id)?;
                let _g = self.ctx.inflight.try_lock([id.to_string()])?;
                self.ctx
                    .pool
                    .settle(&id, req.epoch, &req.new_primary_node_id, req.keep)
                    .await?;
                tracing::info!(keep = req.keep, "old primary settled after a hand-off");
                Ok(pb::SettleResponse {})
            }
            .await,
        )
    }

    async fn renew_lease(
        &self,
        req: Request<pb::RenewLeaseRequest>,
    ) -> Result<Response<pb::RenewLeaseResponse>, Status> {
        let req = req.into_inner();
        respond(match &self.lease {
            Some(lease) => {
                lease.controller_renewal(req.confirm, req.token);
                Ok(pb::RenewLeaseResponse {})
            }
            None => Err(Error::FailedPrecondition(
                "this node renews its own Lease in Kubernetes; the controller does not renew it"
                    .into(),
            )),
        })
    }

    #[tracing::instrument(skip_all, fields(volume.id = %req.get_ref().volume_id, epoch = req.get_ref().epoch))]
    async fn resume(
        &self,
        req: Request<pb::ResumeRequest>,
    ) -> Result<Response<pb::ResumeResponse>, Status> {
        let req = req.into_inner();
        respond(
            async {
                let id = volume_id(&req.volume_id)?;
                if self.lease.as_ref().is_some_and(|l| l.lapsed()) {
                    return Err(Error::FailedPrecondition(format!(
                        "this node's lease has lapsed: volume {id} resumes once it is renewed"
                    )));
                }
                let _g = self.ctx.inflight.try_lock([id.to_string()])?;
                let epoch = self.ctx.pool.resume(&id, req.epoch).await?;
                tracing::info!("primary resumed: the placement record still names this node");
                Ok(pb::ResumeResponse { epoch })
            }
            .await,
        )
    }

    #[tracing::instrument(skip_all, fields(volume.id = %req.get_ref().volume_id, epoch = req.get_ref().epoch))]
    async fn demote(
        &self,
        req: Request<pb::DemoteRequest>,
    ) -> Result<Response<pb::DemoteResponse>, Status> {
        let req = req.into_inner();
        respond(
            async {
                let id = volume_id(&req.volume_id)?;
                if req.kept_snapshot_name.is_empty() {
                    return Err(Error::Missing("kept_snapshot_name"));
                }
                let _g = self.ctx.inflight.try_lock([id.to_string()])?;
                let _s = self.shipping.try_lock([id.to_string()])?;
                let kept = self
                    .ctx
                    .pool
                    .demote(
                        &id,
                        req.epoch,
                        &req.new_primary_node_id,
                        &req.kept_snapshot_name,
                    )
                    .await?;
                tracing::info!(new_primary = %req.new_primary_node_id, kept = ?kept.as_ref().map(|s| &s.id), "stale primary demoted after a failover; what it held is kept as a snapshot");
                Ok(pb::DemoteResponse {
                    kept: kept.map(|s| pb::SnapshotCopy {
                        snapshot_id: s.id.to_string(),
                        source_volume_id: s.source_volume.to_string(),
                        size_bytes: s.size_bytes,
                    }),
                })
            }
            .await,
        )
    }

    async fn forget(
        &self,
        req: Request<pb::ForgetRequest>,
    ) -> Result<Response<pb::ForgetResponse>, Status> {
        respond((|| {
            let id = volume_id(&req.get_ref().volume_id)?;
            // Receives of the volume stop, and one finishing now records under the volume's
            // lock: before this (and its records go below) or not at all.
            self.fetches.cancel(&id);
            let _g = self.ctx.inflight.try_lock([id.to_string()])?;
            let _s = self.shipping.try_lock([id.to_string()])?;
            self.ctx.pool.forget(&id)?;
            Ok(pb::ForgetResponse {})
        })())
    }
}

/// Serves the agent on `addr` until `shutdown` resolves.
pub async fn serve(
    ctx: Arc<Context>,
    addr: SocketAddr,
    tls: TlsMaterial,
    counters: Arc<Counters>,
    lease: Option<Arc<NodeLease>>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(Error::io("bind", addr.to_string()))?;
    tracing::info!(agent = %addr, "serving the node agent (mutual TLS)");
    let agent = AgentServer::new(AgentService::new(ctx.clone(), tls.clone(), counters, lease))
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    Server::builder()
        .tls_config(tls.server())
        .map_err(|e| Error::invalid("tls", e.to_string()))?
        .layer(auth::Authorize::layer())
        .add_service(agent)
        .add_service(ControllerServer::new(ControllerService::new(ctx.clone())))
        .add_service(GroupControllerServer::new(GroupService::new(ctx.clone())))
        .add_service(SnapshotMetadataServer::new(MetadataService::new(
            ctx.pool.clone(),
        )))
        .serve_with_incoming_shutdown(
            // Small answers (an Inventory's last frames) must not wait for the ACK of the
            // previous segment: with Nagle on, the peer's delayed ACK held each such call
            // ~40 ms (BENCHMARKS, "Cluster size and one silent node").
            futures::StreamExt::map(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                |conn| conn.and_then(|tcp| tcp.set_nodelay(true).map(|()| tcp)),
            ),
            shutdown,
        )
        .await
        .map_err(|e| Error::Io {
            op: "serve agent",
            path: addr.to_string().into(),
            source: std::io::Error::other(e),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        storage::{MIB, MutableSettings, Replication, VolumeKind, pool::NewVolume},
        util::fsutil::RECORD_READS,
    };

    /// An inventory reads each snapshot record a bounded number of times, not once per
    /// volume (issue 11, item 10: the controller asks every node every second). 20 volumes
    /// with 5 shipping snapshots each: 2,240 record reads before, 240 now.
    #[tokio::test(flavor = "multi_thread")]
    async fn an_inventory_reads_each_record_a_bounded_number_of_times() {
        const VOLUMES: usize = 20;
        const EACH: usize = 5;
        let dir = tempfile::tempdir().unwrap();
        let ctx = crate::service::test_context(dir.path()).await;
        let names = vec!["node-1".to_string()];
        let tls_dir = crate::tls::generate(&dir.path().join("certs"), &names).unwrap();
        let agent = AgentService::new(
            ctx.clone(),
            TlsMaterial::load(&tls_dir[0]).unwrap(),
            Arc::default(),
            None,
        );
        for i in 0..VOLUMES {
            let v = ctx
                .pool
                .create_volume(NewVolume {
                    name: format!("inv-{i}"),
                    required_bytes: MIB,
                    limit_bytes: 0,
                    kind: VolumeKind::Block,
                    source: None,
                    settings: MutableSettings::default(),
                    labels: Default::default(),
                    replication: Replication::default(),
                })
                .await
                .unwrap();
            let mut keep = Vec::new();
            for _ in 0..EACH {
                keep.push(
                    ctx.pool
                        .cut_shipping_snapshot(&v.id, &keep)
                        .await
                        .unwrap()
                        .id,
                );
            }
        }
        let inv = tokio::task::spawn_blocking(move || {
            RECORD_READS.with(|n| n.set(0));
            let inv = agent.inventory().unwrap();
            (inv, RECORD_READS.with(|n| n.get()))
        });
        let (inv, reads) = inv.await.unwrap();
        assert_eq!(inv.volumes.len(), VOLUMES);
        for v in &inv.volumes {
            assert_eq!(v.shipping.len(), EACH, "{}", v.volume_id);
            assert!(
                v.shipping
                    .windows(2)
                    .all(|w| w[0].created_unix_nanos <= w[1].created_unix_nanos),
                "oldest first"
            );
        }
        let records = VOLUMES + VOLUMES * EACH;
        println!("one inventory of {records} records: {reads} record reads");
        assert!(
            reads <= 2 * records,
            "{reads} record reads for {records} records: snapshots are read per volume"
        );
    }
}
