//! The migrations loop against a mock API server and a fake [`Migrator`], in paused time.
//! The API server's side keeps VolumeMigrations, a claim and its volume; each test asserts
//! every request the loop made, in order.

use std::{
    collections::VecDeque,
    sync::atomic::{AtomicBool, Ordering},
};

use futures::channel::mpsc::UnboundedSender;
use serde_json::{Value, json};

use super::*;
use crate::kube::{
    KubeApi,
    testing::{Reply, Seen, pair, scrubbed},
};

const LIST: &str = "GET /apis/berth.csi.dev/v1alpha1/volumemigrations?";
const WATCH_PREFIX: &str = "GET /apis/berth.csi.dev/v1alpha1/volumemigrations?&watch=true";
const CLAIM: &str = "GET /api/v1/namespaces/db/persistentvolumeclaims/data-pg-0";
const PV: &str = "GET /api/v1/persistentvolumes/pvc-1234";
const EVENT: &str = "POST /apis/events.k8s.io/v1/namespaces/db/events?";

fn status_patch(name: &str) -> String {
    format!("PATCH /apis/berth.csi.dev/v1alpha1/namespaces/db/volumemigrations/{name}/status?")
}

fn migration(name: &str, pvc: &str) -> Value {
    json!({
        "apiVersion": "berth.csi.dev/v1alpha1", "kind": "VolumeMigration",
        "metadata": {
            "name": name, "namespace": "db", "uid": format!("uid-{name}"), "generation": 1,
            "resourceVersion": "10", "creationTimestamp": "2026-03-01T10:00:00Z",
        },
        "spec": { "pvc": pvc, "targetNode": "node-b" },
    })
}

/// The API server's state.
struct Cluster {
    migrations: Vec<Value>,
    /// Answers to GETs of the claim, in order; the last one repeats. None: 404.
    claims: VecDeque<Option<Value>>,
    /// Open watches.
    watches: Vec<UnboundedSender<Value>>,
    version: u64,
}

fn claim(bound: bool) -> Option<Value> {
    let mut c = json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": { "name": "data-pg-0", "namespace": "db", "uid": "pvc-uid-1" },
        "spec": { "accessModes": ["ReadWriteOnce"], "storageClassName": "berth" },
        "status": { "phase": if bound { "Bound" } else { "Pending" } },
    });
    if bound {
        c["spec"]["volumeName"] = json!("pvc-1234");
    }
    Some(c)
}

impl Cluster {
    fn new(migrations: Vec<Value>, claims: Vec<Option<Value>>) -> Arc<Mutex<Self>> {
        Arc::new(Mutex::new(Cluster {
            migrations,
            claims: claims.into(),
            watches: vec![],
            version: 100,
        }))
    }

    fn handle(&mut self, s: &Seen, reply: Reply) {
        let line = s.line();
        self.version += 1;
        if line == LIST {
            return reply.json(
                200,
                json!({
                    "apiVersion": "berth.csi.dev/v1alpha1", "kind": "VolumeMigrationList",
                    "metadata": { "resourceVersion": self.version.to_string() },
                    "items": self.migrations,
                }),
            );
        }
        if line.starts_with(WATCH_PREFIX) {
            return self.watches.push(reply.watch());
        }
        if line == CLAIM {
            let answer = if self.claims.len() > 1 {
                self.claims.pop_front().unwrap()
            } else {
                self.claims[0].clone()
            };
            return match answer {
                Some(c) => reply.json(200, c),
                None => reply.status(
                    404,
                    "NotFound",
                    "persistentvolumeclaims \"data-pg-0\" not found",
                ),
            };
        }
        if line == PV {
            return reply.json(
                200,
                json!({
                    "apiVersion": "v1", "kind": "PersistentVolume",
                    "metadata": { "name": "pvc-1234" },
                    "spec": { "csi": { "driver": "berth.csi.dev", "volumeHandle": "vol-8f2c" } },
                }),
            );
        }
        if line == EVENT {
            let mut e = s.body.clone();
            e["metadata"]["name"] = json!(format!("data-pg-0-{:05x}", self.version));
            return reply.json(201, e);
        }
        for m in self.migrations.iter_mut() {
            if line == status_patch(m["metadata"]["name"].as_str().unwrap()) {
                m["status"] = s.body["status"].clone();
                m["metadata"]["resourceVersion"] = json!(self.version.to_string());
                let m = m.clone();
                for w in &self.watches {
                    let _ = w.unbounded_send(json!({ "type": "MODIFIED", "object": m }));
                }
                return reply.json(200, m);
            }
        }
        panic!("unexpected request {line}");
    }
}

fn serve(cluster: &Arc<Mutex<Cluster>>) -> (KubeApi, Arc<Mutex<Vec<Seen>>>) {
    let (api, server) = pair();
    let c = cluster.clone();
    let (log, _task) =
        server.serve(move |s: &Seen, reply: Reply| c.lock().unwrap().handle(s, reply));
    (api, log)
}

#[derive(Default)]
struct FakeMigrator {
    calls: Mutex<Vec<String>>,
    /// primary_node answers the target once this is set, the source before.
    moved: AtomicBool,
    /// Errors primary_node returns first.
    primary_errors: Mutex<VecDeque<Error>>,
}

#[async_trait]
impl Migrator for FakeMigrator {
    async fn prewarm(
        &self,
        volume_id: &str,
        to: &str,
        progress: &(dyn Fn(u64, u64) + Send + Sync),
    ) -> Result<()> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("prewarm {volume_id} {to}"));
        // Two rounds: 100 MiB, then the 10 MiB written meanwhile, 1.2 s per step.
        let step = Duration::from_millis(1200);
        progress(0, 100 << 20);
        tokio::time::sleep(step).await;
        progress(60 << 20, 100 << 20);
        tokio::time::sleep(step).await;
        progress(100 << 20, 100 << 20);
        progress(0, 10 << 20);
        tokio::time::sleep(step).await;
        progress(10 << 20, 10 << 20);
        Ok(())
    }

    async fn primary_node(&self, volume_id: &str) -> Result<Option<String>> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("primary {volume_id}"));
        if let Some(e) = self.primary_errors.lock().unwrap().pop_front() {
            return Err(e);
        }
        let node = if self.moved.load(Ordering::SeqCst) {
            "node-b"
        } else {
            "node-a"
        };
        Ok(Some(node.into()))
    }
}

/// Advances virtual time by 100 ms steps until a request of the log satisfies `f`.
async fn wait_for(log: &Mutex<Vec<Seen>>, what: &str, f: impl Fn(&Seen) -> bool) {
    for _ in 0..1000 {
        if log.lock().unwrap().iter().any(&f) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "no request {what} within 100 s: {:#?}",
        log.lock()
            .unwrap()
            .iter()
            .map(|s| (s.line(), s.body.clone()))
            .collect::<Vec<_>>()
    );
}

fn phase_is(name: &str, phase: &str) -> impl Fn(&Seen) -> bool {
    let patch = status_patch(name);
    let phase = phase.to_string();
    move |s| s.line() == patch && s.body["status"]["phase"] == phase.as_str()
}

fn event_is(reason: &str) -> impl Fn(&Seen) -> bool {
    let reason = reason.to_string();
    move |s| s.line() == EVENT && s.body["reason"] == reason.as_str()
}

/// The requests of the migration's worker: everything but listing and watching.
fn worker_lines(log: &Mutex<Vec<Seen>>) -> Vec<String> {
    log.lock()
        .unwrap()
        .iter()
        .map(Seen::line)
        .filter(|l| l != LIST && !l.starts_with(WATCH_PREFIX))
        .collect()
}

fn count(log: &Mutex<Vec<Seen>>, f: impl Fn(&str) -> bool) -> usize {
    log.lock().unwrap().iter().filter(|s| f(&s.line())).count()
}

/// (phase, bytesDone, bytesTotal, percent, round, message) of every status write.
fn statuses(log: &Mutex<Vec<Seen>>, name: &str) -> Vec<(String, u64, u64, u64, u64, String)> {
    let patch = status_patch(name);
    log.lock()
        .unwrap()
        .iter()
        .filter(|s| s.line() == patch)
        .map(|s| {
            assert_eq!(
                s.content_type.as_deref(),
                Some("application/merge-patch+json")
            );
            let st = &s.body["status"];
            (
                st["phase"].as_str().unwrap().to_string(),
                st["bytesDone"].as_u64().unwrap(),
                st["bytesTotal"].as_u64().unwrap(),
                st["percent"].as_u64().unwrap(),
                st["round"].as_u64().unwrap(),
                st["message"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// (reason, type, note) of every Event, checking each regards the claim.
fn events(log: &Mutex<Vec<Seen>>) -> Vec<(String, String, String)> {
    log.lock()
        .unwrap()
        .iter()
        .filter(|s| s.line() == EVENT)
        .map(|s| {
            assert_eq!(s.body["regarding"]["kind"], "PersistentVolumeClaim");
            assert_eq!(s.body["regarding"]["name"], "data-pg-0");
            assert_eq!(s.body["action"], s.body["reason"]);
            let text = |k: &str| s.body[k].as_str().unwrap().to_string();
            (text("reason"), text("type"), text("note"))
        })
        .collect()
}

fn owned(rows: &[(&str, u64, u64, u64, u64, &str)]) -> Vec<(String, u64, u64, u64, u64, String)> {
    rows.iter()
        .map(|&(p, d, t, pc, r, m)| (p.into(), d, t, pc, r, m.into()))
        .collect()
}

fn start(
    api: KubeApi,
    migrator: Arc<FakeMigrator>,
) -> (watch::Sender<bool>, tokio::task::JoinHandle<()>) {
    let (stop, shutdown) = watch::channel(false);
    let task = tokio::spawn(migrations(Arc::new(api), migrator, None, shutdown));
    (stop, task)
}

async fn stop(stop: watch::Sender<bool>, task: tokio::task::JoinHandle<()>) {
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(1), task)
        .await
        .expect("the loop returns at shutdown")
        .unwrap();
}

const MIB: u64 = 1 << 20;

#[tokio::test(start_paused = true)]
async fn a_migration_goes_from_pending_through_copying_and_ready_to_completed() {
    let cluster = Cluster::new(vec![migration("pg-to-b", "data-pg-0")], vec![claim(true)]);
    let (api, log) = serve(&cluster);
    let migrator = Arc::new(FakeMigrator::default());
    let (stopper, task) = start(api, migrator.clone());

    wait_for(
        &log,
        "ReadyToCutOver",
        phase_is("pg-to-b", "ReadyToCutOver"),
    )
    .await;
    // The pod moves to node-b: the next attach there makes it the primary.
    migrator.moved.store(true, Ordering::SeqCst);
    wait_for(&log, "MigrationCompleted", event_is("MigrationCompleted")).await;
    // Its own Completed status comes back through the watch: nothing more happens.
    tokio::time::sleep(Duration::from_secs(30)).await;
    stop(stopper, task).await;

    let patch = status_patch("pg-to-b");
    assert_eq!(
        worker_lines(&log),
        [
            CLAIM, PV,     // pass 1: the claim's volume; primary on node-a
            &patch, // Copying
            CLAIM, EVENT, // MigrationStarted
            &patch, &patch, &patch, // progress at 1 s, 2 s, 3 s
            &patch, // ReadyToCutOver at 3.6 s
            CLAIM, EVENT, // MigrationReady
            CLAIM, PV,     // pass 2 at 8.6 s: primary on node-b
            &patch, // Completed
            CLAIM, EVENT, // MigrationCompleted
        ]
    );
    assert_eq!(count(&log, |l| l == LIST), 1);
    assert_eq!(count(&log, |l| l.starts_with(WATCH_PREFIX)), 1);
    let copying = "copying volume vol-8f2c to node node-b";
    let ready =
        "node node-b holds a recent copy of volume vol-8f2c: move the pod there to cut over";
    assert_eq!(
        statuses(&log, "pg-to-b"),
        owned(&[
            ("Copying", 0, 0, 0, 1, copying),
            ("Copying", 0, 100 * MIB, 0, 1, copying),
            ("Copying", 60 * MIB, 100 * MIB, 60, 1, copying),
            // A second round began: what was written during the first.
            ("Copying", 0, 10 * MIB, 0, 2, copying),
            ("ReadyToCutOver", 10 * MIB, 10 * MIB, 100, 2, ready),
            (
                "Completed",
                10 * MIB,
                10 * MIB,
                100,
                2,
                "volume vol-8f2c lives on node node-b"
            ),
        ])
    );
    assert_eq!(
        events(&log),
        [
            ("MigrationStarted", "Normal", copying),
            (
                "MigrationReady",
                "Normal",
                "node node-b holds a recent copy of volume vol-8f2c; moving the pod there now ships only what changed since"
            ),
            ("MigrationCompleted", "Normal", "volume vol-8f2c now lives on node node-b"),
        ]
        .map(|(r, t, n)| (r.to_string(), t.to_string(), n.to_string()))
    );
    // The whole last status, conditions included.
    let last = log
        .lock()
        .unwrap()
        .iter()
        .rfind(|s| s.line() == patch)
        .unwrap()
        .body
        .clone();
    let message = "volume vol-8f2c lives on node node-b";
    assert_eq!(
        scrubbed(last),
        json!({ "status": {
            "phase": "Completed", "bytesDone": 10 * MIB, "bytesTotal": 10 * MIB, "percent": 100,
            "round": 2, "message": message,
            "conditions": [
                { "type": "Ready", "status": "True", "reason": "Prewarmed", "message": message,
                  "lastTransitionTime": "<now>", "observedGeneration": 1 },
                { "type": "Complete", "status": "True", "reason": "MovedToTarget", "message": message,
                  "lastTransitionTime": "<now>", "observedGeneration": 1 },
            ],
        }})
    );
    assert_eq!(
        *migrator.calls.lock().unwrap(),
        [
            "primary vol-8f2c",
            "prewarm vol-8f2c node-b",
            "primary vol-8f2c"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_migration_of_a_missing_claim_fails_and_stays_failed_across_a_relist() {
    let cluster = Cluster::new(vec![migration("pg-to-b", "data-pg-0")], vec![None]);
    let (api, log) = serve(&cluster);
    let migrator = Arc::new(FakeMigrator::default());
    let (stopper, task) = start(api, migrator.clone());

    wait_for(&log, "MigrationFailed", event_is("MigrationFailed")).await;
    // The API server ends the watch: the loop lists again (the migration now Failed) and
    // watches again, and starts nothing for it.
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.lock().unwrap().watches.clear();
    for _ in 0..100 {
        if count(&log, |l| l.starts_with(WATCH_PREFIX)) == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(30)).await;
    stop(stopper, task).await;

    let patch = status_patch("pg-to-b");
    assert_eq!(worker_lines(&log), [CLAIM, &patch, CLAIM, EVENT]);
    assert_eq!(count(&log, |l| l == LIST), 2);
    assert_eq!(count(&log, |l| l.starts_with(WATCH_PREFIX)), 2);
    let message = "node kubernetes api: PersistentVolumeClaim db/data-pg-0: \
                   persistentvolumeclaims \"data-pg-0\" not found (404 NotFound)";
    assert_eq!(
        statuses(&log, "pg-to-b"),
        owned(&[("Failed", 0, 0, 0, 0, message)])
    );
    let failed = log
        .lock()
        .unwrap()
        .iter()
        .find(|s| s.line() == patch)
        .unwrap()
        .body
        .clone();
    let reasons: Vec<_> = failed["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["type"].clone(), c["status"].clone(), c["reason"].clone()))
        .collect();
    assert_eq!(
        reasons,
        [
            (json!("Ready"), json!("False"), json!("ClaimNotFound")),
            (json!("Complete"), json!("False"), json!("ClaimNotFound")),
        ]
    );
    assert_eq!(
        events(&log),
        [(
            "MigrationFailed".to_string(),
            "Warning".to_string(),
            format!("ClaimNotFound: {message}")
        )]
    );
    // The claim is gone: the event regards it by name only.
    let event = log
        .lock()
        .unwrap()
        .iter()
        .find(|s| s.line() == EVENT)
        .unwrap()
        .body
        .clone();
    assert!(event["regarding"].get("uid").is_none(), "{event}");
    assert!(migrator.calls.lock().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_migration_waits_for_its_claim_and_retries_what_may_pass() {
    // The claim is unbound at first; then the source node does not answer once.
    let cluster = Cluster::new(
        vec![migration("pg-to-b", "data-pg-0")],
        vec![claim(false), claim(true)],
    );
    let (api, log) = serve(&cluster);
    let migrator = Arc::new(FakeMigrator::default());
    migrator.moved.store(true, Ordering::SeqCst);
    migrator
        .primary_errors
        .lock()
        .unwrap()
        .push_back(Error::Unreachable {
            node: "node-a".into(),
            reason: "connection refused".into(),
        });
    let (stopper, task) = start(api, migrator.clone());
    wait_for(&log, "MigrationCompleted", event_is("MigrationCompleted")).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    stop(stopper, task).await;

    let patch = status_patch("pg-to-b");
    assert_eq!(
        worker_lines(&log),
        [
            CLAIM, &patch, // unbound: Pending, saying so
            CLAIM, PV, &patch, // 5 s later: node-a unreachable, retrying
            CLAIM, PV, &patch, // 1 s later: the volume already lives on node-b
            CLAIM, EVENT,
        ]
    );
    assert_eq!(
        statuses(&log, "pg-to-b"),
        owned(&[
            (
                "Pending",
                0,
                0,
                0,
                0,
                "waiting for claim db/data-pg-0 to be bound"
            ),
            (
                "Pending",
                0,
                0,
                0,
                0,
                "retrying: node node-a is unreachable: connection refused"
            ),
            (
                "Completed",
                0,
                0,
                0,
                0,
                "volume vol-8f2c lives on node node-b"
            ),
        ])
    );
    assert_eq!(
        *migrator.calls.lock().unwrap(),
        ["primary vol-8f2c", "primary vol-8f2c"]
    );
}

#[tokio::test(start_paused = true)]
async fn deleting_a_migration_stops_its_worker() {
    let cluster = Cluster::new(vec![migration("pg-to-b", "data-pg-0")], vec![claim(false)]);
    let (api, log) = serve(&cluster);
    let migrator = Arc::new(FakeMigrator::default());
    let (stopper, task) = start(api, migrator.clone());
    wait_for(&log, "Pending", phase_is("pg-to-b", "Pending")).await;
    {
        let mut c = cluster.lock().unwrap();
        let gone = c.migrations.pop().unwrap();
        for w in &c.watches {
            w.unbounded_send(json!({ "type": "DELETED", "object": gone }))
                .unwrap();
        }
    }
    // Without the deletion, the worker would look at the claim again every 5 s.
    tokio::time::sleep(Duration::from_secs(30)).await;
    stop(stopper, task).await;
    assert_eq!(worker_lines(&log), [CLAIM, &status_patch("pg-to-b")]);
    assert!(migrator.calls.lock().unwrap().is_empty());
}
