//! The chart's admission policy (templates/berthnode-policy.yaml) against a real
//! kube-apiserver (`../shared/k8s/up`): a node plugin's ServiceAccount token, bound to a pod
//! on node-a, lets berth's own publishing code write BerthNode node-a and no other.
//!
//! Needs ../shared (the API server) and helm and kubectl (`.ci/kube-tools`, at
//! `$BERTH_KUBE_TOOLS`, default /opt/berth-kube-tools). Without them the test says what is
//! missing and passes, unless `CI=true`: CI must run it.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use berth::kube::{
    ClusterApi, KubeApi,
    crd::{BerthNodeSpec, BerthNodeStatus},
};

const NS: &str = "berth-system";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The paths this test needs, or None (after saying why) outside CI.
fn needs() -> Option<(PathBuf, PathBuf, PathBuf)> {
    let tools = std::env::var_os("BERTH_KUBE_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/berth-kube-tools"));
    let k8s = root().join("../shared/k8s");
    let (helm, kubectl) = (tools.join("helm"), tools.join("kubectl"));
    let missing: Vec<String> = [&k8s.join("up"), &helm, &kubectl]
        .into_iter()
        .filter(|p| !p.exists())
        .map(|p| p.display().to_string())
        .collect();
    if missing.is_empty() {
        return Some((k8s, helm, kubectl));
    }
    let msg = format!("skipped: missing {}", missing.join(", "));
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true: {msg}"
    );
    eprintln!("{msg}");
    None
}

/// A kube-apiserver for this test, stopped and purged on drop.
struct ApiServer {
    k8s: PathBuf,
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
}

impl ApiServer {
    fn up(k8s: &Path) -> ApiServer {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(k8s.join("up"))
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "../shared/k8s/up failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let kubeconfig = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        ApiServer {
            k8s: k8s.to_path_buf(),
            dir,
            kubeconfig,
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = Command::new(self.k8s.join("down"))
            .arg(self.dir.path())
            .arg("--purge")
            .status();
    }
}

/// Runs `cmd` with `stdin`, returns stdout; panics with stderr on failure.
fn run(cmd: &mut Command, stdin: &str) -> String {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// berth's Kubernetes client authenticated with `token` instead of the admin's certificate.
async fn api_with_token(
    admin: &Path,
    kubectl: &Path,
    token: &str,
    dir: &Path,
    name: &str,
) -> KubeApi {
    let path = dir.join(format!("{name}.kubeconfig"));
    std::fs::copy(admin, &path).unwrap();
    let kc = |args: &[&str]| {
        run(
            Command::new(kubectl).env("KUBECONFIG", &path).args(args),
            "",
        )
    };
    kc(&[
        "config",
        "set-credentials",
        "node",
        &format!("--token={token}"),
    ]);
    kc(&["config", "set-context", "--current", "--user=node"]);
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    KubeApi::new(
        kube::Client::try_from(config).unwrap(),
        "berth.csi.dev",
        "test",
    )
}

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

/// The node plugin's token, bound to its pod on node-a, may write BerthNode node-a only; a
/// token of the same ServiceAccount bound to no node may write none.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_may_write_only_its_own_berthnode() {
    let Some((k8s, helm, kubectl)) = needs() else {
        return;
    };
    let server = ApiServer::up(&k8s);
    let kc = |args: &[&str], stdin: &str| {
        run(
            Command::new(&kubectl)
                .env("KUBECONFIG", &server.kubeconfig)
                .args(args),
            stdin,
        )
    };
    kc(
        &["apply", "-f", "-"],
        &std::fs::read_to_string(root().join("charts/berth/crds/berth.csi.dev.yaml")).unwrap(),
    );
    kc(&["create", "namespace", NS], "");
    // The node plugin's identity and rights exactly as the chart grants them.
    let chart = run(
        Command::new(&helm)
            .args(["template", "berth"])
            .arg(root().join("charts/berth"))
            .args(["--namespace", NS])
            .args(["--show-only", "templates/serviceaccounts.yaml"])
            .args(["--show-only", "templates/rbac-node.yaml"])
            .args(["--show-only", "templates/berthnode-policy.yaml"]),
        "",
    );
    kc(&["apply", "-f", "-"], &chart);
    // What a kubelet and the scheduler would have made: two nodes, the plugin's pod on one.
    kc(
        &["create", "-f", "-"],
        "apiVersion: v1\nkind: Node\nmetadata: {name: node-a}\n---\n\
         apiVersion: v1\nkind: Node\nmetadata: {name: node-b}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: berth-node-a, namespace: berth-system}\n\
         spec: {nodeName: node-a, serviceAccountName: berth-node, containers: [{name: berth, image: berth}]}\n",
    );
    // As the kubelet projects it: a token bound to the pod, so carrying its node.
    let bound = kc(
        &[
            "create",
            "token",
            "berth-node",
            "-n",
            NS,
            "--bound-object-kind",
            "Pod",
            "--bound-object-name",
            "berth-node-a",
        ],
        "",
    );
    let unbound = kc(&["create", "token", "berth-node", "-n", NS], "");
    let node_a = api_with_token(
        &server.kubeconfig,
        &kubectl,
        bound.trim(),
        server.dir.path(),
        "bound",
    )
    .await;
    let no_node = api_with_token(
        &server.kubeconfig,
        &kubectl,
        unbound.trim(),
        server.dir.path(),
        "unbound",
    )
    .await;

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
}
