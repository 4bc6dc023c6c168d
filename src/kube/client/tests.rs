//! [`KubeApi`] against a mock API server: every request's verb, path, query and body.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use tonic::Code;

use super::*;
use crate::kube::testing::{INSTANCE, Seen, pair, scrubbed};

const APPLY: &str = "application/apply-patch+yaml";
const MERGE: &str = "application/merge-patch+json";

fn spec() -> BerthNodeSpec {
    BerthNodeSpec {
        agent_address: "10.0.0.5:7070".into(),
        domain: "default".into(),
    }
}

fn status() -> BerthNodeStatus {
    BerthNodeStatus {
        total_bytes: 64 << 30,
        available_bytes: 60 << 30,
        heartbeat_time: "2026-03-01T10:00:00Z".into(),
        version: "0.1.0".into(),
    }
}

fn berth_node(name: &str, with_status: bool) -> Value {
    let mut v = json!({
        "apiVersion": "berth.csi.dev/v1alpha1", "kind": "BerthNode",
        "metadata": { "name": name, "resourceVersion": "42", "uid": format!("uid-{name}") },
        "spec": { "agentAddress": format!("{name}.pods:7070"), "domain": "default" },
    });
    if with_status {
        v["status"] = json!(status());
    }
    v
}

fn code(e: &Error) -> Code {
    e.code()
}

#[tokio::test]
async fn publish_node_applies_the_spec_then_the_status() {
    let (api, mut server) = pair();
    let call = api.publish_node("node-a", spec(), status());
    let serve = async {
        let (s, reply) = server.next().await;
        assert_eq!(
            s.line(),
            "PATCH /apis/berth.csi.dev/v1alpha1/berthnodes/node-a?&force=true&fieldManager=berth"
        );
        assert_eq!(s.content_type.as_deref(), Some(APPLY));
        assert_eq!(
            s.body,
            json!({
                "apiVersion": "berth.csi.dev/v1alpha1", "kind": "BerthNode",
                "metadata": { "name": "node-a" },
                "spec": { "agentAddress": "10.0.0.5:7070", "domain": "default" },
            })
        );
        reply.json(201, berth_node("node-a", false));
        let (s, reply) = server.next().await;
        assert_eq!(
            s.line(),
            "PATCH /apis/berth.csi.dev/v1alpha1/berthnodes/node-a/status?&force=true&fieldManager=berth"
        );
        assert_eq!(s.content_type.as_deref(), Some(APPLY));
        assert_eq!(
            s.body,
            json!({
                "apiVersion": "berth.csi.dev/v1alpha1", "kind": "BerthNode",
                "metadata": { "name": "node-a" },
                "status": {
                    "totalBytes": 64u64 << 30, "availableBytes": 60u64 << 30,
                    "heartbeatTime": "2026-03-01T10:00:00Z", "version": "0.1.0",
                },
            })
        );
        reply.json(200, berth_node("node-a", true));
    };
    let (r, ()) = tokio::join!(call, serve);
    r.unwrap();
}

#[tokio::test]
async fn server_errors_surface_as_unavailable_and_stop_the_call() {
    // (status code, body): a Status from the API server, and plain text from a proxy.
    for (http_status, text) in [
        (500, None),
        (503, Some("upstream connect error")),
        (429, None),
    ] {
        let (api, mut server) = pair();
        let call = api.publish_node("node-a", spec(), status());
        let serve = async {
            let (_, reply) = server
                .expect(
                    "PATCH",
                    "/apis/berth.csi.dev/v1alpha1/berthnodes/node-a?&force=true&fieldManager=berth",
                )
                .await;
            match text {
                Some(t) => reply.text(http_status, t),
                None => reply.status(
                    http_status,
                    "InternalError",
                    "etcdserver: request timed out",
                ),
            }
        };
        let (r, ()) = tokio::join!(call, serve);
        let e = r.unwrap_err();
        assert!(
            matches!(&e, Error::Unreachable { node, .. } if node == "kubernetes api"),
            "{http_status}: {e:?}"
        );
        assert_eq!(code(&e), Code::Unavailable);
        assert!(e.to_string().contains("BerthNode node-a"), "{e}");
        // No status write after the failed spec write.
        drop(api);
        assert!(server.next_if_any().await.is_none());
    }
}

#[tokio::test]
async fn list_nodes_returns_every_berth_node() {
    let (api, mut server) = pair();
    let serve = async {
        let (body, reply) = server
            .expect("GET", "/apis/berth.csi.dev/v1alpha1/berthnodes?")
            .await;
        assert_eq!(body, Value::Null);
        reply.json(
            200,
            json!({
                "apiVersion": "berth.csi.dev/v1alpha1", "kind": "BerthNodeList",
                "metadata": { "resourceVersion": "77" },
                "items": [berth_node("node-a", true), berth_node("node-b", false)],
            }),
        );
    };
    let (r, ()) = tokio::join!(api.list_nodes(), serve);
    assert_eq!(
        r.unwrap(),
        [
            DiscoveredNode {
                id: "node-a".into(),
                address: "node-a.pods:7070".into(),
                domain: "default".into(),
                status: Some(status()),
            },
            DiscoveredNode {
                id: "node-b".into(),
                address: "node-b.pods:7070".into(),
                domain: "default".into(),
                status: None,
            },
        ]
    );
}

#[tokio::test]
async fn list_nodes_without_the_crd_is_not_found() {
    // A CRD that is not installed: the API server answers a bare 404 page.
    let (api, mut server) = pair();
    let serve = async {
        let (_, reply) = server
            .expect("GET", "/apis/berth.csi.dev/v1alpha1/berthnodes?")
            .await;
        reply.text(404, "404 page not found");
    };
    let (r, ()) = tokio::join!(api.list_nodes(), serve);
    let e = r.unwrap_err();
    assert_eq!(code(&e), Code::NotFound, "{e}");
    assert!(e.to_string().contains("404 page not found"), "{e}");
}

fn claim(phase: &str, volume: Option<&str>) -> Value {
    let mut v = json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": { "name": "data-pg-0", "namespace": "db", "uid": "pvc-uid-1", "resourceVersion": "5" },
        "spec": { "accessModes": ["ReadWriteOnce"], "storageClassName": "berth" },
        "status": { "phase": phase },
    });
    if let Some(pv) = volume {
        v["spec"]["volumeName"] = json!(pv);
    }
    v
}

fn volume(driver: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": { "name": "pvc-1234" },
        "spec": {
            "capacity": { "storage": "20Gi" },
            "csi": { "driver": driver, "volumeHandle": "vol-8f2c", "fsType": "ext4" },
        },
        "status": { "phase": "Bound" },
    })
}

fn not_found(kind: &str, name: &str) -> String {
    format!("{kind} \"{name}\" not found")
}

#[tokio::test]
async fn pvc_event_is_an_events_k8s_io_event_regarding_the_claim() {
    // (claim found, warning, message): the claim's uid goes into `regarding` when it exists.
    for (found, warning, message) in [
        (
            true,
            false,
            "copying volume vol-8f2c to node node-b".to_string(),
        ),
        (false, true, "é".repeat(600)),
    ] {
        let (api, mut server) = pair();
        let reason = if warning {
            "MigrationFailed"
        } else {
            "MigrationStarted"
        };
        let call = api.pvc_event("db", "data-pg-0", reason, &message, warning);
        let serve = async {
            let (_, reply) = server
                .expect(
                    "GET",
                    "/api/v1/namespaces/db/persistentvolumeclaims/data-pg-0",
                )
                .await;
            if found {
                reply.json(200, claim("Bound", Some("pvc-1234")));
            } else {
                reply.status(
                    404,
                    "NotFound",
                    &not_found("persistentvolumeclaims", "data-pg-0"),
                );
            }
            let (body, reply) = server
                .expect("POST", "/apis/events.k8s.io/v1/namespaces/db/events?")
                .await;
            // 600 two-byte characters: cut at 1024 bytes, on a character boundary.
            let note = if found {
                message.clone()
            } else {
                "é".repeat(512)
            };
            let mut regarding = json!({
                "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "namespace": "db", "name": "data-pg-0",
            });
            if found {
                regarding["uid"] = json!("pvc-uid-1");
            }
            assert_eq!(
                scrubbed(body.clone()),
                json!({
                    "apiVersion": "events.k8s.io/v1", "kind": "Event",
                    "metadata": { "generateName": "data-pg-0-", "namespace": "db" },
                    "eventTime": "<now>",
                    "action": reason, "reason": reason, "note": note,
                    "type": if warning { "Warning" } else { "Normal" },
                    "reportingController": "berth.csi.dev/controller",
                    "reportingInstance": INSTANCE,
                    "regarding": regarding,
                })
            );
            // MicroTime: microseconds, as events.k8s.io requires.
            let t = body["eventTime"].as_str().unwrap();
            assert_eq!(t.len(), "2026-03-01T10:00:00.000000Z".len(), "{t}");
            let mut created = body;
            created["metadata"]["name"] = json!("data-pg-0-x7k2p");
            reply.json(201, created);
        };
        let (r, ()) = tokio::join!(call, serve);
        r.unwrap();
    }
}

#[test]
fn event_name_prefix_is_one_dns_label_the_server_keeps_whole() {
    let long = "a".repeat(253);
    let dotted = format!("{}.{}", "b".repeat(56), "c".repeat(60));
    for (name, want) in [
        ("data-pg-0", "data-pg-0-"),
        ("pg", "pg-"),
        ("db.primary", "db-primary-"),
        ("Data_PG", "data-pg-"),
        ("-x", "x-"),
        ("_.-", "claim-"),
        (long.as_str(), &format!("{}-", "a".repeat(57))),
        // Cut right after a dot: the prefix still ends in `-`, not `.`.
        (dotted.as_str(), &format!("{}--", "b".repeat(56))),
    ] {
        let got = event_name_prefix(name);
        assert_eq!(got, want, "{name}");
        assert!(got.len() <= GENERATED_PREFIX_MAX, "{name}");
    }
}

#[tokio::test]
async fn volume_handle_follows_the_claim_to_its_csi_volume() {
    const GET_CLAIM: &str = "/api/v1/namespaces/db/persistentvolumeclaims/data-pg-0";
    const GET_PV: &str = "/api/v1/persistentvolumes/pvc-1234";
    enum PvAnswer {
        None,
        Volume(&'static str),
        Missing,
    }
    /// The volume handle, or the error's code.
    type Want = Result<Option<&'static str>, Code>;
    // (claim answer, PV answer, expected)
    let cases: Vec<(Option<Value>, PvAnswer, Want)> = vec![
        (
            Some(claim("Bound", Some("pvc-1234"))),
            PvAnswer::Volume("berth.csi.dev"),
            Ok(Some("vol-8f2c")),
        ),
        (Some(claim("Pending", None)), PvAnswer::None, Ok(None)),
        // Bound by the controller but not yet marked so: still waiting.
        (
            Some(claim("Pending", Some("pvc-1234"))),
            PvAnswer::None,
            Ok(None),
        ),
        (None, PvAnswer::None, Err(Code::NotFound)),
        (
            Some(claim("Bound", Some("pvc-1234"))),
            PvAnswer::Volume("ebs.csi.aws.com"),
            Err(Code::InvalidArgument),
        ),
        (
            Some(claim("Bound", Some("pvc-1234"))),
            PvAnswer::Missing,
            Err(Code::NotFound),
        ),
    ];
    for (n, (claim_answer, pv_answer, want)) in cases.into_iter().enumerate() {
        let (api, mut server) = pair();
        let serve = async {
            let (body, reply) = server.expect("GET", GET_CLAIM).await;
            assert_eq!(body, Value::Null);
            match claim_answer {
                Some(c) => reply.json(200, c),
                None => reply.status(
                    404,
                    "NotFound",
                    &not_found("persistentvolumeclaims", "data-pg-0"),
                ),
            }
            match pv_answer {
                PvAnswer::None => {}
                PvAnswer::Volume(driver) => server
                    .expect("GET", GET_PV)
                    .await
                    .1
                    .json(200, volume(driver)),
                PvAnswer::Missing => server.expect("GET", GET_PV).await.1.status(
                    404,
                    "NotFound",
                    &not_found("persistentvolumes", "pvc-1234"),
                ),
            }
        };
        let (r, ()) = tokio::join!(api.volume_handle("db", "data-pg-0"), serve);
        let got = r.as_ref().map(|h| h.as_deref()).map_err(|e| e.code());
        assert_eq!(got, want, "case {n}: {r:?}");
        if let Err(e) = &r {
            assert!(e.to_string().contains("db/data-pg-0"), "case {n}: {e}");
        }
    }
}

#[tokio::test]
async fn set_migration_status_merge_patches_the_status_subresource() {
    let (api, mut server) = pair();
    let status = VolumeMigrationStatus {
        phase: crate::kube::crd::MigrationPhase::Copying,
        bytes_done: 512 << 20,
        bytes_total: 2 << 30,
        percent: 25,
        round: 1,
        message: "copying volume vol-8f2c to node node-b".into(),
        conditions: vec![],
    };
    let call = api.set_migration_status("db", "pg-to-b", &status);
    let serve = async {
        let (s, reply) = server.next().await;
        assert_eq!(
            s.line(),
            "PATCH /apis/berth.csi.dev/v1alpha1/namespaces/db/volumemigrations/pg-to-b/status?"
        );
        assert_eq!(s.content_type.as_deref(), Some(MERGE));
        assert_eq!(
            s.body,
            json!({ "status": {
                "phase": "Copying", "bytesDone": 512u64 << 20, "bytesTotal": 2u64 << 30,
                "percent": 25, "round": 1, "message": "copying volume vol-8f2c to node node-b",
                "conditions": [],
            }})
        );
        reply.json(
            200,
            json!({
                "apiVersion": "berth.csi.dev/v1alpha1", "kind": "VolumeMigration",
                "metadata": { "name": "pg-to-b", "namespace": "db", "generation": 1 },
                "spec": { "pvc": "data-pg-0", "targetNode": "node-b" },
                "status": s.body["status"],
            }),
        );
    };
    let (r, ()) = tokio::join!(call, serve);
    r.unwrap();

    // The VolumeMigration deleted meanwhile: NOT_FOUND, which the migrations loop reads as
    // "gone".
    let call = api.set_migration_status("db", "pg-to-b", &status);
    let serve = async {
        let (_, reply) = server.next().await;
        reply.status(
            404,
            "NotFound",
            &not_found("volumemigrations.berth.csi.dev", "pg-to-b"),
        );
    };
    let (r, ()) = tokio::join!(call, serve);
    assert_eq!(r.unwrap_err().code(), Code::NotFound);
}

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/berth-system/leases";
const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/berth-system/leases/berth-controller";

fn lease(holder: Option<&str>, version: &str, transitions: i32) -> Value {
    let mut spec = json!({
        "leaseDurationSeconds": 15,
        "acquireTime": "2026-03-01T09:00:00.000000Z",
        "renewTime": "2026-03-01T10:00:00.000000Z",
        "leaseTransitions": transitions,
    });
    if let Some(h) = holder {
        spec["holderIdentity"] = json!(h);
    }
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": { "name": "berth-controller", "namespace": "berth-system", "resourceVersion": version },
        "spec": spec,
    })
}

async fn acquire(
    api: &KubeApi,
    server: &mut crate::kube::testing::Server,
    script: impl AsyncFnOnce(&mut crate::kube::testing::Server),
) -> Result<bool> {
    let call = api.try_acquire_lease("berth-system", "berth-controller", "controller-a", 15);
    let (r, ()) = tokio::join!(call, script(server));
    r
}

#[tokio::test]
async fn an_absent_lease_is_created_for_the_holder() {
    let (api, mut server) = pair();
    let r = acquire(&api, &mut server, async |s| {
        let (body, reply) = s.expect("GET", LEASE).await;
        assert_eq!(body, Value::Null);
        reply.status(
            404,
            "NotFound",
            &not_found("leases.coordination.k8s.io", "berth-controller"),
        );
        let (body, reply) = s.expect("POST", &format!("{LEASES}?")).await;
        assert_eq!(
            scrubbed(body.clone()),
            json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": { "name": "berth-controller", "namespace": "berth-system" },
                "spec": {
                    "holderIdentity": "controller-a", "leaseDurationSeconds": 15,
                    "acquireTime": "<now>", "renewTime": "<now>", "leaseTransitions": 0,
                },
            })
        );
        let mut created = body;
        created["metadata"]["resourceVersion"] = json!("1");
        reply.json(201, created);
    })
    .await;
    assert!(r.unwrap());
}

#[tokio::test]
async fn losing_the_race_to_create_the_lease_is_false() {
    let (api, mut server) = pair();
    let r = acquire(&api, &mut server, async |s| {
        s.expect("GET", LEASE)
            .await
            .1
            .status(404, "NotFound", "not found");
        s.expect("POST", &format!("{LEASES}?")).await.1.status(
            409,
            "AlreadyExists",
            "leases.coordination.k8s.io \"berth-controller\" already exists",
        );
    })
    .await;
    assert!(!r.unwrap());
}

/// The PUT a holder makes: the lease as read, resourceVersion included, with the new spec.
fn put_body(version: &str, transitions: i32, acquire_time: &str) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": { "name": "berth-controller", "namespace": "berth-system", "resourceVersion": version },
        "spec": {
            "holderIdentity": "controller-a", "leaseDurationSeconds": 15,
            "acquireTime": acquire_time, "renewTime": "<now>", "leaseTransitions": transitions,
        },
    })
}

#[tokio::test]
async fn the_holder_renews_its_lease_guarded_by_its_resource_version() {
    // (answer to the PUT, expected result): 409 means someone wrote the lease since the read.
    for (answer, want) in [(200, true), (409, false)] {
        let (api, mut server) = pair();
        let r = acquire(&api, &mut server, async |s| {
            s.expect("GET", LEASE).await.1.json(200, lease(Some("controller-a"), "7", 3));
            let (body, reply) = s.expect("PUT", &format!("{LEASE}?")).await;
            // acquireTime and leaseTransitions stay: it is a renewal, not a new holder.
            let mut want_body = put_body("7", 3, "<now>");
            want_body["spec"]["acquireTime"] = json!("2026-03-01T09:00:00.000000Z");
            assert_eq!(scrubbed(body.clone()), want_body);
            if answer == 200 {
                reply.json(200, body);
            } else {
                reply.status(409, "Conflict", "Operation cannot be fulfilled on leases.coordination.k8s.io \"berth-controller\": the object has been modified; please apply your changes to the latest version and try again");
            }
        })
        .await;
        assert_eq!(r.unwrap(), want, "PUT answered {answer}");
    }
}

#[tokio::test(start_paused = true)]
async fn another_holders_lease_is_taken_over_only_after_it_stayed_unchanged_for_its_duration() {
    let (api, mut server) = pair();
    // Its renewTime is long past by our clock, yet that proves nothing across machines:
    // first seen now, it is valid for 15 s of our own time.
    let r = acquire(&api, &mut server, async |s| {
        s.expect("GET", LEASE)
            .await
            .1
            .json(200, lease(Some("controller-b"), "9", 2));
    })
    .await;
    assert!(!r.unwrap(), "a lease first seen is not expired");

    tokio::time::advance(Duration::from_secs(10)).await;
    let r = acquire(&api, &mut server, async |s| {
        s.expect("GET", LEASE)
            .await
            .1
            .json(200, lease(Some("controller-b"), "9", 2));
    })
    .await;
    assert!(!r.unwrap(), "10 s unchanged: still valid");

    // controller-b renews: the clock starts again.
    tokio::time::advance(Duration::from_secs(10)).await;
    let r = acquire(&api, &mut server, async |s| {
        s.expect("GET", LEASE)
            .await
            .1
            .json(200, lease(Some("controller-b"), "10", 2));
    })
    .await;
    assert!(!r.unwrap(), "renewed meanwhile");

    tokio::time::advance(Duration::from_secs(15)).await;
    let r = acquire(&api, &mut server, async |s| {
        s.expect("GET", LEASE)
            .await
            .1
            .json(200, lease(Some("controller-b"), "10", 2));
        let (body, reply) = s.expect("PUT", &format!("{LEASE}?")).await;
        assert_eq!(scrubbed(body.clone()), put_body("10", 3, "<now>"));
        reply.json(200, body);
    })
    .await;
    assert!(r.unwrap(), "15 s unchanged: expired, taken over");
}

#[tokio::test]
async fn a_released_lease_is_taken_at_once() {
    let (api, mut server) = pair();
    let r = acquire(&api, &mut server, async |s| {
        s.expect("GET", LEASE)
            .await
            .1
            .json(200, lease(None, "12", 4));
        let (body, reply) = s.expect("PUT", &format!("{LEASE}?")).await;
        assert_eq!(scrubbed(body.clone()), put_body("12", 5, "<now>"));
        reply.json(200, body);
    })
    .await;
    assert!(r.unwrap());
}

#[tokio::test]
async fn a_lease_read_that_fails_is_an_error_not_a_loss() {
    let (api, mut server) = pair();
    let r = acquire(&api, &mut server, async |s| {
        s.expect("GET", LEASE)
            .await
            .1
            .status(500, "InternalError", "etcdserver: leader changed");
    })
    .await;
    assert_eq!(r.unwrap_err().code(), Code::Unavailable);
    let r = acquire(&api, &mut server, async |s| {
        s.expect("GET", LEASE).await.1.status(
            403,
            "Forbidden",
            "leases.coordination.k8s.io \"berth-controller\" is forbidden: User \"system:serviceaccount:berth-system:berth-controller\" cannot get resource \"leases\"",
        );
    })
    .await;
    assert_eq!(r.unwrap_err().code(), Code::PermissionDenied);
}

#[tokio::test]
async fn release_clears_the_holder_only_when_it_is_ours() {
    let (api, mut server) = pair();
    let call = api.release_lease("berth-system", "berth-controller", "controller-a");
    let serve = async {
        server
            .expect("GET", LEASE)
            .await
            .1
            .json(200, lease(Some("controller-a"), "20", 1));
        let (body, reply) = server.expect("PUT", &format!("{LEASE}?")).await;
        assert_eq!(
            scrubbed(body.clone()),
            json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": { "name": "berth-controller", "namespace": "berth-system", "resourceVersion": "20" },
                "spec": {
                    "leaseDurationSeconds": 1, "acquireTime": "<now>", "renewTime": "<now>",
                    "leaseTransitions": 1,
                },
            })
        );
        reply.json(200, body);
    };
    let (r, ()) = tokio::join!(call, serve);
    r.unwrap();

    let call = api.release_lease("berth-system", "berth-controller", "controller-a");
    let serve = async {
        server
            .expect("GET", LEASE)
            .await
            .1
            .json(200, lease(Some("controller-b"), "21", 2));
    };
    let (r, ()) = tokio::join!(call, serve);
    r.unwrap();
    drop(api);
    assert!(
        server.next_if_any().await.is_none(),
        "no write to another holder's lease"
    );
}

fn migration(name: &str, version: &str) -> Value {
    json!({
        "apiVersion": "berth.csi.dev/v1alpha1", "kind": "VolumeMigration",
        "metadata": { "name": name, "namespace": "db", "uid": format!("uid-{name}"), "generation": 1, "resourceVersion": version },
        "spec": { "pvc": "data-pg-0", "targetNode": "node-b" },
    })
}

#[tokio::test]
async fn watch_migrations_lists_then_watches_from_the_list_version() {
    for namespace in [None, Some("db")] {
        let prefix = match namespace {
            None => "/apis/berth.csi.dev/v1alpha1/volumemigrations".to_string(),
            Some(ns) => format!("/apis/berth.csi.dev/v1alpha1/namespaces/{ns}/volumemigrations"),
        };
        let (api, mut server) = pair();
        let serve = async {
            server.expect("GET", &format!("{prefix}?")).await.1.json(
                200,
                json!({
                    "apiVersion": "berth.csi.dev/v1alpha1", "kind": "VolumeMigrationList",
                    "metadata": { "resourceVersion": "300" },
                    "items": [migration("m1", "290")],
                }),
            );
        };
        let (r, ()) = tokio::join!(api.watch_migrations(namespace), serve);
        let mut events = r.unwrap();
        let Some(Ok(MigrationEvent::Listed(items))) = events.next().await else {
            panic!("the stream starts with the list");
        };
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].spec.target_node, "node-b");

        let next = events.next();
        let serve = async {
            let (body, reply) = server
                .expect(
                    "GET",
                    &format!("{prefix}?&watch=true&timeoutSeconds=290&allowWatchBookmarks=true&resourceVersion=300"),
                )
                .await;
            assert_eq!(body, Value::Null);
            let feed = reply.watch();
            feed.unbounded_send(json!({ "type": "ADDED", "object": migration("m2", "301") }))
                .unwrap();
            feed
        };
        let (first, feed) = tokio::join!(next, serve);
        assert!(
            matches!(first, Some(Ok(MigrationEvent::Applied(m))) if m.metadata.name.as_deref() == Some("m2"))
        );
        feed.unbounded_send(json!({ "type": "BOOKMARK", "object": {
            "apiVersion": "berth.csi.dev/v1alpha1", "kind": "VolumeMigration",
            "metadata": { "resourceVersion": "305" },
        }}))
        .unwrap();
        let mut m1 = migration("m1", "306");
        m1["status"] = json!({ "phase": "Copying", "bytesDone": 1, "bytesTotal": 2, "percent": 50, "round": 1, "message": "" });
        feed.unbounded_send(json!({ "type": "MODIFIED", "object": m1 }))
            .unwrap();
        feed.unbounded_send(json!({ "type": "DELETED", "object": migration("m2", "307") }))
            .unwrap();
        // The bookmark is skipped.
        assert!(
            matches!(events.next().await, Some(Ok(MigrationEvent::Applied(m))) if m.status.as_ref().unwrap().percent == 50)
        );
        assert!(
            matches!(events.next().await, Some(Ok(MigrationEvent::Deleted(m))) if m.metadata.name.as_deref() == Some("m2"))
        );
        // The server ends the watch: so does the stream.
        drop(feed);
        assert!(events.next().await.is_none());
    }
}

#[tokio::test]
async fn a_watch_that_expires_yields_an_error() {
    let (api, mut server) = pair();
    let serve = async {
        server.expect("GET", "/apis/berth.csi.dev/v1alpha1/volumemigrations?").await.1.json(
            200,
            json!({ "apiVersion": "berth.csi.dev/v1alpha1", "kind": "VolumeMigrationList", "metadata": { "resourceVersion": "5" }, "items": [] }),
        );
    };
    let (r, ()) = tokio::join!(api.watch_migrations(None), serve);
    let mut events = r.unwrap();
    assert!(matches!(events.next().await, Some(Ok(MigrationEvent::Listed(v))) if v.is_empty()));
    let next = events.next();
    let serve = async {
        let (_, reply) = server.next().await;
        let feed = reply.watch();
        feed.unbounded_send(json!({ "type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "too old resource version: 5 (120)", "reason": "Expired", "code": 410,
        }}))
        .unwrap();
        feed
    };
    let (e, _feed) = tokio::join!(next, serve);
    let e = e.unwrap().unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e}");
    assert!(e.to_string().contains("too old resource version"), "{e}");
}

const NODE_LEASE: &str =
    "/apis/coordination.k8s.io/v1/namespaces/berth-system/leases/berth-node-node-a";

/// The renewal's merge patch: holder, duration and a fresh renewTime, and the label.
fn renewal_patch() -> Value {
    json!({
        "metadata": { "labels": { "berth.csi.dev/node-lease": "" } },
        "spec": { "holderIdentity": "node-a", "leaseDurationSeconds": 10, "renewTime": "<now>" },
    })
}

fn node_lease_object(node: &str, version: &str) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {
            "name": format!("berth-node-{node}"), "namespace": "berth-system",
            "resourceVersion": version, "labels": { "berth.csi.dev/node-lease": "" },
        },
        "spec": { "holderIdentity": node, "leaseDurationSeconds": 10, "renewTime": "2026-03-01T10:00:00.000000Z" },
    })
}

#[tokio::test]
async fn renew_node_lease_is_one_merge_patch_with_a_new_renew_time() {
    let (api, mut server) = pair();
    let mut renew_times = vec![];
    for version in ["7", "8"] {
        let call = api.renew_node_lease("berth-system", "node-a", 10);
        let serve = async {
            let (s, reply) = server.next().await;
            assert_eq!(s.line(), format!("PATCH {NODE_LEASE}?"));
            assert_eq!(s.content_type.as_deref(), Some(MERGE));
            assert_eq!(scrubbed(s.body.clone()), renewal_patch());
            // MicroTime: microseconds, which is what makes every renewal a change.
            let t = s.body["spec"]["renewTime"].as_str().unwrap().to_string();
            assert_eq!(t.len(), "2026-03-01T10:00:00.000000Z".len(), "{t}");
            reply.json(200, node_lease_object("node-a", version));
            t
        };
        let (r, t) = tokio::join!(call, serve);
        r.unwrap();
        renew_times.push(t);
    }
    assert_ne!(renew_times[0], renew_times[1]);
}

#[tokio::test]
async fn renew_node_lease_creates_the_lease_when_there_is_none() {
    let (api, mut server) = pair();
    let call = api.renew_node_lease("berth-system", "node-a", 10);
    let serve = async {
        server
            .expect("PATCH", &format!("{NODE_LEASE}?"))
            .await
            .1
            .status(
                404,
                "NotFound",
                &not_found("leases.coordination.k8s.io", "berth-node-node-a"),
            );
        let (body, reply) = server
            .expect(
                "POST",
                "/apis/coordination.k8s.io/v1/namespaces/berth-system/leases?",
            )
            .await;
        assert_eq!(
            scrubbed(body.clone()),
            json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {
                    "name": "berth-node-node-a", "namespace": "berth-system",
                    "labels": { "berth.csi.dev/node-lease": "" },
                },
                "spec": {
                    "holderIdentity": "node-a", "leaseDurationSeconds": 10,
                    "acquireTime": "<now>", "renewTime": "<now>", "leaseTransitions": 0,
                },
            })
        );
        reply.json(201, node_lease_object("node-a", "1"));
    };
    let (r, ()) = tokio::join!(call, serve);
    r.unwrap();

    // Another pod of this node created it between the patch and the create: renewed.
    let call = api.renew_node_lease("berth-system", "node-a", 10);
    let serve = async {
        server
            .expect("PATCH", &format!("{NODE_LEASE}?"))
            .await
            .1
            .status(404, "NotFound", "not found");
        server
            .expect(
                "POST",
                "/apis/coordination.k8s.io/v1/namespaces/berth-system/leases?",
            )
            .await
            .1
            .status(
                409,
                "AlreadyExists",
                "leases.coordination.k8s.io \"berth-node-node-a\" already exists",
            );
        let (body, reply) = server.expect("PATCH", &format!("{NODE_LEASE}?")).await;
        assert_eq!(scrubbed(body), renewal_patch());
        reply.json(200, node_lease_object("node-a", "2"));
    };
    let (r, ()) = tokio::join!(call, serve);
    r.unwrap();
}

#[tokio::test]
async fn a_renewal_the_api_server_did_not_accept_is_an_error() {
    // (status, reason, code): nothing but a 2xx is a renewal.
    for (status, reason, want) in [
        (500, "InternalError", Code::Unavailable),
        (429, "TooManyRequests", Code::Unavailable),
        (403, "Forbidden", Code::PermissionDenied),
        (422, "Invalid", Code::InvalidArgument),
    ] {
        let (api, mut server) = pair();
        let call = api.renew_node_lease("berth-system", "node-a", 10);
        let serve = async {
            server
                .expect("PATCH", &format!("{NODE_LEASE}?"))
                .await
                .1
                .status(status, reason, "refused");
        };
        let (r, ()) = tokio::join!(call, serve);
        let e = r.unwrap_err();
        assert_eq!(e.code(), want, "{status}: {e}");
        assert!(
            e.to_string().contains("berth-system/berth-node-node-a"),
            "{e}"
        );
        drop(api);
        assert!(server.next_if_any().await.is_none(), "{status}: a retry");
    }
}

#[tokio::test]
async fn a_node_id_too_long_for_a_lease_name_is_refused_before_any_request() {
    // berth-node- is 11 characters; a name is at most 253.
    let longest = "n".repeat(242);
    assert_eq!(
        node_lease_name(&longest).unwrap(),
        format!("berth-node-{longest}")
    );
    let (api, mut server) = pair();
    let e = api
        .renew_node_lease("berth-system", &"n".repeat(243), 10)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.to_string().contains("at most 242 characters"), "{e}");
    drop(api);
    assert!(server.next_if_any().await.is_none());
}

#[tokio::test]
async fn node_leases_lists_by_label_and_marks_each_node_by_resource_version() {
    let (api, mut server) = pair();
    let serve = async {
        let (body, reply) = server
            .expect(
                "GET",
                "/apis/coordination.k8s.io/v1/namespaces/berth-system/leases?&labelSelector=berth.csi.dev%2Fnode-lease",
            )
            .await;
        assert_eq!(body, Value::Null);
        // A Lease labelled by someone else, without berth's name, is not a node's.
        let mut stray = node_lease_object("x", "3");
        stray["metadata"]["name"] = json!("berth-controller");
        reply.json(
            200,
            json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "LeaseList",
                "metadata": { "resourceVersion": "50" },
                "items": [node_lease_object("node-a", "41"), node_lease_object("node-b", "44"), stray],
            }),
        );
    };
    let (r, ()) = tokio::join!(api.node_leases("berth-system"), serve);
    assert_eq!(
        r.unwrap(),
        BTreeMap::from([
            ("node-a".to_string(), "41".to_string()),
            ("node-b".to_string(), "44".to_string()),
        ])
    );
}

#[tokio::test]
async fn kubelet_leases_are_every_lease_in_kube_node_lease_by_node_name() {
    let (api, mut server) = pair();
    let serve = async {
        let (body, reply) = server
            .expect(
                "GET",
                "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases?",
            )
            .await;
        assert_eq!(body, Value::Null);
        let kubelet = |node: &str, version: &str, duration: Option<u32>| {
            let mut l = json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": { "name": node, "namespace": "kube-node-lease", "resourceVersion": version },
                "spec": { "holderIdentity": node, "renewTime": "2026-03-01T10:00:00.000000Z" },
            });
            if let Some(d) = duration {
                l["spec"]["leaseDurationSeconds"] = json!(d);
            }
            l
        };
        reply.json(
            200,
            json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "LeaseList",
                "metadata": { "resourceVersion": "90" },
                // A Lease without a duration is taken at the kubelet's default, 40 s.
                "items": [kubelet("node-a", "81", Some(20)), kubelet("node-b", "84", None)],
            }),
        );
    };
    let (r, ()) = tokio::join!(api.kubelet_leases(), serve);
    let lease = |mark: &str, duration_secs| KubeletLease {
        mark: mark.into(),
        duration_secs,
    };
    assert_eq!(
        r.unwrap(),
        BTreeMap::from([
            ("node-a".to_string(), lease("81", 20)),
            ("node-b".to_string(), lease("84", 40)),
        ])
    );
}

fn k8s_node(name: &str, taints: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": { "name": name },
        "spec": { "taints": taints },
    })
}

#[tokio::test]
async fn out_of_service_nodes_are_those_with_the_taint_with_either_effect() {
    let (api, mut server) = pair();
    let serve = async {
        let (_, reply) = server.expect("GET", "/api/v1/nodes?").await;
        let oos = |effect: &str, value: Option<&str>| {
            let mut t = json!({ "key": "node.kubernetes.io/out-of-service", "effect": effect });
            if let Some(v) = value {
                t["value"] = json!(v);
            }
            t
        };
        reply.json(
            200,
            json!({
                "apiVersion": "v1", "kind": "NodeList", "metadata": {},
                "items": [
                    k8s_node("node-a", json!([oos("NoExecute", Some("nodeshutdown"))])),
                    k8s_node("node-b", json!([
                        { "key": "node.kubernetes.io/unreachable", "effect": "NoExecute" },
                        oos("NoSchedule", None),
                    ])),
                    // Not the signal: merely unreachable, or a weaker effect.
                    k8s_node("node-c", json!([{ "key": "node.kubernetes.io/unreachable", "effect": "NoExecute" }])),
                    k8s_node("node-d", json!([oos("PreferNoSchedule", None)])),
                    { "apiVersion": "v1", "kind": "Node", "metadata": { "name": "node-e" }, "spec": {} },
                ],
            }),
        );
    };
    let (r, ()) = tokio::join!(api.out_of_service_nodes(), serve);
    assert_eq!(
        r.unwrap(),
        BTreeSet::from(["node-a".to_string(), "node-b".to_string()])
    );
}

const PVS: &str = "/api/v1/persistentvolumes?";
const PODS_ON_A: &str = "/api/v1/namespaces/db/pods?&fieldSelector=spec.nodeName%3Dnode-a";
const VAS: &str = "/apis/storage.k8s.io/v1/volumeattachments?";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/db/events?";

fn pv(name: &str, driver: &str, handle: &str, claim: Option<&str>) -> Value {
    let mut v = json!({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": { "name": name },
        "spec": {
            "capacity": { "storage": "1Gi" },
            "csi": { "driver": driver, "volumeHandle": handle },
        },
    });
    if let Some(c) = claim {
        v["spec"]["claimRef"] = json!({
            "kind": "PersistentVolumeClaim", "apiVersion": "v1",
            "namespace": "db", "name": c, "uid": format!("uid-{c}"),
        });
    }
    v
}

fn pod(name: &str, claims: &[&str]) -> Value {
    let volumes: Vec<Value> = claims
        .iter()
        .map(|c| json!({ "name": format!("v-{c}"), "persistentVolumeClaim": { "claimName": c } }))
        .chain([json!({ "name": "tmp", "emptyDir": {} })])
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": name, "namespace": "db", "uid": format!("uid-{name}") },
        "spec": { "nodeName": "node-a", "containers": [{ "name": "c", "image": "i" }], "volumes": volumes },
    })
}

fn va(name: &str, attacher: &str, node: &str, pv: &str) -> Value {
    json!({
        "apiVersion": "storage.k8s.io/v1", "kind": "VolumeAttachment",
        "metadata": { "name": name, "finalizers": ["external-attacher/berth-csi-dev"] },
        "spec": { "attacher": attacher, "nodeName": node, "source": { "persistentVolumeName": pv } },
    })
}

fn list(kind: &str, items: Vec<Value>) -> Value {
    json!({ "apiVersion": "v1", "kind": kind, "metadata": {}, "items": items })
}

/// The API server's answer to each delete and to the Event, by what is asked.
#[derive(Clone, Copy)]
struct Answers {
    pod_delete: u16,
    va_delete: u16,
    event: u16,
    /// berth's attachment on node-a is already being deleted.
    va_deleting: bool,
}

/// A cluster where volume vol-1 is PV pv-1, bound to claim db/data-pg-0: on node-a, pod
/// pg-0 uses it, pod web uses nothing and pod report another claim; VolumeAttachments hold
/// pv-1 on node-a (berth's, the one to go) and on node-b, pv-2 on node-a, and pv-1 on node-a
/// for another attacher.
fn cluster(answers: Answers) -> impl FnMut(&Seen, crate::kube::testing::Reply) + Send {
    move |s, reply| match (s.method.as_str(), s.uri.as_str()) {
        ("GET", PVS) => reply.json(
            200,
            list(
                "PersistentVolumeList",
                vec![
                    pv("pv-other", "ebs.csi.aws.com", "vol-1", Some("data-x")),
                    pv("pv-1", "berth.csi.dev", "vol-1", Some("data-pg-0")),
                    pv("pv-2", "berth.csi.dev", "vol-2", Some("data-x")),
                ],
            ),
        ),
        ("GET", PODS_ON_A) => reply.json(
            200,
            list(
                "PodList",
                vec![
                    pod("web", &[]),
                    pod("pg-0", &["data-pg-0"]),
                    pod("report", &["data-x"]),
                ],
            ),
        ),
        ("DELETE", "/api/v1/namespaces/db/pods/pg-0?") => match answers.pod_delete {
            200 => reply.json(200, pod("pg-0", &["data-pg-0"])),
            code => reply.status(code, "Refused", "refused"),
        },
        ("POST", EVENTS) => match answers.event {
            201 => reply.json(201, s.body.clone()),
            code => reply.status(code, "Refused", "refused"),
        },
        ("GET", VAS) => reply.json(
            200,
            list(
                "VolumeAttachmentList",
                vec![
                    va("va-b", "berth.csi.dev", "node-b", "pv-1"),
                    {
                        let mut v = va("va-a", "berth.csi.dev", "node-a", "pv-1");
                        if answers.va_deleting {
                            v["metadata"]["deletionTimestamp"] = json!("2026-03-01T10:00:00Z");
                        }
                        v
                    },
                    va("va-a2", "berth.csi.dev", "node-a", "pv-2"),
                    va("va-ebs", "ebs.csi.aws.com", "node-a", "pv-1"),
                ],
            ),
        ),
        ("DELETE", "/apis/storage.k8s.io/v1/volumeattachments/va-a?") => match answers.va_delete {
            200 => reply.json(200, va("va-a", "berth.csi.dev", "node-a", "pv-1")),
            code => reply.status(code, "Refused", "refused"),
        },
        _ => panic!("unexpected request {}", s.line()),
    }
}

async fn release(answers: Answers) -> (Result<Released>, Vec<Seen>) {
    let (api, server) = pair();
    let (log, task) = server.serve(cluster(answers));
    let r = api.release_from_node("vol-1", "node-a").await;
    drop(api);
    task.await.unwrap();
    let log = log.lock().unwrap().clone();
    (r, log)
}

const OK: Answers = Answers {
    pod_delete: 200,
    va_delete: 200,
    event: 201,
    va_deleting: false,
};

#[tokio::test]
async fn release_from_node_force_deletes_the_claims_pods_there_then_its_attachment_there() {
    let (r, log) = release(OK).await;
    assert_eq!(
        r.unwrap(),
        Released {
            attachments: vec!["va-a".into()],
            pods: vec!["db/pg-0".into()],
        }
    );
    let lines: Vec<String> = log.iter().map(Seen::line).collect();
    assert_eq!(
        lines,
        [
            format!("GET {PVS}"),
            format!("GET {PODS_ON_A}"),
            "DELETE /api/v1/namespaces/db/pods/pg-0?".to_string(),
            format!("POST {EVENTS}"),
            format!("GET {VAS}"),
            "DELETE /apis/storage.k8s.io/v1/volumeattachments/va-a?".to_string(),
        ]
    );
    // Force: no grace period; and only the pod listed, not a new one of the same name.
    assert_eq!(
        log[2].body,
        json!({ "gracePeriodSeconds": 0, "preconditions": { "uid": "uid-pg-0" } })
    );
    let event = scrubbed(log[3].body.clone());
    assert_eq!(
        event,
        json!({
            "apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": { "generateName": "pg-0-", "namespace": "db" },
            "eventTime": "<now>",
            "action": "PodEvicted", "reason": "PodEvicted", "type": "Warning",
            "note": "berth failed volume vol-1 (claim data-pg-0) over from lost node node-a and deleted this pod, so that its controller recreates it on another node",
            "reportingController": "berth.csi.dev/controller",
            "reportingInstance": INSTANCE,
            "regarding": { "apiVersion": "v1", "kind": "Pod", "namespace": "db", "name": "pg-0", "uid": "uid-pg-0" },
            "related": {
                "apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": "db",
                "name": "data-pg-0", "uid": "uid-data-pg-0",
            },
        })
    );
    // A plain delete: the external-attacher's finalizer is left for it to remove.
    assert_eq!(log[5].body, json!({}));
}

#[tokio::test]
async fn release_from_node_takes_gone_as_done() {
    // The pod gone (404) or replaced by a new one of its name (409: the uid precondition),
    // the attachment gone: nothing deleted, no Event, no error.
    for pod_delete in [404, 409] {
        let (r, log) = release(Answers {
            pod_delete,
            va_delete: 404,
            ..OK
        })
        .await;
        assert_eq!(r.unwrap(), Released::default(), "{pod_delete}");
        assert!(
            !log.iter().any(|s| s.method == "POST"),
            "{pod_delete}: an Event about a pod not deleted"
        );
    }
    // An attachment already being deleted (the external-attacher has yet to detach it) is
    // not deleted again, nor reported.
    let (r, log) = release(Answers {
        va_deleting: true,
        ..OK
    })
    .await;
    assert_eq!(r.unwrap().attachments, Vec::<String>::new());
    assert!(
        !log.iter()
            .any(|s| s.method == "DELETE" && s.uri.contains("volumeattachments"))
    );
}

#[tokio::test]
async fn an_eviction_whose_event_fails_still_counts_and_goes_on() {
    let (r, log) = release(Answers { event: 500, ..OK }).await;
    assert_eq!(
        r.unwrap(),
        Released {
            attachments: vec!["va-a".into()],
            pods: vec!["db/pg-0".into()],
        }
    );
    assert_eq!(log.len(), 6);
}

#[tokio::test]
async fn a_failed_pod_delete_stops_before_the_attachment() {
    let (r, log) = release(Answers {
        pod_delete: 503,
        ..OK
    })
    .await;
    let e = r.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert!(e.to_string().contains("Pod db/pg-0"), "{e}");
    assert!(!log.iter().any(|s| s.uri.contains("volumeattachments")));
    let (r, _) = release(Answers {
        va_delete: 403,
        ..OK
    })
    .await;
    let e = r.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.to_string().contains("VolumeAttachment va-a"), "{e}");
}

#[tokio::test]
async fn release_from_node_without_a_persistent_volume_does_nothing() {
    let (api, mut server) = pair();
    let call = api.release_from_node("vol-9", "node-a");
    let serve = async {
        server.expect("GET", PVS).await.1.json(
            200,
            list(
                "PersistentVolumeList",
                vec![pv("pv-1", "berth.csi.dev", "vol-1", Some("data-pg-0"))],
            ),
        );
    };
    let (r, ()) = tokio::join!(call, serve);
    assert_eq!(r.unwrap(), Released::default());
    drop(api);
    assert!(server.next_if_any().await.is_none());
}
