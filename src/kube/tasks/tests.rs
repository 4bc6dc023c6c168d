//! The background tasks against a mock API server, in paused time: each test lets virtual
//! time run and then asserts every request made, in order.

use std::sync::{
    Mutex,
    atomic::{AtomicU64, AtomicUsize, Ordering},
};

use serde_json::{Value, json};

use super::*;
use crate::kube::testing::{Reply, Seen, pair, scrubbed};

const NODE: &str = "/apis/berth.csi.dev/v1alpha1/berthnodes/node-a?&force=true&fieldManager=berth";
const NODE_STATUS: &str =
    "/apis/berth.csi.dev/v1alpha1/berthnodes/node-a/status?&force=true&fieldManager=berth";
const NODES: &str = "/apis/berth.csi.dev/v1alpha1/berthnodes?";

fn lines(log: &Mutex<Vec<Seen>>) -> Vec<String> {
    log.lock().unwrap().iter().map(Seen::line).collect()
}

/// Runs `task` until `at` (virtual time), then signals shutdown and waits for it to return.
async fn run_until<F>(at: Duration, task: impl FnOnce(watch::Receiver<bool>) -> F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let (stop, shutdown) = watch::channel(false);
    let handle = tokio::spawn(task(shutdown));
    tokio::time::sleep(at).await;
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(1), handle)
        .await
        .expect("the task returns at shutdown")
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn node_heartbeat_publishes_at_once_then_every_interval_and_retries_failures_sooner() {
    let (api, server) = pair();
    let api: Arc<dyn ClusterApi> = Arc::new(api);
    let calls = AtomicUsize::new(0);
    let (log, _server) = server.serve(move |s: &Seen, reply: Reply| {
        // The very first request fails (the API server restarting), every later one succeeds.
        if calls.fetch_add(1, Ordering::SeqCst) == 0 {
            reply.status(
                503,
                "ServiceUnavailable",
                "the server is currently unable to handle the request",
            );
        } else {
            // The whole object, as the API server answers an apply of either part.
            let mut obj = json!({
                "apiVersion": "berth.csi.dev/v1alpha1", "kind": "BerthNode",
                "metadata": { "name": "node-a", "resourceVersion": "1" },
                "spec": { "agentAddress": "10.0.0.5:7070", "domain": "default" },
            });
            if let Some(status) = s.body.get("status") {
                obj["status"] = status.clone();
            }
            reply.json(200, obj);
        }
    });
    let available = Arc::new(AtomicU64::new(40 << 30));
    let free = available.clone();
    let spec = BerthNodeSpec {
        agent_address: "10.0.0.5:7070".into(),
        domain: "default".into(),
    };
    // Publishes at 0 s (fails), 1 s (back-off), 11 s and 21 s.
    run_until(Duration::from_secs(25), |shutdown| {
        node_heartbeat(
            api,
            "node-a".into(),
            spec,
            move || (64 << 30, free.fetch_sub(1 << 30, Ordering::SeqCst)),
            Duration::from_secs(10),
            shutdown,
        )
    })
    .await;
    let patch = |uri: &str| format!("PATCH {uri}");
    assert_eq!(
        lines(&log),
        [
            patch(NODE),
            patch(NODE),
            patch(NODE_STATUS),
            patch(NODE),
            patch(NODE_STATUS),
            patch(NODE),
            patch(NODE_STATUS),
        ]
    );
    let log = log.lock().unwrap();
    assert!(
        log.iter()
            .all(|s| s.content_type.as_deref() == Some("application/apply-patch+yaml"))
    );
    for s in log.iter().filter(|s| s.uri == NODE) {
        assert_eq!(
            s.body,
            json!({
                "apiVersion": "berth.csi.dev/v1alpha1", "kind": "BerthNode",
                "metadata": { "name": "node-a" },
                "spec": { "agentAddress": "10.0.0.5:7070", "domain": "default" },
            })
        );
    }
    // Capacity is read afresh for every heartbeat (the failed one took 40 GiB's reading).
    let statuses: Vec<Value> = log
        .iter()
        .filter(|s| s.uri == NODE_STATUS)
        .map(|s| scrubbed(s.body.clone()))
        .collect();
    let want = |gib: u64| {
        json!({
            "apiVersion": "berth.csi.dev/v1alpha1", "kind": "BerthNode",
            "metadata": { "name": "node-a" },
            "status": {
                "totalBytes": 64u64 << 30, "availableBytes": gib << 30,
                "heartbeatTime": "<now>", "version": env!("CARGO_PKG_VERSION"),
            },
        })
    };
    assert_eq!(statuses, [want(39), want(38), want(37)]);
}

fn berth_node(name: &str, domain: &str, heartbeat: Option<&str>) -> Value {
    let mut v = json!({
        "apiVersion": "berth.csi.dev/v1alpha1", "kind": "BerthNode",
        "metadata": { "name": name, "resourceVersion": "1" },
        "spec": { "agentAddress": format!("{name}.pods:7070"), "domain": domain },
    });
    if let Some(t) = heartbeat {
        v["status"] =
            json!({ "totalBytes": 1, "availableBytes": 1, "heartbeatTime": t, "version": "0.1.0" });
    }
    v
}

#[tokio::test(start_paused = true)]
async fn discover_nodes_reports_membership_changes_and_survives_failed_lists() {
    let (api, server) = pair();
    let api: Arc<dyn ClusterApi> = Arc::new(api);
    let now = rfc3339_now();
    let fresh = Some(now.as_str());
    // node-b's last heartbeat is a day old: it stays a member all the same.
    let stale = Some("2026-01-01T00:00:00Z");
    let a = berth_node("node-a", "default", fresh);
    let b = berth_node("node-b", "default", stale);
    let c = berth_node("node-c", "elsewhere", fresh);
    let d = berth_node("node-d", "default", None);
    let list = |items: Vec<Value>| json!({ "apiVersion": "berth.csi.dev/v1alpha1", "kind": "BerthNodeList", "metadata": { "resourceVersion": "9" }, "items": items });
    // One answer per list, in order; the last repeats.
    let mut answers = vec![
        Ok(list(vec![a.clone(), b.clone(), c.clone()])),
        Err((500, "etcdserver: request timed out")),
        Err((503, "no healthy upstream")),
        Ok(list(vec![b.clone(), a.clone(), c.clone()])),
        Ok(list(vec![a.clone(), b.clone(), d.clone()])),
        Ok(list(vec![a.clone(), d.clone()])),
    ]
    .into_iter();
    let mut last = None;
    let (log, _server) = server.serve(move |_: &Seen, reply: Reply| {
        let answer = answers.next().or(last.clone()).unwrap();
        last = Some(answer.clone());
        match answer {
            Ok(body) => reply.json(200, body),
            Err((500, message)) => reply.status(500, "InternalError", message),
            Err((code, text)) => reply.text(code, text),
        }
    });
    let seen = Arc::new(Mutex::new(Vec::new()));
    let changes = seen.clone();
    // Lists at 0 s, 10 s (500), 11 s (503), 13 s (no change), 23 s (+d), 33 s (-b), 43 s.
    run_until(Duration::from_secs(45), |shutdown| {
        discover_nodes(
            api,
            "default".into(),
            move |m| changes.lock().unwrap().push(m),
            Duration::from_secs(10),
            shutdown,
        )
    })
    .await;
    assert_eq!(lines(&log), vec![format!("GET {NODES}"); 7]);
    assert!(log.lock().unwrap().iter().all(|s| s.body == Value::Null));
    let members = |ids: &[&str]| -> BTreeMap<String, String> {
        ids.iter()
            .map(|id| (format!("node-{id}"), format!("node-{id}.pods:7070")))
            .collect()
    };
    assert_eq!(
        *seen.lock().unwrap(),
        [
            members(&["a", "b"]),
            members(&["a", "b", "d"]),
            members(&["a", "d"])
        ]
    );
}

const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/berth-system/leases/berth-controller";

/// A Lease store as the API server keeps it, with scripted faults.
struct Leases {
    lease: Option<Value>,
    version: u64,
    /// Per request number (from 0): answer with this status code instead.
    faults: Vec<(usize, u16)>,
    /// Per request number: leave the request unanswered.
    hang: Vec<usize>,
    /// Per request number: another holder takes the lease just before this request.
    steal: Vec<usize>,
    n: usize,
    held: Vec<Reply>,
}

impl Leases {
    fn new() -> Self {
        Leases {
            lease: None,
            version: 0,
            faults: vec![],
            hang: vec![],
            steal: vec![],
            n: 0,
            held: vec![],
        }
    }

    fn handle(&mut self, s: &Seen, reply: Reply) {
        let n = self.n;
        self.n += 1;
        if self.steal.contains(&n) {
            self.version += 1;
            let lease = self.lease.as_mut().unwrap();
            lease["spec"]["holderIdentity"] = json!("controller-b");
            lease["metadata"]["resourceVersion"] = json!(self.version.to_string());
        }
        if self.hang.contains(&n) {
            self.held.push(reply);
            return;
        }
        if let Some(&(_, code)) = self.faults.iter().find(|(at, _)| *at == n) {
            return reply.status(code, "Conflict", "scripted fault");
        }
        match (s.method.as_str(), self.lease.as_ref()) {
            ("GET", Some(l)) => reply.json(200, l.clone()),
            ("GET", None) => reply.status(
                404,
                "NotFound",
                "leases.coordination.k8s.io \"berth-controller\" not found",
            ),
            ("POST", None) | ("PUT", Some(_)) => {
                let current = self
                    .lease
                    .as_ref()
                    .map(|l| l["metadata"]["resourceVersion"].clone());
                if current.is_some()
                    && Some(&s.body["metadata"]["resourceVersion"]) != current.as_ref()
                {
                    return reply.status(409, "Conflict", "the object has been modified");
                }
                self.version += 1;
                let mut l = s.body.clone();
                l["metadata"]["resourceVersion"] = json!(self.version.to_string());
                self.lease = Some(l.clone());
                reply.json(if s.method == "POST" { 201 } else { 200 }, l);
            }
            _ => reply.status(409, "AlreadyExists", "already exists"),
        }
    }
}

async fn elect(
    leases: Leases,
    samples: &[u64],
    stop_at: u64,
) -> (Vec<bool>, Vec<String>, Vec<Seen>) {
    let (api, server) = pair();
    let api: Arc<dyn ClusterApi> = Arc::new(api);
    let mut leases = leases;
    let (log, _server) = server.serve(move |s: &Seen, reply: Reply| leases.handle(s, reply));
    let (tx, rx) = watch::channel(false);
    let (stop, shutdown) = watch::channel(false);
    let task = tokio::spawn(leader_election(
        api,
        "berth-system".into(),
        "berth-controller".into(),
        "controller-a".into(),
        Duration::from_secs(15),
        tx,
        shutdown,
    ));
    let start = tokio::time::Instant::now();
    let mut seen = vec![];
    for &t in samples {
        tokio::time::sleep_until(start + Duration::from_secs(t)).await;
        seen.push(*rx.borrow());
    }
    tokio::time::sleep_until(start + Duration::from_secs(stop_at)).await;
    stop.send(true).unwrap();
    task.await.unwrap();
    assert!(!*rx.borrow(), "not leader after shutdown");
    let log = log.lock().unwrap().clone();
    (seen, log.iter().map(Seen::line).collect(), log)
}

#[tokio::test(start_paused = true)]
async fn leader_election_steps_down_as_soon_as_a_renewal_fails_or_is_lost() {
    let mut leases = Leases::new();
    // Requests: 0 GET 404, 1 POST (t=0); 2 GET, 3 PUT (t=5); 4 GET fails (t=10);
    // 5 GET, 6 PUT (t=15); 7 GET, 8 PUT 409 (t=20); 9 GET: controller-b holds it (t=25).
    leases.faults = vec![(4, 500), (8, 409)];
    leases.steal = vec![9];
    let (seen, lines, log) = elect(leases, &[1, 6, 11, 16, 21, 26], 27).await;
    assert_eq!(seen, [true, true, false, true, false, false]);
    let get = format!("GET {LEASE}");
    let put = format!("PUT {LEASE}?");
    let post = "POST /apis/coordination.k8s.io/v1/namespaces/berth-system/leases?".to_string();
    assert_eq!(
        lines,
        [&get, &post, &get, &put, &get, &get, &put, &get, &put, &get].map(|s| s.to_string())
    );
    // Every update carries the resourceVersion it read, and renews for 15 s.
    for s in log.iter().filter(|s| s.method == "PUT") {
        assert!(
            s.body["metadata"]["resourceVersion"].is_string(),
            "{}",
            s.body
        );
        assert_eq!(s.body["spec"]["holderIdentity"], "controller-a");
        assert_eq!(s.body["spec"]["leaseDurationSeconds"], 15);
        assert_eq!(scrubbed(s.body["spec"].clone())["renewTime"], "<now>");
    }
    // Not leader at shutdown: nothing released.
}

#[tokio::test(start_paused = true)]
async fn leader_election_steps_down_when_a_renewal_hangs_and_releases_at_shutdown() {
    let mut leases = Leases::new();
    // 0 GET 404, 1 POST (t=0); 2 GET hangs (t=5) until the 5 s renewal deadline (t=10);
    // 3 GET, 4 PUT (t=15); shutdown at 17: 5 GET, 6 PUT releasing.
    leases.hang = vec![2];
    let (seen, lines, log) = elect(leases, &[1, 6, 11, 16], 17).await;
    assert_eq!(seen, [true, true, false, true]);
    assert_eq!(lines.len(), 7, "{lines:#?}");
    let release = log.last().unwrap();
    assert_eq!(release.line(), format!("PUT {LEASE}?"));
    assert_eq!(
        scrubbed(release.body["spec"].clone()),
        json!({ "leaseDurationSeconds": 1, "acquireTime": "<now>", "renewTime": "<now>", "leaseTransitions": 0 })
    );
}

#[test]
fn backoff_doubles_up_to_its_maximum_and_resets() {
    let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(5));
    let got: Vec<u64> = (0..5).map(|_| b.next().as_secs()).collect();
    assert_eq!(got, [1, 2, 4, 5, 5]);
    b.reset();
    assert_eq!(b.next(), Duration::from_secs(1));
}

#[test]
fn heartbeat_time_is_rfc3339_to_the_second() {
    let t = rfc3339_now();
    assert_eq!(t.len(), "2026-03-01T10:00:00Z".len(), "{t}");
    t.parse::<Timestamp>().unwrap();
}

#[tokio::test(start_paused = true)]
async fn node_lease_renews_every_period_and_reports_each_accepted_renewal_by_its_send_time() {
    let (api, server) = pair();
    let api: Arc<dyn ClusterApi> = Arc::new(api);
    let start = tokio::time::Instant::now();
    // Per request: when it came (virtual seconds since start, real instant), and the replies
    // left unanswered.
    let arrivals = Arc::new(Mutex::new(Vec::<(u64, std::time::Instant)>::new()));
    let seen_at = arrivals.clone();
    let mut held = vec![];
    let (log, _server) = server.serve(move |s: &Seen, reply: Reply| {
        let n = {
            let mut a = seen_at.lock().unwrap();
            a.push((start.elapsed().as_secs(), std::time::Instant::now()));
            a.len() - 1
        };
        match n {
            // The API server refuses the second renewal and never answers the third.
            1 => reply.status(503, "ServiceUnavailable", "etcdserver: leader changed"),
            2 => held.push(reply),
            _ => reply.json(200, s.body.clone()),
        }
    });
    let renewals = Arc::new(Mutex::new(Vec::new()));
    let sink = renewals.clone();
    // Renews at 0, 2 (fails), 4 (hangs until its 2 s are up), 6 and 8.
    run_until(Duration::from_secs(9), |shutdown| {
        node_lease(
            api,
            "berth-system".into(),
            "node-a".into(),
            Duration::from_secs(2),
            Duration::from_secs(10),
            move |sent| sink.lock().unwrap().push(sent),
            shutdown,
        )
    })
    .await;
    let path = "/apis/coordination.k8s.io/v1/namespaces/berth-system/leases/berth-node-node-a?";
    assert_eq!(lines(&log), vec![format!("PATCH {path}"); 5]);
    for s in log.lock().unwrap().iter() {
        assert_eq!(s.body["spec"]["leaseDurationSeconds"], 10);
        assert_eq!(s.body["spec"]["holderIdentity"], "node-a");
    }
    let arrivals = arrivals.lock().unwrap().clone();
    assert_eq!(
        arrivals.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
        [0, 2, 4, 6, 8],
        "a failure is retried at the next tick, no later"
    );
    // The accepted ones (0, 6, 8), each stamped before the API server had its request.
    let renewals = renewals.lock().unwrap().clone();
    assert_eq!(renewals.len(), 3);
    for (sent, (_, arrived)) in renewals.iter().zip([arrivals[0], arrivals[3], arrivals[4]]) {
        assert!(*sent <= arrived, "stamped after the request left");
    }
    assert!(renewals.windows(2).all(|w| w[0] < w[1]));
}
