//! The chart's admission policies (templates/berthnode-policy.yaml,
//! templates/node-lease-policy.yaml) against a real kube-apiserver (`../shared/k8s/up`): a
//! node plugin's ServiceAccount token, bound to a pod on node-a, lets berth's own code write
//! BerthNode node-a and no other, and renew node-a's Lease and no other.
//!
//! The API server and helm come from the shared harness (tests/common/apiserver.rs): without
//! what they need the test says so once and passes, except under CI, where it must run.

mod common;

use std::time::{Duration, Instant};

use berth::kube::{
    ClusterApi, KubeApi,
    crd::{BerthNodeSpec, BerthNodeStatus},
};
use common::apiserver::{ApiServer, helm};

const NS: &str = "berth-system";

async fn publish(api: &KubeApi, node: &str) -> berth::error::Result<()> {
    api.publish_node(
        node,
        BerthNodeSpec {
            agent_address: "10.0.0.1:7070".into(),
            domain: "default".into(),
        },
        BerthNodeStatus {
            total_bytes: 1 << 30,
            available_bytes: 1 << 29,
            heartbeat_time: "2026-01-01T00:00:00Z".into(),
            version: "test".into(),
        },
    )
    .await
}

/// The node plugin's token, bound to its pod on node-a, may write BerthNode node-a and renew
/// Lease berth-node-node-a only; a token of the same ServiceAccount bound to no node may
/// write neither.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_may_write_only_its_own_berthnode_and_lease() {
    let Some(helm) = helm() else {
        return;
    };
    let Some(server) = ApiServer::start() else {
        return;
    };
    let kc = |args: &[&str], stdin: &str| server.kubectl(args, stdin);
    // The node plugin's identity, rights and admission policy as the chart makes them.
    server.install_chart(
        &helm,
        NS,
        &[
            "templates/serviceaccounts.yaml",
            "templates/rbac-node.yaml",
            "templates/berthnode-policy.yaml",
            "templates/node-lease-policy.yaml",
        ],
    );
    // Two nodes, the plugin's pod on one.
    server.nodes_and_pods(
        NS,
        &["node-a", "node-b"],
        &[("berth-node-a", "node-a", "berth-node")],
    );
    // As the kubelet projects it: a token bound to the pod, so carrying its node.
    let bound = server.pod_token(NS, "berth-node", "berth-node-a");
    let unbound = server.token(NS, "berth-node");
    let api = |client| KubeApi::new(client, "berth.csi.dev", "test");
    let node_a = api(server.with_token(&bound).await);
    let no_node = api(server.with_token(&unbound).await);

    // The API server loads a new policy asynchronously: wait until it denies.
    let start = Instant::now();
    let denied = loop {
        match publish(&node_a, "node-b").await {
            Err(e) => break e.to_string(),
            Ok(()) if start.elapsed() < Duration::from_secs(30) => {
                kc(&["delete", "berthnode", "node-b"], "");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(()) => panic!("node-a's token wrote BerthNode node-b"),
        }
    };
    assert!(
        denied.contains("only the BerthNode of its own node"),
        "denied for another reason: {denied}"
    );
    publish(&node_a, "node-a")
        .await
        .expect("node-a's token writes BerthNode node-a (spec and status)");
    let e = publish(&no_node, "node-a")
        .await
        .expect_err("a token bound to no node wrote a BerthNode");
    assert!(e.to_string().contains("bound to no node"), "{e}");
    let got = kc(&["get", "berthnodes", "-o", "name"], "");
    assert_eq!(got.trim(), "berthnode.berth.csi.dev/node-a");

    // Its node Lease: the policy was loaded with the other one, but is waited for the same
    // way. Refused before it exists (a create) and once it does (a patch).
    let start = Instant::now();
    let denied = loop {
        match node_a.renew_node_lease(NS, "node-b", 10).await {
            Err(e) => break e.to_string(),
            Ok(()) if start.elapsed() < Duration::from_secs(30) => {
                kc(&["delete", "lease", "berth-node-node-b", "-n", NS], "");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(()) => panic!("node-a's token renewed node-b's Lease"),
        }
    };
    assert!(
        denied.contains("only the Lease of its own node"),
        "denied for another reason: {denied}"
    );
    for _ in 0..2 {
        node_a
            .renew_node_lease(NS, "node-a", 10)
            .await
            .expect("node-a's token creates, then renews, node-a's Lease");
    }
    let admin = berth::kube::KubeApi::new(server.admin().await, "berth.csi.dev", "test");
    admin.renew_node_lease(NS, "node-b", 10).await.unwrap();
    let e = node_a
        .renew_node_lease(NS, "node-b", 10)
        .await
        .expect_err("node-a's token renewed node-b's existing Lease");
    assert!(e.to_string().contains("bound to node node-a"), "{e}");
    let e = no_node
        .renew_node_lease(NS, "node-a", 10)
        .await
        .expect_err("a token bound to no node renewed a Lease");
    assert!(e.to_string().contains("bound to no node"), "{e}");
}
