//! [`ClusterApi`] over a `kube::Client`.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Mutex,
    time::Duration,
};

use async_trait::async_trait;
use futures::{
    StreamExt,
    stream::{self, BoxStream},
};
use k8s_openapi::{
    api::{
        coordination::v1::{Lease, LeaseSpec},
        core::v1::{Node, ObjectReference, PersistentVolume, PersistentVolumeClaim, Pod},
        events::v1::Event,
        storage::v1::VolumeAttachment,
    },
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{
        DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions, WatchEvent,
        WatchParams,
    },
};
use serde_json::json;
use tokio::time::Instant;
use tonic::{Code, Status};

use super::{
    ClusterApi, DiscoveredNode, KubeletLease, MigrationEvent, Released,
    crd::{BerthNode, BerthNodeSpec, BerthNodeStatus, VolumeMigration, VolumeMigrationStatus},
};
use crate::error::{Error, Result};

/// The field manager of berth's server-side applies.
pub const FIELD_MANAGER: &str = "berth";
/// `reportingController` of berth's Events.
pub const REPORTING_CONTROLLER: &str = "berth.csi.dev/controller";
/// The label of berth's node Leases, with an empty value: a node name may be 253 characters
/// long, a label value only 63, so the Lease's name carries the node.
const NODE_LEASE_LABEL: &str = "berth.csi.dev/node-lease";
const NODE_LEASE_PREFIX: &str = "berth-node-";
/// Where each kubelet renews the Lease named after its Node.
const KUBELET_LEASE_NAMESPACE: &str = "kube-node-lease";
/// The kubelet's default `nodeLeaseDurationSeconds`, for a Lease that does not say.
const KUBELET_LEASE_DEFAULT_SECS: u32 = 40;
/// The taint of Kubernetes' non-graceful node shutdown: the node is down for good and what
/// ran there may run elsewhere.
const OUT_OF_SERVICE_TAINT: &str = "node.kubernetes.io/out-of-service";
/// A Lease's name is a DNS subdomain: at most 253 characters.
const SUBDOMAIN_MAX: usize = 253;
/// What errors name as the unreachable or answering peer.
const API_SERVER: &str = "kubernetes api";
/// Watches ask the API server to end them after this long (its default is a random 30 to 60
/// minutes); the caller lists again, which also repairs anything a watch could have missed.
const WATCH_TIMEOUT_SECS: u32 = 290;
/// events.k8s.io/v1 limits: `note` is at most 1 kB, `reportingInstance` 128 characters.
const NOTE_MAX: usize = 1024;
const INSTANCE_MAX: usize = 128;
/// The API server keeps at most 58 characters of a `generateName` (a 63-character name less
/// its 5 random ones) and cuts the rest.
const GENERATED_PREFIX_MAX: usize = 58;

/// The Kubernetes API as berth uses it.
pub struct KubeApi {
    client: Client,
    /// The CSI driver name: only PersistentVolumes of this driver are berth's.
    driver: String,
    /// `reportingInstance` of Events: this pod, or this node.
    instance: String,
    /// Leases held by others, as last seen: (namespace, name) → when its current
    /// resourceVersion was first seen here.
    leases: Mutex<HashMap<(String, String), Observed>>,
}

struct Observed {
    resource_version: String,
    since: Instant,
}

impl std::fmt::Debug for KubeApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeApi")
            .field("driver", &self.driver)
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

impl KubeApi {
    /// `driver`: the CSI driver name (`--driver-name`); `instance`: who reports Events (the
    /// pod or node name).
    pub fn new(client: Client, driver: impl Into<String>, instance: impl Into<String>) -> Self {
        KubeApi {
            client,
            driver: driver.into(),
            instance: truncate(&instance.into(), INSTANCE_MAX),
            leases: Mutex::default(),
        }
    }

    /// Connects with the pod's service account (or `$KUBECONFIG` outside a cluster).
    pub async fn connect(driver: impl Into<String>, instance: impl Into<String>) -> Result<Self> {
        Ok(KubeApi::new(connect().await?, driver, instance))
    }

    /// An events.k8s.io/v1 Event about `regarding` (in its namespace), reported by this
    /// instance of berth.
    fn event(
        &self,
        regarding: ObjectReference,
        related: Option<ObjectReference>,
        reason: &str,
        message: &str,
        warning: bool,
    ) -> Event {
        let name = regarding.name.as_deref().unwrap_or_default();
        Event {
            metadata: ObjectMeta {
                generate_name: Some(event_name_prefix(name)),
                namespace: regarding.namespace.clone(),
                ..ObjectMeta::default()
            },
            event_time: Some(now()),
            action: Some(reason.to_string()),
            reason: Some(reason.to_string()),
            note: Some(truncate(message, NOTE_MAX)),
            type_: Some(if warning { "Warning" } else { "Normal" }.to_string()),
            reporting_controller: Some(REPORTING_CONTROLLER.to_string()),
            reporting_instance: Some(self.instance.clone()),
            regarding: Some(regarding),
            related,
            ..Event::default()
        }
    }

    fn lease_expired(
        &self,
        key: (String, String),
        resource_version: &str,
        valid: Duration,
    ) -> bool {
        let mut seen = self.leases.lock().expect("lease observations poisoned");
        match seen.get(&key) {
            Some(o) if o.resource_version == resource_version => o.since.elapsed() >= valid,
            _ => {
                seen.insert(
                    key,
                    Observed {
                        resource_version: resource_version.to_string(),
                        since: Instant::now(),
                    },
                );
                false
            }
        }
    }
}

/// A client with the pod's service account (or `$KUBECONFIG` outside a cluster).
pub async fn connect() -> Result<Client> {
    Client::try_default().await.map_err(|e| Error::Unreachable {
        node: API_SERVER.into(),
        reason: format!("no usable configuration: {e}"),
    })
}

/// Maps a kube-rs error into berth's: the API server unreachable, overloaded or failing
/// (transport errors, 429, 5xx) is UNAVAILABLE, so callers retry; any other answer keeps its
/// meaning as a gRPC code (404 NOT_FOUND, 409 ABORTED, 403 PERMISSION_DENIED, …) with `what`
/// was asked in the message.
pub(super) fn api_error(what: impl std::fmt::Display) -> impl FnOnce(kube::Error) -> Error {
    move |e| match e {
        kube::Error::Api(s) => {
            let reason = format!("{what}: {} ({} {})", s.message.trim(), s.code, s.reason);
            let code = match s.code {
                429 | 500..=599 => {
                    return Error::Unreachable {
                        node: API_SERVER.into(),
                        reason,
                    };
                }
                400 | 422 => Code::InvalidArgument,
                401 => Code::Unauthenticated,
                403 => Code::PermissionDenied,
                404 => Code::NotFound,
                409 | 410 => Code::Aborted,
                _ => Code::FailedPrecondition,
            };
            Error::Peer {
                node: API_SERVER.into(),
                status: Status::new(code, reason),
            }
        }
        kube::Error::SerdeError(e) => Error::Peer {
            node: API_SERVER.into(),
            status: Status::internal(format!("{what}: unexpected answer: {e}")),
        },
        other => Error::Unreachable {
            node: API_SERVER.into(),
            reason: format!("{what}: {other}"),
        },
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// The name of `node`'s Lease, `berth-node-<node>`. A node id is the Kubernetes node's name,
/// a DNS subdomain already; the prefix can make it too long for one, which is refused here
/// rather than by the API server at every renewal.
pub fn node_lease_name(node: &str) -> Result<String> {
    let name = format!("{NODE_LEASE_PREFIX}{node}");
    if name.len() > SUBDOMAIN_MAX {
        return Err(Error::invalid(
            "node",
            format!(
                "node id {node} is {} characters long; its Lease {NODE_LEASE_PREFIX}<node id> \
                 would exceed the {SUBDOMAIN_MAX} characters of a Kubernetes name, so the node \
                 id must be at most {} characters",
                node.len(),
                SUBDOMAIN_MAX - NODE_LEASE_PREFIX.len()
            ),
        ));
    }
    Ok(name)
}

fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// `metadata.generateName` of an Event about the object `name`: `<name>-`, for the API server
/// to append its random suffix to. events.k8s.io/v1 validates the prefix itself as a DNS
/// subdomain (a trailing `-` is allowed, a trailing `.` is not: `"pg."` is refused with 422),
/// so the prefix is one DNS label: lower case letters and digits, anything else a `-`, no
/// leading `-`, short enough that the server's cut at [`GENERATED_PREFIX_MAX`] keeps it whole.
/// `name` is a claim's name as a VolumeMigration spells it, which nothing has validated.
fn event_name_prefix(name: &str) -> String {
    let label: String = name
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9') => c,
            _ => '-',
        })
        .skip_while(|&c| c == '-')
        .take(GENERATED_PREFIX_MAX - 1)
        .collect();
    if label.is_empty() {
        "claim-".to_string()
    } else {
        format!("{label}-")
    }
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

#[async_trait]
impl ClusterApi for KubeApi {
    async fn publish_node(
        &self,
        node_id: &str,
        spec: BerthNodeSpec,
        status: BerthNodeStatus,
    ) -> Result<()> {
        let api: Api<BerthNode> = Api::all(self.client.clone());
        let what = format!("BerthNode {node_id}");
        // Forced: these fields are this node plugin's alone, whatever wrote them before.
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        let head = json!({ "apiVersion": "berth.csi.dev/v1alpha1", "kind": "BerthNode" });
        let mut obj = head.clone();
        obj["metadata"] = json!({ "name": node_id });
        obj["spec"] = json!(spec);
        // An apply of an unchanged spec writes nothing; the status subresource ignores a
        // spec and the main resource ignores a status, hence two requests.
        api.patch(node_id, &pp, &Patch::Apply(&obj))
            .await
            .map_err(api_error(&what))?;
        let mut obj = head;
        obj["metadata"] = json!({ "name": node_id });
        obj["status"] = json!(status);
        api.patch_status(node_id, &pp, &Patch::Apply(&obj))
            .await
            .map_err(api_error(&what))?;
        Ok(())
    }

    async fn list_nodes(&self) -> Result<Vec<DiscoveredNode>> {
        let api: Api<BerthNode> = Api::all(self.client.clone());
        let list = api
            .list(&ListParams::default())
            .await
            .map_err(api_error("list BerthNodes"))?;
        Ok(list
            .items
            .into_iter()
            .map(|n| DiscoveredNode {
                id: n.metadata.name.unwrap_or_default(),
                address: n.spec.agent_address,
                domain: n.spec.domain,
                status: n.status,
            })
            .collect())
    }

    async fn pvc_event(
        &self,
        namespace: &str,
        name: &str,
        reason: &str,
        message: &str,
        warning: bool,
    ) -> Result<()> {
        let what = format!("PersistentVolumeClaim {namespace}/{name}");
        // `kubectl describe pvc` selects events by the claim's uid as well as its name: an
        // event without it would not be shown there. A claim already gone still gets its
        // event, visible in `kubectl get events`.
        let uid = Api::<PersistentVolumeClaim>::namespaced(self.client.clone(), namespace)
            .get_opt(name)
            .await
            .map_err(api_error(&what))?
            .and_then(|c| c.metadata.uid);
        let regarding = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("PersistentVolumeClaim".into()),
            namespace: Some(namespace.to_string()),
            name: Some(name.to_string()),
            uid,
            ..ObjectReference::default()
        };
        let event = self.event(regarding, None, reason, message, warning);
        Api::<Event>::namespaced(self.client.clone(), namespace)
            .create(&PostParams::default(), &event)
            .await
            .map_err(api_error(format!("Event {reason} on {what}")))?;
        Ok(())
    }

    async fn volume_handle(&self, namespace: &str, pvc: &str) -> Result<Option<String>> {
        let what = format!("PersistentVolumeClaim {namespace}/{pvc}");
        let claim = Api::<PersistentVolumeClaim>::namespaced(self.client.clone(), namespace)
            .get(pvc)
            .await
            .map_err(api_error(&what))?;
        let bound = claim.status.and_then(|s| s.phase).as_deref() == Some("Bound");
        let Some(pv) = claim
            .spec
            .and_then(|s| s.volume_name)
            .filter(|n| bound && !n.is_empty())
        else {
            return Ok(None);
        };
        let volume = Api::<PersistentVolume>::all(self.client.clone())
            .get(&pv)
            .await
            .map_err(api_error(format!("PersistentVolume {pv} of {what}")))?;
        match volume.spec.and_then(|s| s.csi) {
            Some(csi) if csi.driver == self.driver => Ok(Some(csi.volume_handle)),
            Some(csi) => Err(Error::invalid(
                "pvc",
                format!(
                    "{what} is bound to {pv}, a volume of {} rather than {}",
                    csi.driver, self.driver
                ),
            )),
            None => Err(Error::invalid(
                "pvc",
                format!("{what} is bound to {pv}, which is not a CSI volume"),
            )),
        }
    }

    async fn watch_migrations(
        &self,
        namespace: Option<&str>,
    ) -> Result<BoxStream<'static, Result<MigrationEvent>>> {
        let api: Api<VolumeMigration> = match namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        };
        let list = api
            .list(&ListParams::default())
            .await
            .map_err(api_error("list VolumeMigrations"))?;
        let version = list.metadata.resource_version.unwrap_or_default();
        let listed = stream::iter([Ok(MigrationEvent::Listed(list.items))]);
        let watch = stream::once(async move {
            let wp = WatchParams::default().timeout(WATCH_TIMEOUT_SECS);
            match api.watch(&wp, &version).await {
                Ok(events) => events
                    .filter_map(|e| async move {
                        match e {
                            Ok(WatchEvent::Added(o) | WatchEvent::Modified(o)) => {
                                Some(Ok(MigrationEvent::Applied(o)))
                            }
                            Ok(WatchEvent::Deleted(o)) => Some(Ok(MigrationEvent::Deleted(o))),
                            Ok(WatchEvent::Bookmark(_)) => None,
                            // 410 Gone (the version is too old) among others: list again.
                            Ok(WatchEvent::Error(s)) => {
                                Some(Err(api_error("watch VolumeMigrations")(kube::Error::Api(
                                    s,
                                ))))
                            }
                            Err(e) => Some(Err(api_error("watch VolumeMigrations")(e))),
                        }
                    })
                    .boxed(),
                Err(e) => stream::iter([Err(api_error("watch VolumeMigrations")(e))]).boxed(),
            }
        })
        .flatten();
        Ok(listed.chain(watch).boxed())
    }

    async fn set_migration_status(
        &self,
        namespace: &str,
        name: &str,
        status: &VolumeMigrationStatus,
    ) -> Result<()> {
        Api::<VolumeMigration>::namespaced(self.client.clone(), namespace)
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": status })),
            )
            .await
            .map_err(api_error(format!("VolumeMigration {namespace}/{name}")))?;
        Ok(())
    }

    async fn try_acquire_lease(
        &self,
        namespace: &str,
        name: &str,
        holder: &str,
        duration_secs: u32,
    ) -> Result<bool> {
        let api: Api<Lease> = Api::namespaced(self.client.clone(), namespace);
        let what = format!("Lease {namespace}/{name}");
        let duration = i32::try_from(duration_secs).unwrap_or(i32::MAX);
        let now = now();
        let Some(mut lease) = api.get_opt(name).await.map_err(api_error(&what))? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.to_string()),
                    namespace: Some(namespace.to_string()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(holder.to_string()),
                    lease_duration_seconds: Some(duration),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                // Another candidate created it first (409 AlreadyExists).
                Err(e) if is_conflict(&e) => Ok(false),
                Err(e) => Err(api_error(&what)(e)),
            };
        };
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let current = spec.holder_identity.clone().unwrap_or_default();
        if current != holder {
            if !current.is_empty() {
                let valid = Duration::from_secs(
                    spec.lease_duration_seconds
                        .and_then(|s| u64::try_from(s).ok())
                        .unwrap_or(duration_secs.into()),
                );
                let key = (namespace.to_string(), name.to_string());
                if !self.lease_expired(key, &version, valid) {
                    return Ok(false);
                }
                tracing::info!(lease = %what, previous = %current, "taking over an expired lease");
            }
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.holder_identity = Some(holder.to_string());
        spec.lease_duration_seconds = Some(duration);
        spec.renew_time = Some(now);
        // The object carries the resourceVersion just read: if anyone wrote the Lease since,
        // the API server refuses the update with 409 and this candidate lost.
        match api.replace(name, &PostParams::default(), &lease).await {
            Ok(_) => {
                let key = (namespace.to_string(), name.to_string());
                self.leases
                    .lock()
                    .expect("lease observations poisoned")
                    .remove(&key);
                Ok(true)
            }
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(api_error(&what)(e)),
        }
    }

    async fn release_lease(&self, namespace: &str, name: &str, holder: &str) -> Result<()> {
        let api: Api<Lease> = Api::namespaced(self.client.clone(), namespace);
        let what = format!("Lease {namespace}/{name}");
        let Some(mut lease) = api.get_opt(name).await.map_err(api_error(&what))? else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(holder) {
            return Ok(());
        }
        // What client-go's ReleaseOnCancel writes: no holder, so the next candidate to look
        // takes it at once.
        let now = now();
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.acquire_time = Some(now.clone());
        spec.renew_time = Some(now);
        match api.replace(name, &PostParams::default(), &lease).await {
            // Written meanwhile by someone else: not ours to release any more.
            Err(e) if is_conflict(&e) => Ok(()),
            r => r.map(drop).map_err(api_error(&what)),
        }
    }

    async fn renew_node_lease(
        &self,
        namespace: &str,
        node: &str,
        duration_secs: u32,
    ) -> Result<()> {
        let name = node_lease_name(node)?;
        let api: Api<Lease> = Api::namespaced(self.client.clone(), namespace);
        let what = format!("Lease {namespace}/{name}");
        let duration = i32::try_from(duration_secs).unwrap_or(i32::MAX);
        let now = now();
        // A merge patch rather than a read and an update: the node is the Lease's one
        // writer, so there is no race for a resourceVersion to settle, and a renewal is one
        // request, which halves both the load of every node's renewals on the API server
        // and the ways a renewal can fail. renewTime (microseconds) differs at every
        // renewal, so each one is a write that moves the resourceVersion on.
        let patch = json!({
            "metadata": { "labels": { NODE_LEASE_LABEL: "" } },
            "spec": {
                "holderIdentity": node,
                "leaseDurationSeconds": duration,
                "renewTime": now,
            },
        });
        let renew = async || {
            api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map(drop)
        };
        match renew().await {
            Err(e) if is_not_found(&e) => {}
            r => return r.map_err(api_error(&what)),
        }
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.to_string()),
                labels: Some([(NODE_LEASE_LABEL.to_string(), String::new())].into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(node.to_string()),
                lease_duration_seconds: Some(duration),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        match api.create(&PostParams::default(), &lease).await {
            // Created meanwhile by another pod of this node (a rolling update of the
            // DaemonSet overlaps the old and the new one): renew it.
            Err(e) if is_conflict(&e) => renew().await.map_err(api_error(&what)),
            r => r.map(drop).map_err(api_error(&what)),
        }
    }

    async fn node_leases(&self, namespace: &str) -> Result<BTreeMap<String, String>> {
        let list = Api::<Lease>::namespaced(self.client.clone(), namespace)
            .list(&ListParams::default().labels(NODE_LEASE_LABEL))
            .await
            .map_err(api_error(format!("list node Leases in {namespace}")))?;
        Ok(list
            .items
            .into_iter()
            .filter_map(|l| {
                // The name, not holderIdentity, says whose it is: the name is what the node
                // renews, whatever else wrote the holder.
                let node = l
                    .metadata
                    .name?
                    .strip_prefix(NODE_LEASE_PREFIX)?
                    .to_string();
                Some((node, l.metadata.resource_version.unwrap_or_default()))
            })
            .collect())
    }

    async fn kubelet_leases(&self) -> Result<BTreeMap<String, KubeletLease>> {
        // A consistent read (never resourceVersion=0, a cache that may lag): a renewal
        // acknowledged before this list was asked must be in it (docs/moving.md, "Leases").
        let list = Api::<Lease>::namespaced(self.client.clone(), KUBELET_LEASE_NAMESPACE)
            .list(&ListParams::default())
            .await
            .map_err(api_error(format!(
                "list kubelet Leases in {KUBELET_LEASE_NAMESPACE}"
            )))?;
        Ok(list
            .items
            .into_iter()
            .filter_map(|l| {
                // The kubelet names its Lease after its Node, and owns nothing else there.
                let duration = l
                    .spec
                    .as_ref()
                    .and_then(|s| s.lease_duration_seconds)
                    .and_then(|d| u32::try_from(d).ok())
                    .unwrap_or(KUBELET_LEASE_DEFAULT_SECS);
                Some((
                    l.metadata.name?,
                    KubeletLease {
                        mark: l.metadata.resource_version.unwrap_or_default(),
                        duration_secs: duration,
                    },
                ))
            })
            .collect())
    }

    async fn out_of_service_nodes(&self) -> Result<BTreeSet<String>> {
        // Taints cannot be selected by the API server: every Node is listed.
        let list = Api::<Node>::all(self.client.clone())
            .list(&ListParams::default())
            .await
            .map_err(api_error("list Nodes"))?;
        Ok(list
            .items
            .into_iter()
            .filter(|n| {
                n.spec
                    .as_ref()
                    .and_then(|s| s.taints.as_ref())
                    .is_some_and(|taints| {
                        taints.iter().any(|t| {
                            t.key == OUT_OF_SERVICE_TAINT
                                && matches!(t.effect.as_str(), "NoExecute" | "NoSchedule")
                        })
                    })
            })
            .filter_map(|n| n.metadata.name)
            .collect())
    }

    async fn release_from_node(&self, volume_handle: &str, node: &str) -> Result<Released> {
        // A PersistentVolume cannot be selected by its CSI volume handle: every one is
        // listed, once per failed-over volume.
        let pvs = Api::<PersistentVolume>::all(self.client.clone())
            .list(&ListParams::default())
            .await
            .map_err(api_error("list PersistentVolumes"))?;
        let mut released = Released::default();
        for pv in pvs.items.into_iter().filter(|pv| {
            pv.spec
                .as_ref()
                .and_then(|s| s.csi.as_ref())
                .is_some_and(|c| c.driver == self.driver && c.volume_handle == volume_handle)
        }) {
            let pv_name = pv.metadata.name.unwrap_or_default();
            // Pods first: while a pod on the node still uses the claim, Kubernetes'
            // attach/detach controller wants the volume attached there and could attach it
            // again once its attachment is gone.
            if let Some(claim) = pv.spec.and_then(|s| s.claim_ref) {
                self.evict_pods(volume_handle, node, &claim, &mut released)
                    .await?;
            }
            let vas: Api<VolumeAttachment> = Api::all(self.client.clone());
            let list = vas
                .list(&ListParams::default())
                .await
                .map_err(api_error("list VolumeAttachments"))?;
            // One already being deleted is the external-attacher's to finish.
            for va in list.items.into_iter().filter(|va| {
                va.metadata.deletion_timestamp.is_none()
                    && va.spec.attacher == self.driver
                    && va.spec.node_name == node
                    && va.spec.source.persistent_volume_name.as_deref() == Some(pv_name.as_str())
            }) {
                let name = va.metadata.name.unwrap_or_default();
                // The external-attacher's finalizer stays: it sees the deletion, calls
                // ControllerUnpublishVolume for the lost node, which berth answers as done
                // (the volume is not there any more at the current epoch), and removes it.
                match vas.delete(&name, &DeleteParams::default()).await {
                    Ok(_) => released.attachments.push(name),
                    Err(e) if is_not_found(&e) => {}
                    Err(e) => return Err(api_error(format!("VolumeAttachment {name}"))(e)),
                }
            }
        }
        Ok(released)
    }
}

impl KubeApi {
    /// Force-deletes the pods on `node` that use `claim`, with a `PodEvicted` Event on each.
    async fn evict_pods(
        &self,
        volume_handle: &str,
        node: &str,
        claim: &ObjectReference,
        released: &mut Released,
    ) -> Result<()> {
        let (Some(ns), Some(claim_name)) = (claim.namespace.as_deref(), claim.name.as_deref())
        else {
            return Ok(());
        };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let list = pods
            .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
            .await
            .map_err(api_error(format!("list Pods on node {node} in {ns}")))?;
        let uses_claim = |p: &Pod| {
            p.spec.as_ref().is_some_and(|s| {
                s.volumes.iter().flatten().any(|v| {
                    v.persistent_volume_claim
                        .as_ref()
                        .is_some_and(|c| c.claim_name == claim_name)
                })
            })
        };
        for pod in list.items.into_iter().filter(uses_claim) {
            let name = pod.metadata.name.unwrap_or_default();
            let uid = pod.metadata.uid;
            // The uid listed: a StatefulSet recreates its pod under the same name, and that
            // new pod, wherever it runs, is not to be deleted.
            let dp = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions {
                    uid: uid.clone(),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            match pods.delete(&name, &dp).await {
                Ok(_) => {}
                // Gone, or replaced by a new pod of that name (409: the uid differs).
                Err(e) if is_not_found(&e) || is_conflict(&e) => continue,
                Err(e) => return Err(api_error(format!("Pod {ns}/{name}"))(e)),
            }
            let regarding = ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                namespace: Some(ns.to_string()),
                name: Some(name.clone()),
                uid,
                ..ObjectReference::default()
            };
            let related = ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("PersistentVolumeClaim".into()),
                namespace: Some(ns.to_string()),
                name: Some(claim_name.to_string()),
                uid: claim.uid.clone(),
                ..ObjectReference::default()
            };
            let message = format!(
                "berth failed volume {volume_handle} (claim {claim_name}) over from lost node \
                 {node} and deleted this pod, so that its controller recreates it on another node"
            );
            let event = self.event(regarding, Some(related), "PodEvicted", &message, true);
            // The pod is gone whatever happens to its Event: a failure to record it does not
            // undo the eviction, and a retry would find no pod to record it on.
            if let Err(e) = Api::<Event>::namespaced(self.client.clone(), ns)
                .create(&PostParams::default(), &event)
                .await
            {
                let e = api_error(format!("Event PodEvicted on Pod {ns}/{name}"))(e);
                tracing::warn!(error = %e, "cannot record an Event");
            }
            released.pods.push(format!("{ns}/{name}"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
