//! Prometheus metrics, served at `/metrics` by `--metrics-listen` in the Prometheus text
//! format (docs/kubernetes.md lists them).
//!
//! One [`Metrics`] per process, built by the daemon and handed to what records into it: the
//! CSI server (a tower layer around every CSI service), the cluster controller (its agent
//! channels, moves and replication), the node agent (transfer counters) and the pool
//! (read at scrape time).

use std::{
    collections::BTreeSet,
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex, atomic::AtomicU64},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, prometheus_text},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::{net::TcpListener, sync::watch};
use tonic::{Code, body::Body, transport::Channel};
use tower::{Layer, Service};

use crate::{
    agent::transfer::Counters,
    error::{Error, Result},
    storage::pool::Pool,
};

/// Latency buckets from 1 ms to about 4 minutes, in steps of 4: a Probe answers in
/// microseconds, a ControllerPublishVolume that moves a volume takes minutes.
fn latency_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 4.0, 10))
}

type Latencies<L> = Family<L, Histogram, fn() -> Histogram>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CsiLabels {
    method: String,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AgentLabels {
    method: String,
    peer: String,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    method: String,
    peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PollLabels {
    node: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VolumeLabels {
    volume: String,
}

/// Every metric of one berth process.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    csi_requests: Family<CsiLabels, Counter>,
    csi_seconds: Latencies<MethodLabels>,
    agent_requests: Family<AgentLabels, Counter>,
    agent_seconds: Latencies<PeerLabels>,
    moves: Family<OutcomeLabels, Counter>,
    shipped: Family<ReasonLabels, Counter>,
    rounds: Family<OutcomeLabels, Counter>,
    lag: Family<VolumeLabels, Gauge<f64, AtomicU64>>,
    polls: Family<PollLabels, Counter>,
    reachable: Family<NodeLabels, Gauge>,
    failovers: Family<NodeLabels, Counter>,
    kubelet_looks: Family<OutcomeLabels, Counter>,
    /// The volumes `lag` has a sample for, so that one gone is removed.
    lagging: Mutex<BTreeSet<String>>,
    transfer: Arc<Counters>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let csi_requests = Family::default();
        registry.register(
            "berth_csi_requests",
            "CSI calls answered, by method and gRPC status code",
            csi_requests.clone(),
        );
        let csi_seconds = Latencies::new_with_constructor(latency_buckets as fn() -> Histogram);
        registry.register(
            "berth_csi_request_duration_seconds",
            "Time to answer a CSI call (for a streaming call, to open its stream), by method",
            csi_seconds.clone(),
        );
        let agent_requests = Family::default();
        registry.register(
            "berth_agent_requests",
            "Calls the cluster controller made to node agents, by method, node and gRPC status code",
            agent_requests.clone(),
        );
        let agent_seconds = Latencies::new_with_constructor(latency_buckets as fn() -> Histogram);
        registry.register(
            "berth_agent_request_duration_seconds",
            "Time a node agent took to answer the cluster controller (for a streaming call, to open its stream)",
            agent_seconds.clone(),
        );
        let moves = Family::default();
        registry.register(
            "berth_moves",
            "Hand-offs of a volume's primary to another node, by outcome",
            moves.clone(),
        );
        let shipped = Family::default();
        registry.register(
            "berth_shipped_bytes",
            "Bytes the cluster controller had shipped between nodes, by reason (move or replication)",
            shipped.clone(),
        );
        let rounds = Family::default();
        registry.register(
            "berth_replication_rounds",
            "Replication rounds, by outcome",
            rounds.clone(),
        );
        let lag = Family::default();
        registry.register(
            "berth_replication_lag_seconds",
            "Age of the newest snapshot the most-behind replica of a volume holds",
            lag.clone(),
        );
        let polls = Family::default();
        registry.register(
            "berth_node_polls",
            "The cluster controller's background polls of each node's inventory, by outcome (not counted in berth_agent_requests)",
            polls.clone(),
        );
        let reachable = Family::default();
        registry.register(
            "berth_node_reachable",
            "1 while the node answered the controller's last poll, else 0",
            reachable.clone(),
        );
        let failovers = Family::default();
        registry.register(
            "berth_failovers",
            "Volumes failed over away from a lost node, by the node lost",
            failovers.clone(),
        );
        let kubelet_looks = Family::default();
        registry.register(
            "berth_kubelet_lease_looks",
            "The leading controller's looks at the kubelets' Leases in kube-node-lease, by outcome; while they fail, no node fails over on its lease alone",
            kubelet_looks.clone(),
        );
        let transfer = Arc::<Counters>::default();
        registry.register_collector(Box::new(TransferCollector(transfer.clone())));
        Metrics {
            registry,
            csi_requests,
            csi_seconds,
            agent_requests,
            agent_seconds,
            moves,
            shipped,
            rounds,
            lag,
            polls,
            reachable,
            failovers,
            kubelet_looks,
            lagging: Mutex::default(),
            transfer,
        }
    }
}

impl Metrics {
    /// Adds the gauges of this node's pool, read at every scrape.
    pub fn with_pool(mut self, node: &str, pool: Arc<Pool>) -> Self {
        self.registry.register_collector(Box::new(PoolCollector {
            node: node.to_string(),
            pool,
        }));
        self
    }

    /// The node agent's transfer counters, exported as `berth_transfer_*`.
    pub fn transfer_counters(&self) -> Arc<Counters> {
        self.transfer.clone()
    }

    /// The layer that counts and times every CSI call a server answers.
    pub fn csi_layer(self: &Arc<Self>) -> CsiLayer {
        CsiLayer(self.clone())
    }

    /// `channel` to the agent of node `peer`, counting and timing every call made on it.
    pub fn agent_channel(self: &Arc<Self>, channel: Channel, peer: &str) -> AgentChannel {
        Metered {
            inner: channel,
            observer: PeerObserver {
                metrics: self.clone(),
                peer: peer.into(),
            },
        }
    }

    /// A hand-off ended: "succeeded" with the bytes it shipped, "failed" or "aborted".
    pub fn move_ended(&self, outcome: &'static str, shipped_bytes: u64) {
        self.moves.get_or_create(&OutcomeLabels { outcome }).inc();
        self.shipped
            .get_or_create(&ReasonLabels { reason: "move" })
            .inc_by(shipped_bytes);
    }

    /// A replication round ended: "succeeded" with the bytes it shipped, or "failed".
    pub fn replication_round(&self, outcome: &'static str, shipped_bytes: u64) {
        self.rounds.get_or_create(&OutcomeLabels { outcome }).inc();
        self.shipped
            .get_or_create(&ReasonLabels {
                reason: "replication",
            })
            .inc_by(shipped_bytes);
    }

    /// Sets the replication lag of every replicated volume, in seconds; the volumes not
    /// given lose theirs (deleted, or this controller stopped leading).
    pub fn replication_lags(&self, lags: &[(String, f64)]) {
        let mut lagging = self.lagging.lock().expect("lagging lock poisoned");
        let now: BTreeSet<String> = lags.iter().map(|(v, _)| v.clone()).collect();
        for gone in lagging.difference(&now) {
            self.lag.remove(&VolumeLabels {
                volume: gone.clone(),
            });
        }
        for (volume, secs) in lags {
            self.lag
                .get_or_create(&VolumeLabels {
                    volume: volume.clone(),
                })
                .set(*secs);
        }
        *lagging = now;
    }

    /// A volume failed over away from lost `node`.
    pub fn failed_over(&self, node: &str) {
        self.failovers
            .get_or_create(&NodeLabels {
                node: node.to_string(),
            })
            .inc();
    }

    /// A look at the kubelets' Leases ended.
    pub fn kubelet_leases_looked(&self, read: bool) {
        self.kubelet_looks
            .get_or_create(&OutcomeLabels {
                outcome: if read { "read" } else { "failed" },
            })
            .inc();
    }

    /// A background poll of `node` ended.
    pub fn node_polled(&self, node: &str, reachable: bool) {
        self.polls
            .get_or_create(&PollLabels {
                node: node.to_string(),
                outcome: if reachable { "answered" } else { "silent" },
            })
            .inc();
        self.reachable
            .get_or_create(&NodeLabels {
                node: node.to_string(),
            })
            .set(i64::from(reachable));
    }

    /// The Prometheus text exposition. Reads the pool, so call it off the async runtime.
    pub fn encode(&self) -> std::result::Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_text::encode(&mut out, &self.registry)?;
        Ok(out)
    }

    fn csi_call(&self, method: &str, code: Code, elapsed: Duration) {
        self.csi_requests
            .get_or_create(&CsiLabels {
                method: method.to_string(),
                code: code_name(code),
            })
            .inc();
        self.csi_seconds
            .get_or_create(&MethodLabels {
                method: method.to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }

    fn agent_call(&self, method: &str, peer: &str, code: Code, elapsed: Duration) {
        self.agent_requests
            .get_or_create(&AgentLabels {
                method: method.to_string(),
                peer: peer.to_string(),
                code: code_name(code),
            })
            .inc();
        self.agent_seconds
            .get_or_create(&PeerLabels {
                method: method.to_string(),
                peer: peer.to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }
}

/// The names gRPC's own implementations (and the CSI sidecars' metrics) give the codes.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// Where a finished call is recorded.
pub trait Observer: Clone + Send + Sync + 'static {
    fn observe(&self, method: &str, code: Code, elapsed: Duration);
}

#[derive(Clone, Debug)]
pub struct CsiObserver(Arc<Metrics>);

impl Observer for CsiObserver {
    fn observe(&self, method: &str, code: Code, elapsed: Duration) {
        self.0.csi_call(method, code, elapsed);
    }
}

#[derive(Clone, Debug)]
pub struct PeerObserver {
    metrics: Arc<Metrics>,
    peer: Arc<str>,
}

impl Observer for PeerObserver {
    fn observe(&self, method: &str, code: Code, elapsed: Duration) {
        self.metrics.agent_call(method, &self.peer, code, elapsed);
    }
}

/// Counts and times the CSI calls of a tonic server (`Server::builder().layer(..)`).
#[derive(Clone, Debug)]
pub struct CsiLayer(Arc<Metrics>);

impl<S> Layer<S> for CsiLayer {
    type Service = Metered<S, CsiObserver>;

    fn layer(&self, inner: S) -> Self::Service {
        Metered {
            inner,
            observer: CsiObserver(self.0.clone()),
        }
    }
}

/// A channel to a node agent that records every call made on it.
pub type AgentChannel = Metered<Channel, PeerObserver>;

/// A gRPC service (server side) or channel (client side) that records each call's method,
/// status code and duration.
///
/// The code is read from the response headers: tonic answers a failed unary call with a
/// trailers-only response that carries `grpc-status` there, and a successful one without
/// it. A streaming call is recorded when its stream opens; an error later in the stream
/// only shows in its trailers and is not counted. A call dropped before its answer (the
/// client gave up) counts as Canceled.
#[derive(Clone, Debug)]
pub struct Metered<S, O> {
    inner: S,
    observer: O,
}

/// Records the call when dropped: on completion with its code, or cancelled mid-way.
struct Pending<O: Observer> {
    observer: O,
    method: String,
    started: Instant,
    code: Code,
}

impl<O: Observer> Drop for Pending<O> {
    fn drop(&mut self) {
        self.observer
            .observe(&self.method, self.code, self.started.elapsed());
    }
}

impl<S, O, B> Service<http::Request<Body>> for Metered<S, O>
where
    S: Service<http::Request<Body>, Response = http::Response<B>>,
    S::Future: Send + 'static,
    O: Observer,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let pending = Pending {
            observer: self.observer.clone(),
            // "/csi.v1.Controller/CreateVolume": the method names of berth's services
            // are unique across them.
            method: req
                .uri()
                .path()
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_string(),
            started: Instant::now(),
            code: Code::Cancelled,
        };
        let call = self.inner.call(req);
        Box::pin(async move {
            // The whole guard moves in (not only the field assigned below), so that it is
            // dropped, and the call recorded, when this future ends or is dropped.
            let mut pending = pending;
            let r = call.await;
            pending.code = match &r {
                Ok(resp) => resp
                    .headers()
                    .get("grpc-status")
                    .map_or(Code::Ok, |v| Code::from_bytes(v.as_bytes())),
                // What tonic's client makes of a call the channel could not carry.
                Err(_) => Code::Unavailable,
            };
            r
        })
    }
}

/// The node agent's transfer counters, read at every scrape.
#[derive(Debug)]
struct TransferCollector(Arc<Counters>);

impl Collector for TransferCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let c = self.0.to_proto();
        for (name, help, data, zero) in [
            (
                "berth_transfer_sent_bytes",
                "Bytes this node's agent sent to peers, by kind (zero: ranges of zeros sent as a length)",
                c.sent_data_bytes,
                c.sent_zero_bytes,
            ),
            (
                "berth_transfer_received_bytes",
                "Bytes this node's agent received from peers, by kind (zero: ranges of zeros received as a length)",
                c.received_data_bytes,
                c.received_zero_bytes,
            ),
        ] {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (kind, value) in [("data", data), ("zero", zero)] {
                ConstCounter::new(value).encode(m.encode_family(&[("kind", kind)])?)?;
            }
        }
        for (name, help, value) in [
            (
                "berth_transfers_completed",
                "Snapshots this node's agent finished receiving",
                c.transfers_completed,
            ),
            (
                "berth_transfers_resumed",
                "Of those, the ones that resumed an interrupted transfer",
                c.transfers_resumed,
            ),
            (
                "berth_transfer_chunks_rejected",
                "Received chunks or images that failed verification (the transfer fails; its retry fetches them again)",
                c.chunks_rejected,
            ),
        ] {
            let m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(value).encode(m)?;
        }
        Ok(())
    }
}

/// The pool's capacity, read at every scrape.
#[derive(Debug)]
struct PoolCollector {
    node: String,
    pool: Arc<Pool>,
}

impl Collector for PoolCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let cap = match self.pool.capacity() {
            Ok(c) => c,
            Err(e) => {
                // A scrape still returns everything else.
                tracing::warn!(error = %e, "pool capacity unreadable for /metrics");
                return Ok(());
            }
        };
        let node = [("node", self.node.as_str())];
        for (name, help, value) in [
            (
                "berth_pool_capacity_bytes",
                "Size of the pool's filesystem",
                cap.total_bytes,
            ),
            (
                "berth_pool_used_bytes",
                "Bytes allocated on the pool's filesystem (data of volumes and snapshots, and metadata)",
                cap.used_bytes,
            ),
            (
                "berth_pool_reserved_bytes",
                "Bytes promised: the capacity of every volume plus what snapshots hold",
                cap.reserved_bytes,
            ),
            (
                "berth_pool_available_bytes",
                "Bytes the pool can still promise to new volumes (GetCapacity)",
                cap.available_bytes,
            ),
        ] {
            let g = ConstGauge::new(value);
            let mut m = enc.encode_descriptor(name, help, None, g.metric_type())?;
            g.encode(m.encode_family(&node)?)?;
        }
        Ok(())
    }
}

/// Binds the metrics port: done before serving anything, so a taken port fails start-up.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(Error::io("bind", addr.to_string()))
}

/// Serves `GET /metrics` over HTTP/1.1 until `shutdown` says stop.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, shutdown: watch::Receiver<bool>) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(metrics = %addr, "serving /metrics");
    }
    let mut stop = std::pin::pin!(crate::server::stopped(shutdown));
    loop {
        let stream = tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of file descriptors, say: back off rather than spin.
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| answer(metrics.clone(), req));
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                // A client that never finishes its request does not hold a task forever.
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
            if let Err(e) = served {
                tracing::debug!(error = %e, "metrics connection ended");
            }
        });
    }
}

async fn answer<B>(
    metrics: Arc<Metrics>,
    req: http::Request<B>,
) -> std::result::Result<http::Response<Full<Bytes>>, Infallible> {
    let reply = |status: http::StatusCode, content_type: &str, body: String| {
        http::Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("a valid response")
    };
    if req.uri().path() != "/metrics" {
        return Ok(reply(
            http::StatusCode::NOT_FOUND,
            "text/plain",
            "berth serves /metrics only\n".into(),
        ));
    }
    // The pool's gauges read its records and images: blocking I/O.
    let encoded = tokio::task::spawn_blocking(move || metrics.encode()).await;
    Ok(match encoded {
        Ok(Ok(text)) => reply(http::StatusCode::OK, prometheus_text::CONTENT_TYPE, text),
        Ok(Err(e)) => reply(
            http::StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("encoding the metrics failed: {e}\n"),
        ),
        Err(e) => reply(
            http::StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("encoding the metrics panicked: {e}\n"),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in gRPC server answering as tonic does: no grpc-status header on success,
    /// a trailers-only error with it.
    fn answering(
        code: Code,
    ) -> impl Service<
        http::Request<Body>,
        Response = http::Response<Body>,
        Error = Infallible,
        Future = std::future::Ready<std::result::Result<http::Response<Body>, Infallible>>,
    > + Clone {
        tower::service_fn(move |_req: http::Request<Body>| {
            let mut resp = http::Response::new(Body::empty());
            if code != Code::Ok {
                resp.headers_mut()
                    .insert("grpc-status", (code as i32).to_string().parse().unwrap());
            }
            std::future::ready(Ok(resp))
        })
    }

    fn request(path: &str) -> http::Request<Body> {
        http::Request::builder()
            .uri(format!("http://localhost{path}"))
            .body(Body::empty())
            .unwrap()
    }

    #[tokio::test]
    async fn the_layer_counts_calls_by_method_and_code() {
        let m = Arc::new(Metrics::default());
        let layer = m.csi_layer();
        for (code, path) in [
            (Code::Ok, "/csi.v1.Controller/CreateVolume"),
            (Code::Ok, "/csi.v1.Controller/CreateVolume"),
            (Code::NotFound, "/csi.v1.Controller/DeleteSnapshot"),
        ] {
            let mut svc = layer.layer(answering(code));
            svc.call(request(path)).await.unwrap();
        }
        // A call whose future is dropped before its answer: the client gave up.
        let mut svc = layer.layer(tower::service_fn(|_req: http::Request<Body>| {
            std::future::pending::<std::result::Result<http::Response<Body>, Infallible>>()
        }));
        drop(svc.call(request("/csi.v1.Controller/ControllerPublishVolume")));
        let text = m.encode().unwrap();
        for line in [
            r#"berth_csi_requests_total{method="CreateVolume",code="OK"} 2"#,
            r#"berth_csi_requests_total{method="DeleteSnapshot",code="NotFound"} 1"#,
            r#"berth_csi_requests_total{method="ControllerPublishVolume",code="Canceled"} 1"#,
            r#"berth_csi_request_duration_seconds_count{method="CreateVolume"} 2"#,
            r#"berth_csi_request_duration_seconds_bucket{method="DeleteSnapshot",le="0.001"} 1"#,
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }

    #[tokio::test]
    async fn agent_channels_count_by_peer() {
        let m = Arc::new(Metrics::default());
        let mut svc = Metered {
            inner: answering(Code::Unavailable),
            observer: PeerObserver {
                metrics: m.clone(),
                peer: "node-b".into(),
            },
        };
        svc.call(request("/berth.agent.v1.Agent/Inventory"))
            .await
            .unwrap();
        let text = m.encode().unwrap();
        assert!(
            text.contains(
                r#"berth_agent_requests_total{method="Inventory",peer="node-b",code="Unavailable"} 1"#
            ),
            "{text}"
        );
    }

    #[test]
    fn moves_shipping_and_lag_are_exported() {
        let m = Metrics::default();
        m.move_ended("succeeded", 4096);
        m.move_ended("failed", 0);
        m.replication_round("succeeded", 1024);
        m.replication_lags(&[("v1".into(), 1.5), ("v2".into(), 3.0)]);
        m.replication_lags(&[("v2".into(), 2.0)]);
        m.kubelet_leases_looked(true);
        m.kubelet_leases_looked(false);
        m.kubelet_leases_looked(false);
        let text = m.encode().unwrap();
        for line in [
            r#"berth_moves_total{outcome="succeeded"} 1"#,
            r#"berth_moves_total{outcome="failed"} 1"#,
            r#"berth_shipped_bytes_total{reason="move"} 4096"#,
            r#"berth_shipped_bytes_total{reason="replication"} 1024"#,
            r#"berth_replication_rounds_total{outcome="succeeded"} 1"#,
            r#"berth_replication_lag_seconds{volume="v2"} 2"#,
            r#"berth_kubelet_lease_looks_total{outcome="read"} 1"#,
            r#"berth_kubelet_lease_looks_total{outcome="failed"} 2"#,
            r#"berth_transfer_sent_bytes_total{kind="data"} 0"#,
            "# TYPE berth_transfers_completed_total counter",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        assert!(
            !text.contains(r#"volume="v1""#),
            "a volume gone loses its lag: {text}"
        );
    }
}
