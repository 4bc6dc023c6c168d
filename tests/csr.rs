//! Node certificates through the Kubernetes CSR API (src/kube/csr.rs) against a real
//! kube-apiserver (`../shared/k8s/up`), with the chart's ServiceAccounts and RBAC: berth's
//! own node-side code asks with a node plugin pod's token, berth's own signer answers with
//! the controller's token, and a certificate names the node the token is bound to, whatever
//! the request asks for.
//!
//! The API server and helm come from the shared harness (tests/common/apiserver.rs): without
//! what they need the test says so once and passes, except under CI, where it must run.

mod common;

use std::{
    io::Write,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use berth::{
    kube::csr::{
        SIGNER_NAME, request_node_certificate, service_account_username, sign_node_requests,
    },
    tls::{NodeIssuer, Peer, peer_of},
};
use common::apiserver::{ApiServer, helm, run};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::{
    ByteString,
    api::certificates::v1::{CertificateSigningRequest, CertificateSigningRequestSpec},
};
use kube::{
    Api,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
};
use rustls::pki_types::{CertificateDer, pem::PemObject};

const NS: &str = "berth-system";
/// The chart's templates that make the node plugin's and the controller's identities.
const CHART_IDENTITIES: &[&str] = &[
    "templates/serviceaccounts.yaml",
    "templates/rbac-node.yaml",
    "templates/rbac-controller.yaml",
];

/// A request of berth's signer made directly, asking for whatever `sans` says.
async fn create_request(client: kube::Client, sans: &[&str]) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    let pem = params.serialize_request(&key).unwrap().pem().unwrap();
    let csr = CertificateSigningRequest {
        metadata: ObjectMeta {
            generate_name: Some("test-".into()),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(pem.into_bytes()),
            signer_name: SIGNER_NAME.into(),
            usages: Some(vec!["client auth".into(), "server auth".into()]),
            ..Default::default()
        },
        status: None,
    };
    Api::<CertificateSigningRequest>::all(client)
        .create(&PostParams::default(), &csr)
        .await
        .unwrap()
        .metadata
        .name
        .unwrap()
}

/// Whom the certificate of request `name` names, or the type of its condition if it has
/// no certificate.
async fn outcome(admin: &kube::Client, name: &str) -> Result<Option<Peer>, String> {
    let csr = Api::<CertificateSigningRequest>::all(admin.clone())
        .get(name)
        .await
        .unwrap();
    let status = csr.status.unwrap_or_default();
    match status.certificate {
        Some(pem) => {
            let certs = CertificateDer::pem_slice_iter(&pem.0)
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            assert_eq!(certs.len(), 1, "{name}: one certificate, no chain");
            Ok(peer_of(&certs[0]))
        }
        None => Err(status
            .conditions
            .unwrap_or_default()
            .iter()
            .map(|c| c.type_.clone())
            .collect::<Vec<_>>()
            .join(",")),
    }
}

/// node-a's pod token gets a certificate naming node-a and nothing else, whether its
/// request asks for node-b or for the controller; requests from another ServiceAccount, or
/// from a token bound to no node, are denied; and each ServiceAccount's rights are exactly
/// what this takes.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_gets_a_certificate_for_its_own_node_only() {
    let Some(helm) = helm() else {
        return;
    };
    let Some(server) = ApiServer::start() else {
        return;
    };
    let kc = |args: &[&str], stdin: &str| server.kubectl(args, stdin);
    // Both identities and their rights exactly as the chart grants them.
    server.install_chart(&helm, NS, CHART_IDENTITIES);
    // Another workload that may ask for certificates, with a pod on node-a.
    kc(&["create", "serviceaccount", "other", "-n", NS], "");
    kc(
        &[
            "create",
            "clusterrole",
            "csr-requester",
            "--verb=create",
            "--resource=certificatesigningrequests.certificates.k8s.io",
        ],
        "",
    );
    kc(
        &[
            "create",
            "clusterrolebinding",
            "csr-requester",
            "--clusterrole=csr-requester",
            &format!("--serviceaccount={NS}:other"),
        ],
        "",
    );
    // The node plugin's pod on node-a, and the other workload's pod there too.
    server.nodes_and_pods(
        NS,
        &["node-a"],
        &[
            ("berth-node-a", "node-a", "berth-node"),
            ("other-a", "node-a", "other"),
        ],
    );
    let token = |sa: &str, pod: Option<&str>| match pod {
        Some(pod) => server.pod_token(NS, sa, pod),
        None => server.token(NS, sa),
    };
    let node_a = server
        .with_token(&token("berth-node", Some("berth-node-a")))
        .await;
    let node_unbound = server.with_token(&token("berth-node", None)).await;
    let other_on_a = server.with_token(&token("other", Some("other-a"))).await;
    let controller = server.with_token(&token("berth-controller", None)).await;
    let admin = server.admin().await;

    // The controller's CA, as `berth certs` makes it.
    let certs = tempfile::tempdir().unwrap();
    berth::tls::generate(certs.path(), &[]).unwrap();
    let issuer = NodeIssuer::load(certs.path()).unwrap();
    let node_sa = service_account_username(NS, "berth-node");

    // berth's own node-side code, asking (in its request) for node-b.
    let ca = certs.path().join("ca.crt");
    let asking = tokio::spawn({
        let (client, ca) = (node_a.clone(), ca.clone());
        async move { request_node_certificate(client, "node-b", &ca, Duration::from_millis(100)).await }
    });
    let as_controller = create_request(node_a.clone(), &["controller.berth"]).await;
    let unbound = create_request(node_unbound.clone(), &["node-a.node.berth"]).await;
    let other_sa = create_request(other_on_a.clone(), &["node-a.node.berth"]).await;

    // The node plugin's token cannot sign for itself.
    let e = sign_node_requests(node_a.clone(), &issuer, &node_sa)
        .await
        .expect_err("the node plugin listed certificate requests");
    assert!(e.to_string().contains("forbidden"), "{e}");

    // berth's own signer with the controller's token, until node-a has its certificate.
    let mut signed = 0;
    for _ in 0..100 {
        signed += sign_node_requests(controller.clone(), &issuer, &node_sa)
            .await
            .unwrap();
        if asking.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let tls = asking.await.unwrap().expect("node-a got its certificate");
    assert_eq!(tls.me(), Some(Peer::Node("node-a".into())));
    assert_eq!(signed, 2, "node-a's two requests, and no other");
    assert_eq!(
        outcome(&admin, &as_controller).await,
        Ok(Some(Peer::Node("node-a".into()))),
        "a request for the controller's name gets node-a's"
    );
    assert_eq!(outcome(&admin, &unbound).await, Err("Denied".into()));
    assert_eq!(outcome(&admin, &other_sa).await, Err("Denied".into()));
    // A second pass finds nothing left to do.
    assert_eq!(
        sign_node_requests(controller.clone(), &issuer, &node_sa)
            .await
            .unwrap(),
        0
    );

    // berth's own node-side code with a token bound to no node is told why it was refused.
    let refused = tokio::spawn({
        let (client, ca) = (node_unbound.clone(), ca.clone());
        async move { request_node_certificate(client, "node-a", &ca, Duration::from_millis(100)).await }
    });
    for _ in 0..100 {
        sign_node_requests(controller.clone(), &issuer, &node_sa)
            .await
            .unwrap();
        if refused.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let e = refused
        .await
        .unwrap()
        .expect_err("a token bound to no node got a certificate");
    assert!(e.to_string().contains("bound to no node"), "{e}");

    // Least privilege, as the API server's authorizer answers.
    let can = |sa: &str, verb: &str, what: &str| {
        let out = server
            .kubectl_command()
            .args(["auth", "can-i", verb])
            .args(match what.split_once('/') {
                Some((resource, sub)) => vec![resource.to_string(), format!("--subresource={sub}")],
                None => vec![what.to_string()],
            })
            .arg(format!("--as=system:serviceaccount:{NS}:{sa}"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    for (sa, verb, what, want) in [
        ("berth-node", "create", "certificatesigningrequests", true),
        ("berth-node", "get", "certificatesigningrequests", true),
        ("berth-node", "list", "certificatesigningrequests", false),
        (
            "berth-node",
            "update",
            "certificatesigningrequests/approval",
            false,
        ),
        (
            "berth-node",
            "update",
            "certificatesigningrequests/status",
            false,
        ),
        (
            "berth-controller",
            "list",
            "certificatesigningrequests",
            true,
        ),
        (
            "berth-controller",
            "update",
            "certificatesigningrequests/approval",
            true,
        ),
        (
            "berth-controller",
            "update",
            "certificatesigningrequests/status",
            true,
        ),
        (
            "berth-controller",
            "create",
            "certificatesigningrequests",
            false,
        ),
        (
            "berth-controller",
            "delete",
            "certificatesigningrequests",
            false,
        ),
        (
            "berth-controller",
            "update",
            "certificatesigningrequests",
            false,
        ),
    ] {
        assert_eq!(can(sa, verb, what), want, "{sa} {verb} {what}");
    }
    // The signer rights cover berth's signer only: the controller cannot approve a request
    // of another signer (here, client certificates for the API server itself).
    let foreign = kc(
        &["create", "-o", "name", "-f", "-"],
        &format!(
            "apiVersion: certificates.k8s.io/v1\nkind: CertificateSigningRequest\n\
             metadata: {{generateName: foreign-}}\nspec: {{signerName: kubernetes.io/kube-apiserver-client, \
             usages: [client auth], request: {}}}\n",
            base64(&{
                let key = rcgen::KeyPair::generate().unwrap();
                let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
                p.distinguished_name
                    .push(rcgen::DnType::CommonName, "someone");
                p.serialize_request(&key).unwrap().pem().unwrap()
            })
        ),
    );
    let foreign = foreign.trim().rsplit('/').next().unwrap().to_string();
    let api = Api::<CertificateSigningRequest>::all(controller.clone());
    let mut csr = Api::<CertificateSigningRequest>::all(admin.clone())
        .get(&foreign)
        .await
        .unwrap();
    csr.status.get_or_insert_with(Default::default).conditions = Some(vec![
        k8s_openapi::api::certificates::v1::CertificateSigningRequestCondition {
            type_: "Approved".into(),
            status: "True".into(),
            reason: Some("Test".into()),
            ..Default::default()
        },
    ]);
    let e = api
        .replace_subresource("approval", &foreign, &PostParams::default(), &csr)
        .await
        .expect_err("the controller approved a request of another signer");
    assert!(e.to_string().contains("forbidden"), "{e}");
}

fn base64(s: &str) -> String {
    let out = Command::new("base64")
        .arg("-w0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = out;
    out.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    String::from_utf8(out.wait_with_output().unwrap().stdout).unwrap()
}

/// The berth processes of a test, killed (and the node's pool cleaned up) on drop.
struct Processes {
    children: Vec<Child>,
    node_dir: PathBuf,
}

impl Drop for Processes {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        common::cleanup_dir(&self.node_dir);
    }
}

/// `berth controller` as the chart runs it: Kubernetes discovery, signing node
/// certificates, with the ServiceAccount token in `kubeconfig`; its log in `log`.
fn kube_controller(
    endpoint: &str,
    certs: &std::path::Path,
    kubeconfig: &std::path::Path,
    log: &std::path::Path,
) -> Child {
    let log = std::fs::File::create(log).unwrap();
    Command::new(env!("CARGO_BIN_EXE_berth"))
        .arg("controller")
        .arg(format!("--endpoint={endpoint}"))
        .args([
            "--node-id",
            "controller-0",
            "--node-discovery",
            "kubernetes",
        ])
        .arg("--tls-dir")
        .arg(certs.join("controller"))
        .arg("--node-ca")
        .arg(certs)
        .args(["--node-service-account", "berth-node", "--namespace", NS])
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "info")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// `berth node` as the chart runs it, as `node`, its agent on 127.0.0.1:`port`, its
/// certificate asked of the controller, with the pod token in `kubeconfig`; its state and
/// socket in `dir`, its log in `log`.
fn kube_node(
    node: &str,
    dir: &std::path::Path,
    port: u16,
    certs: &std::path::Path,
    kubeconfig: &std::path::Path,
    log: &std::path::Path,
) -> Child {
    let log = std::fs::File::create(log).unwrap();
    Command::new(env!("CARGO_BIN_EXE_berth"))
        .arg("node")
        .arg(format!("--endpoint=unix://{}/node.sock", dir.display()))
        .args(["--node-id", node, "--pool-size", "4Gi", "--state-dir"])
        .arg(dir.join("state"))
        .arg(format!("--agent-listen=127.0.0.1:{port}"))
        .arg(format!("--agent-advertise=127.0.0.1:{port}"))
        .arg("--agent-ca")
        .arg(certs.join("ca.crt"))
        .args(["--node-discovery", "kubernetes", "--namespace", NS])
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "info")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The chart's wiring, with the real binaries: `berth controller --node-ca` signs what
/// `berth node --agent-ca` asks for with node-a's pod token, and the node's agent then
/// serves as node-a (a client dialling node-a accepts it, one dialling node-b refuses it).
#[tokio::test(flavor = "multi_thread")]
async fn the_node_plugin_serves_with_the_certificate_the_controller_signed() {
    let Some(helm) = helm() else {
        return;
    };
    let Some(server) = ApiServer::start() else {
        return;
    };
    server.install_chart(&helm, NS, CHART_IDENTITIES);
    server.nodes_and_pods(NS, &["node-a"], &[("berth-node-a", "node-a", "berth-node")]);
    let dir = server.dir();
    // A kubeconfig per ServiceAccount, as the pods' in-cluster configuration would be.
    let node_kc =
        server.kubeconfig_with_token("node", &server.pod_token(NS, "berth-node", "berth-node-a"));
    let controller_kc =
        server.kubeconfig_with_token("controller", &server.token(NS, "berth-controller"));

    let berth = env!("CARGO_BIN_EXE_berth");
    let certs = dir.join("certs");
    run(
        Command::new(berth)
            .args(["certs", "--out"])
            .arg(&certs)
            .arg("controller"),
        "",
    );
    let node_dir = dir.join("node-a");
    std::fs::create_dir(&node_dir).unwrap();
    let port = free_port();
    let mut procs = Processes {
        children: Vec::new(),
        node_dir: node_dir.clone(),
    };
    procs.children.push(kube_controller(
        &format!("unix://{}/controller.sock", dir.display()),
        &certs,
        &controller_kc,
        &dir.join("controller.log"),
    ));
    procs.children.push(kube_node(
        "node-a",
        &node_dir,
        port,
        &certs,
        &node_kc,
        &dir.join("node.log"),
    ));
    let logs = || {
        format!(
            "node:\n{}\ncontroller:\n{}",
            std::fs::read_to_string(dir.join("node.log")).unwrap_or_default(),
            std::fs::read_to_string(dir.join("controller.log")).unwrap_or_default()
        )
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(dir.join("node.log"))
        .unwrap_or_default()
        .contains("serving the node agent")
    {
        assert!(
            Instant::now() < deadline,
            "the node agent did not start:\n{}",
            logs()
        );
        for c in &mut procs.children {
            assert!(
                c.try_wait().unwrap().is_none(),
                "a berth process exited:\n{}",
                logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let controller = berth::tls::TlsMaterial::load(&certs.join("controller")).unwrap();
    let dial = |node: &str| {
        let config = controller.client_for_node(node).unwrap();
        async move {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            tokio_rustls::TlsConnector::from(config)
                .connect(
                    rustls::pki_types::ServerName::try_from("berth-agent").unwrap(),
                    tcp,
                )
                .await
                .map(drop)
        }
    };
    dial("node-a")
        .await
        .unwrap_or_else(|e| panic!("node-a's agent is not node-a: {e}\n{}", logs()));
    let e = dial("node-b")
        .await
        .expect_err("a client dialling node-b accepted node-a's agent");
    assert!(e.to_string().contains("expected node node-b"), "{e}");

    // The controller keeps a BerthVolume per volume, under the chart's RBAC for its token:
    // made with the volume, naming its primary, gone with it.
    let endpoint = format!("unix://{}/controller.sock", dir.display());
    let mut ctl = berth::proto::csi::v1::controller_client::ControllerClient::new(
        berth::client::connect(&endpoint).await.unwrap(),
    );
    let req = common::create_req("pvc-record", 64 << 20, common::block_cap());
    // Until discovery has found node-a and the first poll has adopted it, there is nowhere
    // to place the volume (RESOURCE_EXHAUSTED) or its name cannot be ruled out elsewhere
    // (UNAVAILABLE).
    let deadline = Instant::now() + Duration::from_secs(60);
    let vol = loop {
        match ctl.create_volume(req.clone()).await {
            Ok(r) => break r.into_inner().volume.unwrap().volume_id,
            Err(e) => {
                assert!(
                    Instant::now() < deadline
                        && matches!(
                            e.code(),
                            tonic::Code::ResourceExhausted | tonic::Code::Unavailable
                        ),
                    "{e:?}\n{}",
                    logs()
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    let primary = server.kubectl(
        &[
            "get",
            "berthvolume",
            &vol,
            "-o",
            "jsonpath={.spec.primary} {.spec.phase}",
        ],
        "",
    );
    assert_eq!(primary, "node-a Ready", "{}", logs());
    ctl.delete_volume(common::delete_volume_req(&vol))
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", logs()));
    let left = server.kubectl(&["get", "berthvolumes", "-o", "name"], "");
    assert!(!left.contains(&vol), "{left}");

    // A node plugin whose token is bound to no node is refused, and exits saying why
    // (rather than running on without its agent).
    let unbound_kc = server.kubeconfig_with_token("unbound", &server.token(NS, "berth-node"));
    let other_dir = node_dir.join("unbound");
    std::fs::create_dir(&other_dir).unwrap();
    let mut refused = Command::new(berth)
        .arg("node")
        .arg(format!(
            "--endpoint=unix://{}/node.sock",
            other_dir.display()
        ))
        .args(["--node-id", "node-a", "--pool-size", "4Gi", "--state-dir"])
        .arg(other_dir.join("state"))
        .arg("--agent-listen=127.0.0.1:0")
        .arg("--agent-advertise=127.0.0.1:1")
        .arg("--agent-ca")
        .arg(certs.join("ca.crt"))
        .args(["--node-discovery", "kubernetes"])
        .env("KUBECONFIG", &unbound_kc)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = refused.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = refused.kill();
            panic!("a node plugin bound to no node kept running");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut refused.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("bound to no node"), "{stderr}");
}

/// How the controller learns that node-a is gone.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Learns {
    /// Its Lease stops changing for the lease duration (10 s).
    FromTheLease,
    /// An operator taints the Node `node.kubernetes.io/out-of-service` right after it
    /// died, Kubernetes' non-graceful shutdown signal: no wait for the Lease.
    FromTheTaint,
    /// Only berth's process died (a crash loop, an OOM kill): node-a's kubelet keeps
    /// renewing its own Lease, so the host and the database on it may live on, unfenced,
    /// and nothing fails over; once the kubelet stops too, the failover follows.
    WhenItsKubeletStops,
    /// Never: node-a lives, and the API server freezes (SIGSTOP) for 15 s, longer than
    /// the lease, so no node can renew. Every node fences its replicated primaries; once
    /// the API server thaws, the controller resumes them, and nothing fails over.
    NeverWhenTheApiServerFreezes,
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_node_fails_over_and_its_pod_and_attachment_are_released() {
    node_loss_in_kubernetes(Learns::FromTheLease).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_out_of_service_taint_fails_over_without_waiting_for_the_lease() {
    node_loss_in_kubernetes(Learns::FromTheTaint).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_whose_kubelet_still_renews_fails_over_only_once_it_stops() {
    node_loss_in_kubernetes(Learns::WhenItsKubeletStops).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_api_server_fences_and_resumes_without_failing_over() {
    node_loss_in_kubernetes(Learns::NeverWhenTheApiServerFreezes).await;
}

/// What node-a's kubelet does while its host runs: renews `kube-node-lease/node-a` (a 10 s
/// Lease, renewed every second here) until told to stop.
fn kubelet_renewing(
    client: kube::Client,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let leases = Api::<Lease>::namespaced(client, "kube-node-lease");
        for i in 0u32.. {
            let renew_time = format!("2026-03-01T10:{:02}:{:02}.000000Z", i / 60 % 60, i % 60);
            let lease: Lease = serde_json::from_value(serde_json::json!({
                "metadata": { "name": "node-a" },
                "spec": { "holderIdentity": "node-a", "leaseDurationSeconds": 10, "renewTime": renew_time },
            }))
            .unwrap();
            if i == 0 {
                leases.create(&PostParams::default(), &lease).await.unwrap();
            } else {
                leases
                    .patch("node-a", &PatchParams::default(), &Patch::Merge(&lease))
                    .await
                    .unwrap();
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.changed() => return,
            }
        }
    })
}

/// Issue 13 in Kubernetes, with the real binaries under the chart's RBAC: each node plugin
/// renews its own node Lease; when node-a's berth process is killed, the controller fails
/// node-a's replicated volume over to node-b (once the Lease stopped changing, or at once
/// on the out-of-service taint), then force-deletes the pod on node-a that uses the claim
/// and deletes its VolumeAttachment there, with `VolumeFailedOver` on the claim and
/// `PodEvicted` on the pod.
async fn node_loss_in_kubernetes(learns: Learns) {
    let Some(helm) = helm() else {
        return;
    };
    let Some(server) = ApiServer::start() else {
        return;
    };
    server.install_chart(&helm, NS, CHART_IDENTITIES);
    server.nodes_and_pods(
        NS,
        &["node-a", "node-b"],
        &[
            ("berth-node-a", "node-a", "berth-node"),
            ("berth-node-b", "node-b", "berth-node"),
        ],
    );
    let dir = server.dir();
    let berth = env!("CARGO_BIN_EXE_berth");
    let certs = dir.join("certs");
    run(
        Command::new(berth)
            .args(["certs", "--out"])
            .arg(&certs)
            .arg("controller"),
        "",
    );
    let nodes_dir = dir.join("nodes");
    std::fs::create_dir(&nodes_dir).unwrap();
    let mut procs = Processes {
        children: Vec::new(),
        node_dir: nodes_dir.clone(),
    };
    let controller_kc =
        server.kubeconfig_with_token("controller", &server.token(NS, "berth-controller"));
    let endpoint = format!("unix://{}/controller.sock", dir.display());
    procs.children.push(kube_controller(
        &endpoint,
        &certs,
        &controller_kc,
        &dir.join("controller.log"),
    ));
    for node in ["node-a", "node-b"] {
        let kc = server.kubeconfig_with_token(
            node,
            &server.pod_token(NS, "berth-node", &format!("berth-{node}")),
        );
        let node_dir = nodes_dir.join(node);
        std::fs::create_dir(&node_dir).unwrap();
        procs.children.push(kube_node(
            node,
            &node_dir,
            free_port(),
            &certs,
            &kc,
            &dir.join(format!("{node}.log")),
        ));
    }
    let logs = || {
        ["controller", "node-a", "node-b"]
            .iter()
            .map(|n| {
                format!(
                    "--- {n}\n{}",
                    std::fs::read_to_string(dir.join(format!("{n}.log"))).unwrap_or_default()
                )
            })
            .collect::<String>()
    };
    let mut ctl = loop {
        if let Ok(ch) = berth::client::connect(&endpoint).await {
            break berth::proto::csi::v1::controller_client::ControllerClient::new(ch);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // A replicated volume on node-a for claim db/data-pg-0, once both nodes are found.
    server.kubectl(&["create", "namespace", "db"], "");
    // No controller-manager here to make it.
    server.kubectl(&["-n", "db", "create", "serviceaccount", "default"], "");
    let mut req = common::create_req("pvc-failover", 64 << 20, common::block_cap());
    req.parameters = common::params(&[
        ("replicas", "2"),
        ("replicationInterval", "1s"),
        ("csi.storage.k8s.io/pvc/name", "data-pg-0"),
        ("csi.storage.k8s.io/pvc/namespace", "db"),
    ]);
    req.accessibility_requirements = Some(berth::proto::csi::v1::TopologyRequirement {
        requisite: vec![],
        preferred: vec![berth::proto::csi::v1::Topology {
            segments: [(
                "topology.berth.csi.dev/node".to_string(),
                "node-a".to_string(),
            )]
            .into(),
        }],
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    let vol = loop {
        let found = server.kubectl(&["get", "berthnodes", "-o", "name"], "");
        if found.contains("node-a") && found.contains("node-b") {
            match ctl.create_volume(req.clone()).await {
                Ok(r) => break r.into_inner().volume.unwrap().volume_id,
                Err(e) => assert!(
                    Instant::now() < deadline
                        && matches!(
                            e.code(),
                            tonic::Code::ResourceExhausted | tonic::Code::Unavailable
                        ),
                    "{e:?}\n{}",
                    logs()
                ),
            }
        }
        assert!(Instant::now() < deadline, "nodes not found\n{}", logs());
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let spec = |path: &str| {
        server.kubectl(
            &[
                "get",
                "berthvolume",
                &vol,
                "-o",
                &format!("jsonpath={path}"),
            ],
            "",
        )
    };
    assert_eq!(spec("{.spec.primary}"), "node-a", "{}", logs());
    // What Kubernetes holds for a StatefulSet pod on node-a using the claim.
    server.kubectl(
        &["create", "-f", "-"],
        &format!(
            "apiVersion: v1\nkind: PersistentVolume\nmetadata: {{name: pv-failover}}\n\
             spec: {{capacity: {{storage: 64Mi}}, accessModes: [ReadWriteOnce], \
             persistentVolumeReclaimPolicy: Retain, claimRef: {{namespace: db, name: data-pg-0}}, \
             csi: {{driver: berth.csi.dev, volumeHandle: {vol}}}}}\n---\n\
             apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {{name: data-pg-0, namespace: db}}\n\
             spec: {{accessModes: [ReadWriteOnce], volumeName: pv-failover, storageClassName: '', \
             resources: {{requests: {{storage: 64Mi}}}}}}\n---\n\
             apiVersion: v1\nkind: Pod\nmetadata: {{name: pg-0, namespace: db}}\n\
             spec: {{nodeName: node-a, containers: [{{name: pg, image: postgres}}], \
             volumes: [{{name: data, persistentVolumeClaim: {{claimName: data-pg-0}}}}]}}\n---\n\
             apiVersion: storage.k8s.io/v1\nkind: VolumeAttachment\nmetadata: {{name: va-failover}}\n\
             spec: {{attacher: berth.csi.dev, nodeName: node-a, source: {{persistentVolumeName: pv-failover}}}}\n"
        ),
    );
    let (stop_kubelet, stop) = tokio::sync::watch::channel(false);
    let kubelet = if learns == Learns::WhenItsKubeletStops {
        Some(kubelet_renewing(server.admin().await, stop))
    } else {
        None
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while spec("{.spec.replicas[*].snapshot}").trim().is_empty() {
        assert!(Instant::now() < deadline, "no replica\n{}", logs());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let leases = server.kubectl(
        &[
            "-n",
            NS,
            "get",
            "leases",
            "-l",
            "berth.csi.dev/node-lease",
            "-o",
            "name",
        ],
        "",
    );
    assert!(
        leases.contains("berth-node-node-a") && leases.contains("berth-node-node-b"),
        "{leases}"
    );

    let events = || {
        server.kubectl(
            &[
                "-n",
                "db",
                "get",
                "events.events.k8s.io",
                "-o",
                "jsonpath={.items[*].reason}",
            ],
            "",
        )
    };
    if learns == Learns::NeverWhenTheApiServerFreezes {
        let epoch: u64 = spec("{.spec.epoch}").parse().unwrap();
        server.signal(nix::sys::signal::Signal::SIGSTOP);
        tokio::time::sleep(Duration::from_secs(15)).await;
        server.signal(nix::sys::signal::Signal::SIGCONT);
        // The fenced copy is resumed at a new epoch, on node-a.
        let deadline = Instant::now() + Duration::from_secs(40);
        while spec("{.spec.epoch}").parse::<u64>().unwrap() <= epoch {
            assert!(Instant::now() < deadline, "not resumed\n{}", logs());
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        // Well past another lease duration: still node-a's, never failed over.
        tokio::time::sleep(Duration::from_secs(12)).await;
        assert_eq!(spec("{.spec.primary}"), "node-a", "{}", logs());
        assert_eq!(spec("{.spec.failover}"), "", "{}", logs());
        let reasons = events();
        assert!(!reasons.contains("VolumeFailedOver"), "{reasons}");
        let log = std::fs::read_to_string(dir.join("controller.log")).unwrap();
        assert!(
            log.contains("volume resumed after a lease lapse"),
            "{}",
            logs()
        );
        eprintln!(
            "{learns:?}: fenced, resumed at epoch {}",
            spec("{.spec.epoch}")
        );
        return;
    }
    // node-a's berth process dies (procs.children[1]).
    let _ = procs.children[1].kill();
    let _ = procs.children[1].wait();
    let killed = Instant::now();
    if learns == Learns::FromTheTaint {
        server.kubectl(
            &[
                "taint",
                "nodes",
                "node-a",
                "node.kubernetes.io/out-of-service=nodeshutdown:NoExecute",
            ],
            "",
        );
    }
    let mut since = killed;
    if let Some(kubelet) = kubelet {
        // Past berth's 10 s lease and more: the volume waits, and says so on the claim.
        while killed.elapsed() < Duration::from_secs(16) {
            assert_eq!(spec("{.spec.primary}"), "node-a", "{}", logs());
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert!(
            events().contains("VolumeFailoverWaiting"),
            "{}\n{}",
            events(),
            logs()
        );
        stop_kubelet.send(true).unwrap();
        kubelet.await.unwrap();
        since = Instant::now();
    }
    let deadline = Instant::now() + Duration::from_secs(40);
    while spec("{.spec.primary}") != "node-b" {
        assert!(Instant::now() < deadline, "no failover\n{}", logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let failed_over = since.elapsed();
    assert_eq!(spec("{.spec.failover.from}"), "node-a");
    match learns {
        // The controller counts the 10 s from when it saw the last renewal, 0-2 s before
        // the kill.
        Learns::FromTheLease => assert!(failed_over >= Duration::from_secs(7), "{failed_over:?}"),
        // Nodes are listed every 3 s.
        Learns::FromTheTaint => assert!(failed_over < Duration::from_secs(6), "{failed_over:?}"),
        // The kubelet's 10 s Lease counts for 10/4 + 2 s after the controller saw its
        // last renewal, 0-2 s before it stopped.
        Learns::WhenItsKubeletStops => assert!(
            (Duration::from_secs(2)..Duration::from_secs(10)).contains(&failed_over),
            "{failed_over:?}"
        ),
        Learns::NeverWhenTheApiServerFreezes => unreachable!("returned above"),
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let pods = server.kubectl(&["-n", "db", "get", "pods", "-o", "name"], "");
        let vas = server.kubectl(&["get", "volumeattachments", "-o", "name"], "");
        let reasons = events();
        if !pods.contains("pg-0")
            && !vas.contains("va-failover")
            && reasons.contains("VolumeFailedOver")
            && reasons.contains("PodEvicted")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pods {pods:?}, attachments {vas:?}, events {reasons:?}\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!(
        "{learns:?}: failed over {failed_over:?} after the kill (or the kubelet's stop); pod and attachment released"
    );
    // The volume is attachable on node-b now.
    ctl.controller_publish_volume(berth::proto::csi::v1::ControllerPublishVolumeRequest {
        volume_id: vol.clone(),
        node_id: "node-b".into(),
        volume_capability: Some(common::block_cap()),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("{e:?}\n{}", logs()));
}
