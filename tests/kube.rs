//! berth's Kubernetes layer (src/kube) against a real API server (etcd and kube-apiserver
//! v1.32, tests/common/apiserver.rs): every object berth writes, the CRDs of `berth crd` with
//! their schemas and CEL rules, watches, resourceVersion conflicts, the tasks (heartbeat,
//! node Lease, discovery, leader election, the migrations loop), the clean-up after a node
//! is lost, and the chart's RBAC under tokens of its own ServiceAccounts. The tower_test mocks in src/kube assert the exact requests; these
//! prove the API server accepts them, which a mock cannot: it took `generateName: "pg."`.
//!
//! One API server serves every test of this binary (started by the first test, with the
//! CRDs applied); each test works in its own namespace, BerthNodes and topology domain.

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    process::Command,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use async_trait::async_trait;
use berth::placement::{PlacementStore, ReplicaPlacement};
use berth::{
    error::Result,
    kube::{
        ClusterApi, KubeApi, MigrationEvent, Migrator, PlacementApi, Released,
        crd::{
            BerthNode, BerthNodeSpec, BerthNodeStatus, MigrationPhase, VolumeMigration,
            VolumeMigrationStatus,
        },
        discover_nodes, leader_election, migrations, node_heartbeat, node_lease,
    },
};
use common::{
    apiserver::{ApiServer, helm},
    placement::{contract, no_lost_update, record},
};
use futures::{StreamExt, future::BoxFuture};
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{Namespace, Node, PersistentVolume, PersistentVolumeClaim, Pod, ServiceAccount},
    events::v1::Event,
    storage::v1::VolumeAttachment,
};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use serde_json::{Value, json};
use tokio::sync::watch;
use tonic::Code;

const DRIVER: &str = "berth.csi.dev";

/// The API server of this test binary, with berth's CRDs applied as a user applies them:
/// `berth crd | kubectl apply -f -`.
fn server() -> Option<&'static ApiServer> {
    static SERVER: OnceLock<Option<ApiServer>> = OnceLock::new();
    SERVER
        .get_or_init(|| {
            let s = ApiServer::start()?;
            let out = Command::new(env!("CARGO_BIN_EXE_berth"))
                .arg("crd")
                .output()
                .expect("berth crd");
            assert!(out.status.success(), "berth crd failed");
            s.kubectl(
                &["apply", "-f", "-"],
                &String::from_utf8(out.stdout).unwrap(),
            );
            s.kubectl(
                &[
                    "wait",
                    "--for=condition=Established",
                    "--timeout=60s",
                    "crd/berthnodes.berth.csi.dev",
                    "crd/berthvolumes.berth.csi.dev",
                    "crd/volumemigrations.berth.csi.dev",
                ],
                "",
            );
            Some(s)
        })
        .as_ref()
}

fn from_json<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).expect("a valid object")
}

async fn namespace(admin: &kube::Client, name: &str) {
    Api::<Namespace>::all(admin.clone())
        .create(
            &PostParams::default(),
            &from_json(json!({ "metadata": { "name": name } })),
        )
        .await
        .unwrap();
}

/// A claim of berth's class; bound (as the PV controller would bind it: there is none here)
/// to a PersistentVolume of `driver` with volume handle `handle` when given.
async fn claim(
    admin: &kube::Client,
    ns: &str,
    name: &str,
    bound: Option<(&str, &str)>,
) -> PersistentVolumeClaim {
    let mut spec = json!({
        "accessModes": ["ReadWriteOnce"], "storageClassName": "berth",
        "resources": { "requests": { "storage": "1Gi" } },
    });
    if let Some((driver, handle)) = bound {
        let pv = format!("pv-{ns}-{name}");
        Api::<PersistentVolume>::all(admin.clone())
            .create(
                &PostParams::default(),
                &from_json(json!({
                    "metadata": { "name": pv },
                    "spec": {
                        "capacity": { "storage": "1Gi" }, "accessModes": ["ReadWriteOnce"],
                        "storageClassName": "berth",
                        "csi": { "driver": driver, "volumeHandle": handle },
                    },
                })),
            )
            .await
            .unwrap();
        spec["volumeName"] = json!(pv);
    }
    let api = Api::<PersistentVolumeClaim>::namespaced(admin.clone(), ns);
    let c = api
        .create(
            &PostParams::default(),
            &from_json(json!({ "metadata": { "name": name }, "spec": spec })),
        )
        .await
        .unwrap();
    if bound.is_none() {
        return c;
    }
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": { "phase": "Bound" } })),
    )
    .await
    .unwrap()
}

async fn create_migration(admin: &kube::Client, ns: &str, name: &str, pvc: &str) {
    Api::<VolumeMigration>::namespaced(admin.clone(), ns)
        .create(
            &PostParams::default(),
            &from_json(json!({
                "apiVersion": "berth.csi.dev/v1alpha1", "kind": "VolumeMigration",
                "metadata": { "name": name },
                "spec": { "pvc": pvc, "targetNode": "node-b" },
            })),
        )
        .await
        .unwrap();
}

/// What Kubernetes still holds of volume `handle` after node `<p>-lost` died, as the
/// scheduler, the PV controller and the attach/detach controller would have written it (none
/// runs here), in namespace `ns`: claim data-pg-0 bound to PV `<p>-pv` (the volume), claim
/// data-other to `<p>-pv-other`; Nodes `<p>-lost` (tainted out-of-service) and `<p>-live`;
/// pods pg-0 (lost node, data-pg-0), pg-1 (live node, data-pg-0), web-0 (lost node,
/// data-other), cache-0 (lost node, no claim); VolumeAttachments `<p>-va-lost` (the volume on
/// the lost node, with the external-attacher's finalizer), `<p>-va-live` (the volume on the
/// live node) and `<p>-va-other` (the other volume on the lost node).
async fn lost_node(admin: &kube::Client, ns: &str, p: &str, handle: &str) {
    // The default ServiceAccount, which the pods run as (no controller-manager makes it).
    Api::<ServiceAccount>::namespaced(admin.clone(), ns)
        .create(
            &PostParams::default(),
            &from_json(json!({ "metadata": { "name": "default" } })),
        )
        .await
        .unwrap();
    let nodes = Api::<Node>::all(admin.clone());
    for (node, taints) in [
        (
            format!("{p}-lost"),
            json!([{ "key": "node.kubernetes.io/out-of-service", "value": "nodeshutdown", "effect": "NoExecute" }]),
        ),
        (format!("{p}-live"), json!([])),
    ] {
        nodes
            .create(
                &PostParams::default(),
                &from_json(json!({ "metadata": { "name": node }, "spec": { "taints": taints } })),
            )
            .await
            .unwrap();
    }
    let claims = Api::<PersistentVolumeClaim>::namespaced(admin.clone(), ns);
    let pvs = Api::<PersistentVolume>::all(admin.clone());
    for (claim, pv, volume) in [
        ("data-pg-0", format!("{p}-pv"), handle.to_string()),
        (
            "data-other",
            format!("{p}-pv-other"),
            format!("{handle}-other"),
        ),
    ] {
        let c = claims
            .create(
                &PostParams::default(),
                &from_json(json!({
                    "metadata": { "name": claim },
                    "spec": {
                        "accessModes": ["ReadWriteOnce"], "storageClassName": "berth",
                        "resources": { "requests": { "storage": "1Gi" } }, "volumeName": pv,
                    },
                })),
            )
            .await
            .unwrap();
        pvs.create(
            &PostParams::default(),
            &from_json(json!({
                "metadata": { "name": pv },
                "spec": {
                    "capacity": { "storage": "1Gi" }, "accessModes": ["ReadWriteOnce"],
                    "storageClassName": "berth",
                    "csi": { "driver": DRIVER, "volumeHandle": volume },
                    "claimRef": {
                        "kind": "PersistentVolumeClaim", "apiVersion": "v1", "namespace": ns,
                        "name": claim, "uid": c.metadata.uid,
                    },
                },
            })),
        )
        .await
        .unwrap();
    }
    let pods = Api::<Pod>::namespaced(admin.clone(), ns);
    for (pod, node, claim) in [
        ("pg-0", "lost", Some("data-pg-0")),
        ("pg-1", "live", Some("data-pg-0")),
        ("web-0", "lost", Some("data-other")),
        ("cache-0", "lost", None),
    ] {
        let volumes: Vec<Value> = claim
            .map(|c| json!({ "name": "data", "persistentVolumeClaim": { "claimName": c } }))
            .into_iter()
            .collect();
        pods.create(
            &PostParams::default(),
            &from_json(json!({
                "metadata": { "name": pod },
                "spec": {
                    "nodeName": format!("{p}-{node}"),
                    "containers": [{ "name": "db", "image": "postgres" }],
                    "volumes": volumes,
                },
            })),
        )
        .await
        .unwrap();
    }
    let vas = Api::<VolumeAttachment>::all(admin.clone());
    for (va, node, pv, finalizers) in [
        (
            "va-lost",
            "lost",
            "pv",
            json!(["external-attacher/berth-csi-dev"]),
        ),
        ("va-live", "live", "pv", json!([])),
        ("va-other", "lost", "pv-other", json!([])),
    ] {
        vas.create(
            &PostParams::default(),
            &from_json(json!({
                "metadata": { "name": format!("{p}-{va}"), "finalizers": finalizers },
                "spec": {
                    "attacher": DRIVER, "nodeName": format!("{p}-{node}"),
                    "source": { "persistentVolumeName": format!("{p}-{pv}") },
                },
            })),
        )
        .await
        .unwrap();
    }
}

/// The pods left in `ns`, by name.
async fn pods_in(admin: &kube::Client, ns: &str) -> BTreeSet<String> {
    Api::<Pod>::namespaced(admin.clone(), ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect()
}

/// Polls `f` every 200 ms until it yields a value; panics after `secs` naming `what`.
async fn eventually<T, F: Future<Output = Option<T>>>(
    what: &str,
    secs: u64,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {secs} s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn code<T: std::fmt::Debug>(r: Result<T>) -> Code {
    r.expect_err("the API server should refuse this").code()
}

/// The API server's answer to a request berth does not make, by HTTP status.
fn http_status<T: std::fmt::Debug>(r: kube::Result<T>) -> u16 {
    match r.expect_err("the API server should refuse this") {
        kube::Error::Api(s) => s.code,
        e => panic!("not an API error: {e}"),
    }
}

async fn events_in(admin: &kube::Client, ns: &str) -> Vec<Event> {
    Api::<Event>::namespaced(admin.clone(), ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
}

fn status(total: u64, available: u64) -> BerthNodeStatus {
    BerthNodeStatus {
        total_bytes: total,
        available_bytes: available,
        heartbeat_time: "2026-03-01T10:00:00Z".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    }
}

fn spec(address: &str, domain: &str) -> BerthNodeSpec {
    BerthNodeSpec {
        agent_address: address.into(),
        domain: domain.into(),
    }
}

/// The reasons of berth's Events (src/cluster, src/kube/migrations.rs).
const REASONS: [&str; 13] = [
    "VolumeMoveStarted",
    "VolumeMoved",
    "VolumeMoveFailed",
    "ReplicationFailed",
    "ReplicationRecovered",
    "ProvisioningFailed",
    "NodeUnreachable",
    "NodeReachable",
    "MigrationStarted",
    "MigrationProgress",
    "MigrationReady",
    "MigrationCompleted",
    "MigrationFailed",
];

#[tokio::test]
async fn events_are_accepted_and_shown_by_kubectl_describe_pvc() {
    let Some(s) = server() else { return };
    let admin = s.admin().await;
    let ns = "events";
    namespace(&admin, ns).await;
    let pvc = claim(&admin, ns, "data-pg-0", None).await;
    // The longest claim name there is (253 characters, dotted labels), and a reporting
    // instance beyond the 128 characters events.k8s.io allows: berth cuts both to fit.
    let long = [
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(61),
    ]
    .join(".");
    assert_eq!(long.len(), 253);
    claim(&admin, ns, &long, None).await;
    let api = KubeApi::new(admin.clone(), DRIVER, "i".repeat(200));
    // Every reason berth records (docs/kubernetes.md, "What berth reports").
    for reason in REASONS {
        let warning = reason.ends_with("Failed");
        api.pvc_event(
            ns,
            "data-pg-0",
            reason,
            &format!("{reason}: moved volume vol-1 to node-b"),
            warning,
        )
        .await
        .unwrap_or_else(|e| panic!("{reason}: {e}"));
    }
    // A note beyond events.k8s.io's 1 kB, in two-byte characters.
    api.pvc_event(ns, "data-pg-0", "MigrationFailed", &"é".repeat(700), true)
        .await
        .expect("a Warning event");
    api.pvc_event(ns, &long, "VolumeMoveStarted", "moving", false)
        .await
        .expect("an event about a claim with the longest name");
    // A claim already gone still gets its event (without a uid).
    api.pvc_event(ns, "gone", "MigrationFailed", "ClaimNotFound", true)
        .await
        .expect("an event about a claim that does not exist");

    let events = events_in(&admin, ns).await;
    assert_eq!(events.len(), REASONS.len() + 3, "{events:#?}");
    let about = |name: &str| -> Vec<&Event> {
        events
            .iter()
            .filter(|e| e.regarding.as_ref().unwrap().name.as_deref() == Some(name))
            .collect()
    };
    let uid = pvc.metadata.uid.clone();
    for e in about("data-pg-0") {
        let name = e.metadata.name.as_deref().unwrap();
        assert!(name.starts_with("data-pg-0-"), "{name}");
        let r = e.regarding.as_ref().unwrap();
        assert_eq!(r.uid, uid);
        assert_eq!(r.kind.as_deref(), Some("PersistentVolumeClaim"));
        assert_eq!(
            e.reporting_controller.as_deref(),
            Some("berth.csi.dev/controller")
        );
        assert_eq!(e.reporting_instance.as_deref(), Some(&*"i".repeat(128)));
    }
    let warning = about("data-pg-0")
        .into_iter()
        .find(|e| e.note.as_deref().is_some_and(|n| n.starts_with('é')))
        .expect("the long note");
    assert_eq!(warning.type_.as_deref(), Some("Warning"));
    assert_eq!(warning.note.as_deref(), Some(&*"é".repeat(512)));
    assert_eq!(about(&long).len(), 1);
    assert!(about("gone")[0].regarding.as_ref().unwrap().uid.is_none());

    // What the user looks at (it selects the claim's events by uid as well as name).
    let described = s.kubectl(&["describe", "pvc", "data-pg-0", "-n", ns], "");
    for reason in REASONS {
        let want = format!("{reason}: moved volume vol-1 to node-b");
        assert!(described.contains(&want), "{want} missing:\n{described}");
    }
}

#[tokio::test]
async fn berth_crds_enforce_their_schemas_and_cel_rules() {
    let Some(s) = server() else { return };
    let admin = s.admin().await;
    let ns = "crd-rules";
    namespace(&admin, ns).await;
    let vms = Api::<VolumeMigration>::namespaced(admin.clone(), ns);
    create_migration(&admin, ns, "m1", "data-pg-0").await;

    // The spec is immutable (CEL `self == oldSelf`); metadata is not.
    let moved = vms
        .patch(
            "m1",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "targetNode": "node-c" } })),
        )
        .await;
    match moved {
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 422, "{e:?}");
            assert!(e.message.contains("spec is immutable"), "{}", e.message);
        }
        r => panic!("a changed spec was not refused: {r:?}"),
    }
    vms.patch(
        "m1",
        &PatchParams::default(),
        &Patch::Merge(json!({ "metadata": { "labels": { "team": "db" } } })),
    )
    .await
    .expect("a label is not the spec");

    // Schema: an empty claim name, a missing field (untyped: berth's types cannot say it).
    let untyped = Api::<DynamicObject>::namespaced_with(
        admin.clone(),
        ns,
        &ApiResource::erase::<VolumeMigration>(&()),
    );
    for spec in [
        json!({ "pvc": "", "targetNode": "node-b" }),
        json!({ "pvc": "data" }),
    ] {
        let bad = from_json::<DynamicObject>(json!({
            "apiVersion": "berth.csi.dev/v1alpha1", "kind": "VolumeMigration",
            "metadata": { "name": "bad" }, "spec": spec,
        }));
        assert_eq!(
            http_status(untyped.create(&PostParams::default(), &bad).await),
            422,
            "{spec}"
        );
    }
    let nodes = Api::<BerthNode>::all(admin.clone());
    let bad = BerthNode::new("crd-rules-bad", spec("", "d"));
    assert_eq!(
        http_status(nodes.create(&PostParams::default(), &bad).await),
        422
    );

    // The status berth writes is accepted through the status subresource; one beyond the
    // schema (percent over 100) is refused, as INVALID_ARGUMENT.
    let api = KubeApi::new(admin.clone(), DRIVER, "controller-0");
    let mut st = VolumeMigrationStatus {
        phase: MigrationPhase::Copying,
        bytes_done: 1 << 40,
        bytes_total: u64::MAX >> 1,
        percent: 0,
        round: 3,
        message: "copying".into(),
        conditions: vec![from_json(json!({
            "type": "Ready", "status": "False", "reason": "Copying", "message": "copying",
            "lastTransitionTime": "2026-03-01T10:00:00Z", "observedGeneration": 1,
        }))],
    };
    api.set_migration_status(ns, "m1", &st).await.unwrap();
    let got = vms.get("m1").await.unwrap();
    assert_eq!(got.status.as_ref(), Some(&st));
    st.percent = 101;
    assert_eq!(
        code(api.set_migration_status(ns, "m1", &st).await),
        Code::InvalidArgument
    );
    // A migration that is gone is NOT_FOUND (the worker stops).
    assert_eq!(
        code(api.set_migration_status(ns, "nope", &st).await),
        Code::NotFound
    );
}

#[tokio::test]
async fn berth_node_is_created_updated_taken_from_other_managers_and_discovered() {
    let Some(s) = server() else { return };
    let admin = s.admin().await;
    let nodes = Api::<BerthNode>::all(admin.clone());
    let api = Arc::new(KubeApi::new(admin.clone(), DRIVER, "node-a"));
    let name = "bn-publish-a";

    api.publish_node(name, spec("10.0.0.5:7070", "publish"), status(100, 90))
        .await
        .expect("create");
    api.publish_node(name, spec("10.0.0.6:7070", "publish"), status(100, 80))
        .await
        .expect("update");
    let n = nodes.get(name).await.unwrap();
    assert_eq!(n.spec, spec("10.0.0.6:7070", "publish"));
    assert_eq!(n.status, Some(status(100, 80)));

    // Someone else applies the address: berth's forced apply takes the field back.
    nodes
        .patch(
            name,
            &PatchParams::apply("someone-else").force(),
            &Patch::Apply(json!({
                "apiVersion": "berth.csi.dev/v1alpha1", "kind": "BerthNode",
                "metadata": { "name": name },
                "spec": { "agentAddress": "6.6.6.6:1", "domain": "publish" },
            })),
        )
        .await
        .unwrap();
    api.publish_node(name, spec("10.0.0.6:7070", "publish"), status(100, 70))
        .await
        .expect("a forced apply");
    assert_eq!(
        nodes.get(name).await.unwrap().spec.agent_address,
        "10.0.0.6:7070"
    );

    // The tasks: a heartbeat publishes a second node, discovery finds both.
    let (stop_tx, stop) = watch::channel(false);
    let beat = tokio::spawn(node_heartbeat(
        api.clone(),
        "bn-publish-b".into(),
        spec("10.0.0.7:7070", "publish"),
        || (200, 150),
        Duration::from_secs(1),
        stop.clone(),
    ));
    let seen = Arc::new(Mutex::new(Vec::<BTreeMap<String, String>>::new()));
    let sink = seen.clone();
    let discover = tokio::spawn(discover_nodes(
        api.clone(),
        "publish".into(),
        move |m| sink.lock().unwrap().push(m),
        Duration::from_secs(1),
        stop,
    ));
    let want = BTreeMap::from([
        ("bn-publish-a".to_string(), "10.0.0.6:7070".to_string()),
        ("bn-publish-b".to_string(), "10.0.0.7:7070".to_string()),
    ]);
    eventually("discovery of both nodes", 20, || async {
        seen.lock()
            .unwrap()
            .last()
            .filter(|m| **m == want)
            .map(drop)
    })
    .await;
    let first = nodes.get("bn-publish-b").await.unwrap().status.unwrap();
    assert_eq!((first.total_bytes, first.available_bytes), (200, 150));
    // The heartbeat time moves on (RFC 3339 to the second).
    eventually("a later heartbeat", 10, || async {
        let now = nodes.get("bn-publish-b").await.unwrap().status.unwrap();
        (now.heartbeat_time > first.heartbeat_time).then_some(())
    })
    .await;
    stop_tx.send(true).unwrap();
    beat.await.unwrap();
    discover.await.unwrap();
}

#[tokio::test]
async fn watch_migrations_lists_then_follows_creates_status_writes_and_deletes() {
    let Some(s) = server() else { return };
    let admin = s.admin().await;
    let ns = "watch";
    namespace(&admin, ns).await;
    create_migration(&admin, ns, "m1", "a").await;
    let api = KubeApi::new(admin.clone(), DRIVER, "controller-0");
    let mut events = api.watch_migrations(Some(ns)).await.unwrap();
    let Some(Ok(MigrationEvent::Listed(items))) = events.next().await else {
        panic!("no list first")
    };
    assert_eq!(items.len(), 1);
    let next = async |events: &mut futures::stream::BoxStream<'static, Result<MigrationEvent>>| {
        tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("a watch event")
            .expect("the watch goes on")
            .expect("no watch error")
    };
    // The watch starts when the stream is polled past the list, from the list's version.
    let pending = next(&mut events);
    let create = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        create_migration(&admin, ns, "m2", "b").await;
    };
    let (first, ()) = tokio::join!(pending, create);
    assert!(
        matches!(&first, MigrationEvent::Applied(m) if m.metadata.name.as_deref() == Some("m2")),
        "{first:?}"
    );
    let st = VolumeMigrationStatus {
        phase: MigrationPhase::Copying,
        percent: 50,
        ..Default::default()
    };
    api.set_migration_status(ns, "m2", &st).await.unwrap();
    let changed = next(&mut events).await;
    assert!(
        matches!(&changed, MigrationEvent::Applied(m) if m.status.as_ref().is_some_and(|s| s.percent == 50)),
        "{changed:?}"
    );
    Api::<VolumeMigration>::namespaced(admin.clone(), ns)
        .delete("m1", &DeleteParams::default())
        .await
        .unwrap();
    let gone = next(&mut events).await;
    assert!(
        matches!(&gone, MigrationEvent::Deleted(m) if m.metadata.name.as_deref() == Some("m1")),
        "{gone:?}"
    );
}

/// Copies nothing: reports one round in two steps; the volume lives on the target once the
/// pre-warm has finished.
struct FakeMigrator {
    moved: AtomicBool,
}

#[async_trait]
impl Migrator for FakeMigrator {
    async fn prewarm(
        &self,
        _volume_id: &str,
        _to: &str,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<()> {
        progress(10 << 20, 100 << 20);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        progress(100 << 20, 100 << 20);
        self.moved.store(true, Ordering::SeqCst);
        Ok(())
    }

    async fn primary_node(&self, _volume_id: &str) -> Result<Option<String>> {
        let node = if self.moved.load(Ordering::SeqCst) {
            "node-b"
        } else {
            "node-a"
        };
        Ok(Some(node.into()))
    }
}

#[tokio::test]
async fn the_migrations_loop_drives_a_migration_to_completed_and_fails_one_without_a_claim() {
    let Some(s) = server() else { return };
    let admin = s.admin().await;
    let ns = "migrate";
    namespace(&admin, ns).await;
    claim(&admin, ns, "data-pg-0", Some((DRIVER, "vol-8f2c"))).await;
    let api = Arc::new(KubeApi::new(admin.clone(), DRIVER, "controller-0"));
    let migrator = Arc::new(FakeMigrator {
        moved: AtomicBool::new(false),
    });
    let (stop_tx, stop) = watch::channel(false);
    let task = tokio::spawn(migrations(api, migrator, Some(ns.into()), stop));
    // Created after the loop listed: the watch brings them.
    create_migration(&admin, ns, "m1", "data-pg-0").await;
    create_migration(&admin, ns, "orphan", "no-such-claim").await;
    let vms = Api::<VolumeMigration>::namespaced(admin.clone(), ns);
    let phase = |name: &'static str, want: MigrationPhase| {
        let vms = vms.clone();
        async move {
            let vm = vms.get(name).await.unwrap();
            vm.status.filter(|s| s.phase == want)
        }
    };
    let failed = eventually("orphan Failed", 20, || {
        phase("orphan", MigrationPhase::Failed)
    })
    .await;
    assert!(failed.message.contains("no-such-claim"), "{failed:?}");
    let done = eventually("m1 Completed", 30, || {
        phase("m1", MigrationPhase::Completed)
    })
    .await;
    assert_eq!(done.percent, 100);
    assert_eq!(done.round, 1);
    // An Event is recorded beside the status write, not before it: wait for all of them.
    let wanted = [
        "MigrationStarted",
        "MigrationReady",
        "MigrationCompleted",
        "MigrationFailed",
    ];
    eventually("every migration Event", 20, || async {
        let reasons: Vec<String> = events_in(&admin, ns)
            .await
            .into_iter()
            .filter_map(|e| e.reason)
            .collect();
        wanted
            .iter()
            .all(|w| reasons.iter().any(|r| r == w))
            .then_some(())
    })
    .await;
    stop_tx.send(true).unwrap();
    task.await.unwrap();
}

#[tokio::test]
async fn leader_election_hands_the_lease_over_when_the_leader_stops() {
    let Some(s) = server() else { return };
    let admin = s.admin().await;
    let ns = "election";
    namespace(&admin, ns).await;
    let candidate = |holder: &'static str| {
        let api: Arc<dyn ClusterApi> = Arc::new(KubeApi::new(admin.clone(), DRIVER, holder));
        let (leader_tx, leader) = watch::channel(false);
        let (stop_tx, stop) = watch::channel(false);
        let task = tokio::spawn(leader_election(
            api,
            ns.into(),
            "berth-controller".into(),
            holder.into(),
            Duration::from_secs(6),
            leader_tx,
            stop,
        ));
        (leader, stop_tx, task)
    };
    let (mut a, stop_a, task_a) = candidate("controller-a");
    tokio::time::timeout(Duration::from_secs(10), a.wait_for(|l| *l))
        .await
        .expect("a leads")
        .unwrap();
    let (mut b, stop_b, task_b) = candidate("controller-b");
    // A renews every 2 s (a third of the lease; a slower renewal steps down): b never takes
    // over while a runs, longer than the lease lasts.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(*a.borrow() && !*b.borrow());
    stop_a.send(true).unwrap();
    task_a.await.unwrap();
    // Released: b takes it at its next try (within 2 s), not once the lease has stayed
    // unchanged for its 6 s.
    tokio::time::timeout(Duration::from_millis(4500), b.wait_for(|l| *l))
        .await
        .expect("b leads soon after a released")
        .unwrap();
    let lease = Api::<Lease>::namespaced(admin.clone(), ns)
        .get("berth-controller")
        .await
        .unwrap();
    let spec = lease.spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("controller-b"));
    // Created by a (0), taken over by b (1): a release is no transition.
    assert_eq!(spec.lease_transitions, Some(1));
    stop_b.send(true).unwrap();
    task_b.await.unwrap();
}

#[tokio::test]
async fn node_leases_are_created_renewed_by_the_task_and_listed_by_their_label() {
    let Some(s) = server() else { return };
    let admin = s.admin().await;
    let ns = "node-leases";
    namespace(&admin, ns).await;
    let api = Arc::new(KubeApi::new(admin.clone(), DRIVER, "node-a"));
    let leases = Api::<Lease>::namespaced(admin.clone(), ns);

    api.renew_node_lease(ns, "node-a", 10)
        .await
        .expect("created");
    let first = api.node_leases(ns).await.unwrap();
    api.renew_node_lease(ns, "node-a", 10)
        .await
        .expect("renewed");
    let second = api.node_leases(ns).await.unwrap();
    assert_eq!(first.keys().collect::<Vec<_>>(), ["node-a"]);
    assert_ne!(
        first["node-a"], second["node-a"],
        "a renewal changes the mark"
    );
    let lease = leases.get("berth-node-node-a").await.unwrap();
    let labels = lease.metadata.labels.unwrap();
    assert_eq!(
        labels.get("berth.csi.dev/node-lease").map(String::as_str),
        Some("")
    );
    let spec = lease.spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("node-a"));
    assert_eq!(spec.lease_duration_seconds, Some(10));
    assert!(spec.renew_time.is_some());

    // The longest node id a Lease name can carry is accepted; one longer is refused by
    // berth before the API server sees it.
    let longest = "n".repeat(242);
    api.renew_node_lease(ns, &longest, 10)
        .await
        .expect("a 253-character Lease name");
    assert_eq!(
        code(api.renew_node_lease(ns, &"n".repeat(243), 10).await),
        Code::InvalidArgument
    );
    // Another Lease of the namespace (the controllers' election) is no node's.
    assert!(
        api.try_acquire_lease(ns, "berth-controller", "c-0", 15)
            .await
            .unwrap()
    );
    let listed = api.node_leases(ns).await.unwrap();
    assert_eq!(
        listed.keys().cloned().collect::<BTreeSet<_>>(),
        BTreeSet::from(["node-a".to_string(), longest.clone()])
    );

    // The task: renews at once, then every second, each accepted renewal reported.
    let (stop_tx, stop) = watch::channel(false);
    let renewed = Arc::new(Mutex::new(Vec::new()));
    let sink = renewed.clone();
    let task = tokio::spawn(node_lease(
        api.clone(),
        ns.into(),
        "node-b".into(),
        Duration::from_secs(1),
        Duration::from_secs(10),
        move |sent| sink.lock().unwrap().push(sent),
        stop,
    ));
    let marks = Arc::new(Mutex::new(BTreeSet::new()));
    eventually(
        "three renewals of node-b, each seen as a new mark",
        20,
        || async {
            let now = api.node_leases(ns).await.unwrap();
            let mut marks = marks.lock().unwrap();
            if let Some(m) = now.get("node-b") {
                marks.insert(m.clone());
            }
            (marks.len() >= 3).then_some(())
        },
    )
    .await;
    stop_tx.send(true).unwrap();
    task.await.unwrap();
    assert!(renewed.lock().unwrap().len() >= 3);
}

#[tokio::test]
async fn release_from_node_evicts_only_the_claims_pod_there_and_deletes_only_its_attachment_there()
{
    let Some(s) = server() else { return };
    let admin = s.admin().await;
    let ns = "release";
    namespace(&admin, ns).await;
    lost_node(&admin, ns, "rel", "vol-rel").await;
    let api = KubeApi::new(admin.clone(), DRIVER, "controller-0");

    // The standard signal: the lost node is out of service, the live one is not.
    let oos = api.out_of_service_nodes().await.unwrap();
    assert!(
        oos.contains("rel-lost") && !oos.contains("rel-live"),
        "{oos:?}"
    );

    // Deleted as Kubernetes does on its own: without a kubelet to confirm, the pod on the
    // dead node stays Terminating.
    let pods = Api::<Pod>::namespaced(admin.clone(), ns);
    pods.delete("pg-0", &DeleteParams::default()).await.unwrap();
    let terminating = pods.get("pg-0").await.unwrap();
    assert!(terminating.metadata.deletion_timestamp.is_some());

    let released = api.release_from_node("vol-rel", "rel-lost").await.unwrap();
    assert_eq!(
        released,
        Released {
            attachments: vec!["rel-va-lost".into()],
            pods: vec![format!("{ns}/pg-0")],
        }
    );
    // The pod using the claim on the lost node is gone; the claim's pod elsewhere, and the
    // lost node's pods that do not use it, are left.
    assert_eq!(
        pods_in(&admin, ns).await,
        BTreeSet::from(["cache-0", "pg-1", "web-0"].map(String::from))
    );
    // The attachment there is being deleted, its finalizer left for the external-attacher
    // (after its ControllerUnpublishVolume); the others are untouched.
    let vas = Api::<VolumeAttachment>::all(admin.clone());
    let lost = vas.get("rel-va-lost").await.unwrap();
    assert!(lost.metadata.deletion_timestamp.is_some());
    assert_eq!(
        lost.metadata.finalizers,
        Some(vec!["external-attacher/berth-csi-dev".to_string()])
    );
    for other in ["rel-va-live", "rel-va-other"] {
        let va = vas.get(other).await.unwrap();
        assert!(va.metadata.deletion_timestamp.is_none(), "{other}");
    }
    // What the user sees on the pod.
    let events: Vec<Event> = events_in(&admin, ns)
        .await
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("PodEvicted"))
        .collect();
    assert_eq!(events.len(), 1, "{events:#?}");
    let e = &events[0];
    let regarding = e.regarding.as_ref().unwrap();
    assert_eq!(
        (regarding.kind.as_deref(), regarding.name.as_deref()),
        (Some("Pod"), Some("pg-0"))
    );
    assert_eq!(regarding.uid, terminating.metadata.uid);
    assert_eq!(e.type_.as_deref(), Some("Warning"));
    let note = e.note.as_deref().unwrap();
    assert!(
        note.contains("vol-rel") && note.contains("rel-lost"),
        "{note}"
    );
    assert_eq!(
        e.related.as_ref().and_then(|r| r.name.as_deref()),
        Some("data-pg-0")
    );

    // Done: a second call finds nothing left to do.
    assert_eq!(
        api.release_from_node("vol-rel", "rel-lost").await.unwrap(),
        Released::default()
    );
    // A volume with no PersistentVolume (not Kubernetes') has nothing to release.
    assert_eq!(
        api.release_from_node("vol-unknown", "rel-lost")
            .await
            .unwrap(),
        Released::default()
    );
}

type Hook = Box<dyn FnOnce() -> BoxFuture<'static, ()> + Send>;

/// A real connection that runs `hook` once, just before forwarding the first request with
/// `method` on `path`: a competing write lands between berth's read and its write.
#[derive(Clone)]
struct Interpose {
    real: kube::Client,
    method: http::Method,
    path: String,
    hook: Arc<Mutex<Option<Hook>>>,
}

impl tower::Service<http::Request<kube::client::Body>> for Interpose {
    type Response = http::Response<kube::client::Body>;
    type Error = kube::Error;
    type Future = BoxFuture<'static, kube::Result<Self::Response>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<kube::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<kube::client::Body>) -> Self::Future {
        let hook = if req.method() == self.method && req.uri().path() == self.path {
            self.hook.lock().unwrap().take()
        } else {
            None
        };
        let real = self.real.clone();
        Box::pin(async move {
            if let Some(hook) = hook {
                hook().await;
            }
            real.send(req).await
        })
    }
}

fn interposed(real: &kube::Client, method: http::Method, path: String, hook: Hook) -> KubeApi {
    let svc = Interpose {
        real: real.clone(),
        method,
        path,
        hook: Arc::new(Mutex::new(Some(hook))),
    };
    KubeApi::new(kube::Client::new(svc, "default"), DRIVER, "controller-a")
}

/// Makes `holder` the Lease's holder as another candidate would, through the admin client.
fn take_lease(admin: &kube::Client, ns: &str, name: &str, holder: &'static str) -> Hook {
    let leases = Api::<Lease>::namespaced(admin.clone(), ns);
    let name = name.to_string();
    Box::new(move || {
        Box::pin(async move {
            match leases.get_opt(&name).await.unwrap() {
                Some(mut l) => {
                    l.spec.as_mut().unwrap().holder_identity = Some(holder.into());
                    leases
                        .replace(&name, &PostParams::default(), &l)
                        .await
                        .unwrap();
                }
                None => {
                    let l: Lease = from_json(json!({
                        "metadata": { "name": name },
                        "spec": { "holderIdentity": holder, "leaseDurationSeconds": 15 },
                    }));
                    leases.create(&PostParams::default(), &l).await.unwrap();
                }
            }
        })
    })
}

#[tokio::test]
async fn a_lease_write_on_a_stale_resource_version_gets_409_and_loses() {
    let Some(s) = server() else { return };
    let admin = s.admin().await;
    let ns = "conflicts";
    namespace(&admin, ns).await;
    let leases = Api::<Lease>::namespaced(admin.clone(), ns);
    let holder = |name: &'static str| {
        let leases = leases.clone();
        async move {
            let l = leases.get(name).await.unwrap();
            l.spec.unwrap().holder_identity
        }
    };
    let path = |name: &str| format!("/apis/coordination.k8s.io/v1/namespaces/{ns}/leases{name}");

    // Two candidates create the Lease at once: the second create is 409 AlreadyExists.
    let api = interposed(
        &admin,
        http::Method::POST,
        path(""),
        take_lease(&admin, ns, "create-race", "controller-b"),
    );
    assert!(
        !api.try_acquire_lease(ns, "create-race", "controller-a", 15)
            .await
            .unwrap()
    );
    assert_eq!(holder("create-race").await.as_deref(), Some("controller-b"));

    // The holder renews on the version it read, but another candidate wrote since: 409,
    // and the holder knows it lost.
    let api = interposed(
        &admin,
        http::Method::PUT,
        path("/stale-renew"),
        take_lease(&admin, ns, "stale-renew", "controller-b"),
    );
    assert!(
        api.try_acquire_lease(ns, "stale-renew", "controller-a", 15)
            .await
            .unwrap(),
        "created"
    );
    assert!(
        !api.try_acquire_lease(ns, "stale-renew", "controller-a", 15)
            .await
            .unwrap(),
        "a stale renewal must lose"
    );
    assert_eq!(holder("stale-renew").await.as_deref(), Some("controller-b"));

    // A release that finds the Lease written meanwhile leaves it to its new holder.
    let api = interposed(
        &admin,
        http::Method::PUT,
        path("/stale-release"),
        take_lease(&admin, ns, "stale-release", "controller-b"),
    );
    assert!(
        api.try_acquire_lease(ns, "stale-release", "controller-a", 15)
            .await
            .unwrap()
    );
    api.release_lease(ns, "stale-release", "controller-a")
        .await
        .expect("a lost release is no error");
    assert_eq!(
        holder("stale-release").await.as_deref(),
        Some("controller-b")
    );
}

/// The kubelets' Leases as a kubelet writes them (name = the Node's, in kube-node-lease):
/// each renewal is a new mark, and the duration is the Lease's own.
#[tokio::test]
async fn kubelet_leases_are_listed_by_node_with_their_duration() {
    let Some(s) = server() else { return };
    let admin = s.admin().await;
    let leases = Api::<Lease>::namespaced(admin.clone(), "kube-node-lease");
    let kubelet = |node: &str, duration: i32| -> Lease {
        from_json(json!({
            "metadata": { "name": node },
            "spec": {
                "holderIdentity": node,
                "leaseDurationSeconds": duration,
                "renewTime": "2026-03-01T10:00:00.000000Z",
            },
        }))
    };
    leases
        .create(&PostParams::default(), &kubelet("kl-node-a", 40))
        .await
        .unwrap();
    leases
        .create(&PostParams::default(), &kubelet("kl-node-b", 20))
        .await
        .unwrap();
    let api = KubeApi::new(admin.clone(), DRIVER, "berth-controller-0");
    let first = api.kubelet_leases().await.unwrap();
    assert_eq!(first["kl-node-a"].duration_secs, 40);
    assert_eq!(first["kl-node-b"].duration_secs, 20);
    // A renewal, as the kubelet makes it: a new renewTime.
    leases
        .patch(
            "kl-node-a",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "renewTime": "2026-03-01T10:00:10.000000Z" } })),
        )
        .await
        .unwrap();
    let second = api.kubelet_leases().await.unwrap();
    assert_ne!(first["kl-node-a"].mark, second["kl-node-a"].mark);
    assert_eq!(first["kl-node-b"].mark, second["kl-node-b"].mark);
}

/// The chart's RBAC objects as `helm install berth charts/berth -n berth-system` renders
/// them with default values.
fn chart_rbac() -> Option<String> {
    let helm = helm()?;
    let out = Command::new(helm)
        .args([
            "template",
            "berth",
            "charts/berth",
            "--namespace",
            "berth-system",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("helm template");
    assert!(
        out.status.success(),
        "helm template failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered = String::from_utf8(out.stdout).unwrap();
    let rbac = [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
    ];
    let docs: Vec<&str> = rendered
        .split("\n---\n")
        .filter(|d| {
            d.lines()
                .filter_map(|l| l.strip_prefix("kind: "))
                .any(|k| rbac.contains(&k.trim()))
        })
        .collect();
    assert!(
        docs.len() >= 10,
        "too few RBAC objects rendered:\n{rendered}"
    );
    Some(docs.join("\n---\n"))
}

#[tokio::test]
async fn the_charts_rbac_allows_every_call_berth_makes_and_refuses_others() {
    let Some(rbac) = chart_rbac() else { return };
    let Some(s) = server() else { return };
    let admin = s.admin().await;
    let release = "berth-system";
    let ns = "rbac-db";
    namespace(&admin, release).await;
    namespace(&admin, ns).await;
    s.kubectl(&["apply", "-f", "-"], &rbac);
    claim(&admin, ns, "data-pg-0", Some((DRIVER, "vol-rbac"))).await;
    create_migration(&admin, ns, "m1", "data-pg-0").await;
    let controller_client = s.with_token(&s.token(release, "berth-controller")).await;
    let controller = KubeApi::new(controller_client.clone(), DRIVER, "berth-controller-0");
    let node_client = s.with_token(&s.token(release, "berth-node")).await;
    let node = KubeApi::new(node_client.clone(), DRIVER, "node-rbac");

    // The node plugin: its BerthNode, created, then updated.
    for available in [90, 80] {
        node.publish_node(
            "bn-rbac",
            spec("10.0.0.9:7070", "rbac"),
            status(100, available),
        )
        .await
        .expect("the node publishes its BerthNode");
    }

    // The controller: every ClusterApi call it makes.
    let listed = controller.list_nodes().await.expect("list BerthNodes");
    assert!(listed.iter().any(|n| n.id == "bn-rbac"));
    assert_eq!(
        controller
            .volume_handle(ns, "data-pg-0")
            .await
            .expect("claim and volume"),
        Some("vol-rbac".to_string())
    );
    controller
        .pvc_event(ns, "data-pg-0", "MigrationStarted", "copying", false)
        .await
        .expect("an Event");
    let mut events = controller
        .watch_migrations(None)
        .await
        .expect("list VolumeMigrations everywhere");
    assert!(matches!(
        events.next().await,
        Some(Ok(MigrationEvent::Listed(_)))
    ));
    let st = VolumeMigrationStatus {
        phase: MigrationPhase::Copying,
        message: "copying".into(),
        ..Default::default()
    };
    controller
        .set_migration_status(ns, "m1", &st)
        .await
        .expect("a status write");
    // The watch request itself (made once the stream is polled past the list) is allowed:
    // it brings the status write.
    let applied = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.next().await {
                Some(Ok(MigrationEvent::Applied(m))) if m.status.is_some() => return,
                Some(Ok(_)) => continue,
                other => panic!("watch VolumeMigrations: {other:?}"),
            }
        }
    });
    applied.await.expect("the status write, watched");
    assert!(
        controller
            .try_acquire_lease(release, "berth-controller", "berth-controller-0", 15)
            .await
            .expect("a Lease in the release namespace")
    );
    assert!(
        controller
            .try_acquire_lease(release, "berth-controller", "berth-controller-0", 15)
            .await
            .expect("a renewal")
    );
    controller
        .release_lease(release, "berth-controller", "berth-controller-0")
        .await
        .expect("a release");
    // The placement records: the controller creates, reads, updates and deletes them.
    let records = PlacementApi::new(s.with_token(&s.token(release, "berth-controller")).await);
    let rec = record("pvc-rbac", "node-a");
    let id = rec.id().unwrap();
    let created = records.create(&rec).await.expect("create a BerthVolume");
    let got = records.get(&id).await.expect("get a BerthVolume");
    assert_eq!(got.as_ref(), Some(&created));
    let mut moved = rec.clone();
    moved.primary = "node-b".into();
    moved.epoch = 2;
    let updated = records
        .replace(&moved, &created.version)
        .await
        .expect("update a BerthVolume");
    let page = records.list(None, 10).await.expect("list BerthVolumes");
    assert!(page.records.contains(&updated));

    // Node loss: the node plugin creates and renews its Lease in the release namespace; the
    // controller lists those Leases and the out-of-service Nodes, and releases a volume it
    // failed over from a lost node (every request of release_from_node, the deletes and the
    // Event included).
    let lost_ns = "rbac-lost";
    namespace(&admin, lost_ns).await;
    lost_node(&admin, lost_ns, "rbac", "vol-rbac-lost").await;
    for _ in 0..2 {
        node.renew_node_lease(release, "node-rbac", 10)
            .await
            .expect("the node plugin creates, then renews, its Lease");
    }
    let leases = controller.node_leases(release).await.expect("list Leases");
    assert!(leases.contains_key("node-rbac"), "{leases:?}");
    controller
        .kubelet_leases()
        .await
        .expect("list the kubelets' Leases in kube-node-lease");
    let oos = controller.out_of_service_nodes().await.expect("list Nodes");
    assert!(oos.contains("rbac-lost"), "{oos:?}");
    assert_eq!(
        controller
            .release_from_node("vol-rbac-lost", "rbac-lost")
            .await
            .expect("list PVs, pods and VolumeAttachments; delete a pod and a VolumeAttachment"),
        Released {
            attachments: vec!["rbac-va-lost".into()],
            pods: vec![format!("{lost_ns}/pg-0")],
        }
    );
    // A failed Event does not fail the call: see that it was recorded.
    assert!(
        events_in(&admin, lost_ns)
            .await
            .iter()
            .any(|e| e.reason.as_deref() == Some("PodEvicted")),
        "no PodEvicted Event"
    );

    // What each identity must not do.
    assert_eq!(code(node.list_nodes().await), Code::PermissionDenied);
    assert_eq!(
        code(node.set_migration_status(ns, "m1", &st).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(node.pvc_event(ns, "data-pg-0", "Moved", "m", false).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(node.volume_handle(ns, "data-pg-0").await),
        Code::PermissionDenied
    );
    assert_eq!(
        http_status(
            Api::<PersistentVolumeClaim>::namespaced(node_client.clone(), ns)
                .delete("data-pg-0", &DeleteParams::default())
                .await
        ),
        403
    );
    assert_eq!(
        http_status(
            Api::<BerthNode>::all(node_client.clone())
                .delete("bn-rbac", &DeleteParams::default())
                .await
        ),
        403
    );
    // Only the controller writes placement records: a node plugin's token can neither make
    // one nor change who is primary.
    let node_records = PlacementApi::new(node_client.clone());
    assert_eq!(
        code(node_records.create(&record("pvc-node", "node-a")).await),
        Code::PermissionDenied
    );
    let mut grab = moved.clone();
    grab.primary = "node-rbac".into();
    grab.epoch = 3;
    assert_eq!(
        code(node_records.replace(&grab, &updated.version).await),
        Code::PermissionDenied
    );
    records
        .delete(&id, &updated.version)
        .await
        .expect("delete a BerthVolume");
    assert_eq!(records.get(&id).await.expect("get after delete"), None);
    assert_eq!(
        code(
            controller
                .publish_node("bn-rbac", spec("1.2.3.4:1", "rbac"), status(1, 1))
                .await
        ),
        Code::PermissionDenied
    );
    assert_eq!(
        code(
            controller
                .try_acquire_lease("default", "berth-controller", "x", 15)
                .await
        ),
        Code::PermissionDenied
    );
    // Node loss: the node plugin renews its Lease, in the release namespace only, and does
    // nothing else of failover; the controller never writes a node's Lease.
    assert_eq!(
        code(node.renew_node_lease("default", "node-rbac", 10).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(controller.renew_node_lease(release, "node-x", 10).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(node.node_leases(release).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(node.out_of_service_nodes().await),
        Code::PermissionDenied
    );
    assert_eq!(code(node.kubelet_leases().await), Code::PermissionDenied);
    // Reading the kubelets' Leases is all: the controller never writes one.
    assert_eq!(
        http_status(
            Api::<Lease>::namespaced(controller_client.clone(), "kube-node-lease")
                .delete("node-rbac", &DeleteParams::default())
                .await
        ),
        403
    );
    assert_eq!(
        code(node.release_from_node("vol-rbac-lost", "rbac-lost").await),
        Code::PermissionDenied
    );
    assert_eq!(
        http_status(
            Api::<Pod>::namespaced(node_client.clone(), lost_ns)
                .delete("pg-1", &DeleteParams::default())
                .await
        ),
        403
    );
    assert_eq!(
        http_status(
            Api::<VolumeAttachment>::all(node_client.clone())
                .delete("rbac-va-live", &DeleteParams::default())
                .await
        ),
        403
    );
    assert_eq!(
        http_status(
            Api::<Lease>::namespaced(node_client.clone(), release)
                .delete("berth-node-node-rbac", &DeleteParams::default())
                .await
        ),
        403
    );
}

/// The placement record's Kubernetes store: BerthVolumes keep the store contract, and two
/// controllers, each on its own connection, raising one record's epoch lose no update:
/// resourceVersion is a true compare-and-swap.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn berth_volumes_keep_the_placement_store_contract() {
    let Some(s) = server() else { return };
    contract(&PlacementApi::new(s.admin().await)).await;
    let stores: Vec<Arc<dyn PlacementStore>> = vec![
        Arc::new(PlacementApi::new(s.admin().await)),
        Arc::new(PlacementApi::new(s.admin().await)),
    ];
    no_lost_update(stores, 25).await;
    // What `kubectl get berthvolumes` shows, from the CRD's printer columns: each replica's
    // node and, as an age, how old its newest snapshot is (its lag).
    // Half a minute past the given minute (and half an hour past the hour), so that seconds
    // either way (rounding, the time until kubectl runs) do not change what kubectl prints:
    // 4h30m less half a second would be "4h29m", 3h less a second "179m".
    let ago = |minutes: i64| {
        (k8s_openapi::jiff::Timestamp::now()
            - k8s_openapi::jiff::SignedDuration::from_secs(minutes * 60 + 30))
        .round(k8s_openapi::jiff::Unit::Second)
        .unwrap()
        .to_string()
    };
    let mut rec = record("pvc-columns", "node-a");
    rec.replicas = vec![
        ReplicaPlacement {
            node: "node-b".into(),
            snapshot: "s-b".into(),
            snapshot_time: ago(4 * 60 + 30),
        },
        ReplicaPlacement {
            node: "node-c".into(),
            snapshot: "s-c".into(),
            snapshot_time: ago(26 * 60 + 30),
        },
    ];
    let store = PlacementApi::new(s.admin().await);
    store.create(&rec).await.unwrap();
    let rows = |wide: bool| {
        let mut args = vec!["get", "berthvolumes", rec.volume_id.as_str()];
        if wide {
            args.extend(["-o", "wide"]);
        }
        let table = s.kubectl(&args, "");
        let mut lines = table.lines();
        let header: Vec<String> = lines
            .next()
            .unwrap_or_default()
            .split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(String::from)
            .collect();
        let row: Vec<String> = lines
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .map(String::from)
            .collect();
        (header, row, table)
    };
    // The claim is empty (kubectl prints nothing for it), so the row has one cell fewer.
    let (header, row, table) = rows(false);
    assert_eq!(
        header,
        [
            "NAME",
            "CLAIM",
            "PRIMARY",
            "REPLICA",
            "REPLICA AGE",
            "EPOCH",
            "PHASE",
            "FAILED OVER FROM",
            "AGE"
        ],
        "{table}"
    );
    assert_eq!(row[1..5], ["node-a", "node-b", "4h30m", "1"], "{table}");
    assert_eq!(row[5], "Ready", "{table}");
    let (header, row, table) = rows(true);
    assert_eq!(header[7..9], ["REPLICA 2", "REPLICA 2 AGE"], "{table}");
    assert_eq!(row[6..8], ["node-c", "26h"], "{table}");
}
