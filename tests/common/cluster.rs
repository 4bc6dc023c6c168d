//! A berth cluster on one machine: a cluster controller and several node processes, each
//! with its own state dir, pool, CSI socket and agent port on loopback, all with
//! certificates from one `berth certs` CA.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use berth::proto::agent::v1::{self as pb, agent_client::AgentClient};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::{Ctl, cleanup_dir, csi, csi::node_client::NodeClient, require_root};

pub struct NodeProc {
    pub id: String,
    pub dir: PathBuf,
    pub port: u16,
    pub child: Option<Child>,
    pub failpoint: Option<String>,
}

impl NodeProc {
    pub fn socket(&self) -> PathBuf {
        self.dir.join("csi.sock")
    }
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket().display())
    }
    pub fn pool_root(&self) -> PathBuf {
        self.dir.join("state").join("pool")
    }
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("berth.log")).unwrap_or_default()
    }
    /// The CO's directories on this node.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join("k8s").join(name)
    }
}

pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<NodeProc>,
    pub controller: Option<Child>,
    pub controller_failpoint: Option<String>,
    /// The controller's --metrics-listen port.
    pub controller_metrics: u16,
    /// TCP proxies in front of some nodes' agents (see [`TestCluster::start_proxied`]).
    pub proxies: Vec<Proxy>,
}

/// A TCP proxy on loopback whose live connections can be cut at once, while new ones are
/// still accepted: a network that drops connections, without any process dying.
pub struct Proxy {
    pub port: u16,
    generation: tokio::sync::watch::Sender<u64>,
}

impl Proxy {
    pub async fn start(target: u16) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (generation, _) = tokio::sync::watch::channel(0u64);
        let gen_tx = generation.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut cut = gen_tx.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Proxy { port, generation }
    }

    /// Drops every connection open now.
    pub fn cut(&self) {
        self.generation.send_modify(|g| *g += 1);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn wait_for_socket(
    child: &mut Child,
    socket: &Path,
    endpoint: &str,
    log: impl Fn() -> String,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("berth exited during start-up ({status}):\n{}", log());
        }
        if socket.exists() && berth::client::connect(endpoint).await.is_ok() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "berth did not start within 60s:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl TestCluster {
    /// Starts `n` nodes (node-a, node-b, ...) and the controller.
    pub async fn start(n: usize) -> TestCluster {
        TestCluster::start_proxied(n, &[]).await
    }

    /// As [`TestCluster::start`], with the agents of the nodes at `proxied` reached (by
    /// the controller and by peers) through a [`Proxy`] each, in the same order.
    pub async fn start_proxied(n: usize, proxied: &[usize]) -> TestCluster {
        require_root();
        let dir = tempfile::Builder::new()
            .prefix("berth-cluster-")
            .tempdir()
            .unwrap();
        let mut names: Vec<String> = (0..n)
            .map(|i| format!("node-{}", (b'a' + i as u8) as char))
            .collect();
        names.push("controller".into());
        berth::tls::generate(&dir.path().join("certs"), &names).unwrap();
        let nodes = names[..n]
            .iter()
            .map(|id| NodeProc {
                id: id.clone(),
                dir: dir.path().join(id),
                port: free_port(),
                child: None,
                failpoint: None,
            })
            .collect();
        let mut c = TestCluster {
            dir,
            nodes,
            controller: None,
            controller_failpoint: None,
            controller_metrics: free_port(),
            proxies: Vec::new(),
        };
        for &i in proxied {
            c.proxies.push(Proxy::start(c.nodes[i].port).await);
        }
        let nodes_file: String = c
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let port = proxied
                    .iter()
                    .position(|&p| p == i)
                    .map_or(n.port, |k| c.proxies[k].port);
                format!("{} 127.0.0.1:{port}\n", n.id)
            })
            .collect();
        std::fs::write(c.dir.path().join("nodes"), nodes_file).unwrap();
        for i in 0..n {
            c.spawn_node(i).await;
        }
        c.spawn_controller().await;
        c
    }

    pub fn certs(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    pub fn controller_socket(&self) -> PathBuf {
        self.dir.path().join("controller.sock")
    }
    pub fn controller_endpoint(&self) -> String {
        format!("unix://{}", self.controller_socket().display())
    }
    /// The controller's --state-dir: its placement records are in `placement/` there.
    pub fn controller_state(&self) -> PathBuf {
        self.dir.path().join("controller-state")
    }

    pub fn controller_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("controller.log")).unwrap_or_default()
    }

    pub async fn spawn_node(&mut self, i: usize) {
        let certs = self.certs();
        let n = &mut self.nodes[i];
        std::fs::create_dir_all(&n.dir).unwrap();
        let _ = std::fs::remove_file(n.socket());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(n.dir.join("berth.log"))
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_berth"));
        cmd.arg("node")
            .arg("--endpoint")
            .arg(n.endpoint())
            .arg("--state-dir")
            .arg(n.dir.join("state"))
            .arg("--node-id")
            .arg(&n.id)
            // Smaller than the free space of any host the tests run on: a pool image larger
            // than its host offers only what the host has free, and capacity figures would
            // then move with every other test writing to the same disk.
            .arg("--pool-size")
            .arg("8Gi")
            .arg("--agent-listen")
            .arg(format!("127.0.0.1:{}", n.port))
            .arg("--tls-dir")
            .arg(certs.join(&n.id))
            .env("RUST_LOG", "info,berth=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        match &n.failpoint {
            Some(fp) => cmd.env("BERTH_FAILPOINT", fp),
            None => cmd.env_remove("BERTH_FAILPOINT"),
        };
        let mut child = cmd.spawn().expect("spawn berth node");
        let (socket, endpoint, dir) = (n.socket(), n.endpoint(), n.dir.clone());
        wait_for_socket(&mut child, &socket, &endpoint, || {
            std::fs::read_to_string(dir.join("berth.log")).unwrap_or_default()
        })
        .await;
        // The agent port opens after the CSI socket; wait for it too.
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", n.port)).is_err() {
            assert!(Instant::now() < deadline, "agent of {} did not open", n.id);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        n.child = Some(child);
    }

    pub async fn spawn_controller(&mut self) {
        let _ = std::fs::remove_file(self.controller_socket());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("controller.log"))
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_berth"));
        cmd.arg("controller")
            .arg("--endpoint")
            .arg(self.controller_endpoint())
            .arg("--node-id")
            .arg("controller")
            .arg("--nodes")
            .arg(self.dir.path().join("nodes"))
            .arg("--state-dir")
            .arg(self.controller_state())
            .arg("--tls-dir")
            .arg(self.certs().join("controller"))
            .arg("--metrics-listen")
            .arg(format!("127.0.0.1:{}", self.controller_metrics))
            .env("RUST_LOG", "info,berth=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        match &self.controller_failpoint {
            Some(fp) => cmd.env("BERTH_FAILPOINT", fp),
            None => cmd.env_remove("BERTH_FAILPOINT"),
        };
        let mut child = cmd.spawn().expect("spawn berth controller");
        let (socket, endpoint) = (self.controller_socket(), self.controller_endpoint());
        let logp = self.dir.path().join("controller.log");
        wait_for_socket(&mut child, &socket, &endpoint, || {
            std::fs::read_to_string(&logp).unwrap_or_default()
        })
        .await;
        self.controller = Some(child);
    }

    /// A second controller process over the same nodes, on its own socket: what two
    /// controller replicas are when each believes it leads (two `--nodes` controllers, or
    /// a leader and one whose Lease lapsed). Killed when the returned value is dropped.
    pub async fn second_controller(&self) -> SecondController {
        let dir = self.dir.path().join("controller-2");
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("controller.sock");
        let endpoint = format!("unix://{}", socket.display());
        let logp = dir.join("controller.log");
        let log = std::fs::File::create(&logp).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_berth"))
            .arg("controller")
            .arg("--endpoint")
            .arg(&endpoint)
            .arg("--node-id")
            .arg("controller")
            .arg("--nodes")
            .arg(self.dir.path().join("nodes"))
            // The same placement store: two controllers over one set of records, as two
            // replicas share the API server.
            .arg("--state-dir")
            .arg(self.controller_state())
            .arg("--tls-dir")
            .arg(self.certs().join("controller"))
            .env("RUST_LOG", "info,berth=debug")
            .env_remove("BERTH_FAILPOINT")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn a second berth controller");
        wait_for_socket(&mut child, &socket, &endpoint, || {
            std::fs::read_to_string(&logp).unwrap_or_default()
        })
        .await;
        SecondController {
            child,
            endpoint,
            log: logp,
        }
    }

    pub fn kill_node(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub async fn restart_node(&mut self, i: usize, failpoint: Option<&str>) {
        self.kill_node(i);
        self.nodes[i].failpoint = failpoint.map(str::to_string);
        self.spawn_node(i).await;
    }

    pub fn kill_controller(&mut self) {
        if let Some(mut c) = self.controller.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub async fn restart_controller(&mut self, failpoint: Option<&str>) {
        self.kill_controller();
        self.controller_failpoint = failpoint.map(str::to_string);
        self.spawn_controller().await;
    }

    /// Polls `cond` every 20 ms until it holds; after `within`, fails the test saying
    /// `what` was awaited, with every process's log.
    pub async fn wait_until<F, Fut>(&self, what: &str, within: Duration, mut cond: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + within;
        while !cond().await {
            assert!(
                Instant::now() < deadline,
                "waited {within:?} for {what}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until node `i`'s process has exited by itself (a failpoint fired).
    pub async fn wait_node_exit(&mut self, i: usize, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let child = self.nodes[i].child.as_mut().expect("node running");
            if child.try_wait().unwrap().is_some() {
                self.nodes[i].child = None;
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {} did not exit",
                self.nodes[i].id
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn ctl(&self) -> Ctl {
        csi::controller_client::ControllerClient::new(
            berth::client::connect(&self.controller_endpoint())
                .await
                .unwrap(),
        )
    }

    pub async fn node(&self, i: usize) -> NodeClient<Channel> {
        NodeClient::new(
            berth::client::connect(&self.nodes[i].endpoint())
                .await
                .unwrap(),
        )
    }

    /// An agent client authenticated with the certificate in `tls_dir`.
    pub async fn agent_with(
        &self,
        i: usize,
        tls_dir: Option<&Path>,
    ) -> Result<AgentClient<Channel>, tonic::transport::Error> {
        Ok(AgentClient::new(self.agent_channel_with(i, tls_dir).await?))
    }

    /// A connection to node `i`'s agent port (the agent and the node's CSI Controller)
    /// authenticated with the certificate in `tls_dir`. It checks the chain, not which node
    /// answers: that is the agents' own client's job (berth::agent::channel).
    pub async fn agent_channel_with(
        &self,
        i: usize,
        tls_dir: Option<&Path>,
    ) -> Result<Channel, tonic::transport::Error> {
        let ca = Certificate::from_pem(std::fs::read(self.certs().join("ca.crt")).unwrap());
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(ca)
            .domain_name(berth::tls::AGENT_SERVER_NAME);
        if let Some(d) = tls_dir {
            tls = tls.identity(Identity::from_pem(
                std::fs::read(d.join("tls.crt")).unwrap(),
                std::fs::read(d.join("tls.key")).unwrap(),
            ));
        }
        Endpoint::from_shared(format!("https://127.0.0.1:{}", self.nodes[i].port))
            .unwrap()
            .tls_config(tls)?
            .connect()
            .await
    }

    pub async fn agent(&self, i: usize) -> AgentClient<Channel> {
        self.agent_with(i, Some(&self.certs().join("controller")))
            .await
            .expect("agent connects")
    }

    pub async fn inventory(&self, i: usize) -> pb::InventoryResponse {
        self.agent(i)
            .await
            .inventory(pb::InventoryRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    pub async fn counters(&self, i: usize) -> pb::TransferCounters {
        self.inventory(i).await.counters.unwrap_or_default()
    }

    /// (node index, role) of every copy of `volume_id`.
    pub async fn copies(&self, volume_id: &str) -> Vec<(usize, pb::Role)> {
        let mut out = Vec::new();
        for i in 0..self.nodes.len() {
            for v in self.inventory(i).await.volumes {
                if v.volume_id == volume_id {
                    out.push((i, pb::Role::try_from(v.role).unwrap()));
                }
            }
        }
        out
    }

    pub fn logs(&self) -> String {
        let mut s = format!("--- controller\n{}", self.controller_log());
        for n in &self.nodes {
            s.push_str(&format!("--- {}\n{}", n.id, n.log()));
        }
        s
    }
}

pub struct SecondController {
    child: Child,
    endpoint: String,
    log: PathBuf,
}

impl SecondController {
    pub async fn ctl(&self) -> super::Ctl {
        csi::controller_client::ControllerClient::new(
            berth::client::connect(&self.endpoint).await.unwrap(),
        )
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for SecondController {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        self.kill_controller();
        for i in 0..self.nodes.len() {
            self.kill_node(i);
        }
        for n in &self.nodes {
            cleanup_dir(&n.dir);
        }
    }
}
