//! A berth cluster on one machine: a cluster controller and several node processes, each
//! with its own state dir, pool, CSI socket and agent port on loopback, all with
//! certificates from one `berth certs` CA.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use berth::proto::agent::v1::{self as pb, agent_client::AgentClient};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::{Ctl, cleanup_dir, csi, csi::node_client::NodeClient, require_root};

pub struct NodeProc {
    pub id: String,
    pub dir: PathBuf,
    pub port: u16,
    pub child: Option<Child>,
    pub failpoint: Option<String>,
    /// The network namespace it runs in, if any (see [`TestCluster::start_isolable`]).
    pub netns: Option<Netns>,
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
    /// The address its agent listens on.
    pub fn agent_host(&self) -> String {
        self.netns
            .as_ref()
            .map_or("127.0.0.1".to_string(), |ns| ns.node_addr.to_string())
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

/// A network namespace of one node's own, linked to the host by a veth pair: the node's
/// agent listens on the namespace's end, and the controller, the other nodes and the test
/// reach it through the pair. [`Netns::cut`] is a partition: packets both ways vanish, open
/// connections stay open and say nothing, new ones hang, and the process runs on.
///
/// The namespaced node cannot dial its peers (they listen on the host's loopback, which is
/// not its own), so nothing can be moved or replicated to it: the receiving end pulls. Moves
/// and replication from it work (its peers pull from it).
pub struct Netns {
    pub name: String,
    host_if: String,
    pub node_addr: Ipv4Addr,
}

/// The namespace's end of the pair (its name is the namespace's own).
const NETNS_IF: &str = "berth0";

fn ip(args: &[&str]) -> std::process::Output {
    Command::new("ip").args(args).output().expect("run ip")
}

fn must(what: &str, out: std::process::Output) {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    /// Names and a /30 of 10.0.0.0/8 from the test process's pid and a counter, so that
    /// tests running at once (threads, or other test binaries) never share them.
    pub fn create() -> Netns {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let pid = std::process::id();
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(
            pid < 1 << 15 && k < 1 << 7,
            "pid {pid} or count {k} out of range"
        );
        let net = (10u32 << 24) | (((pid << 7) | k) << 2);
        let (host_addr, node_addr) = (Ipv4Addr::from(net + 1), Ipv4Addr::from(net + 2));
        let ns = Netns {
            name: format!("berth-{pid}-{k}"),
            host_if: format!("bth{pid}h{k}"),
            node_addr,
        };
        // Left by an earlier test process with this pid that was killed before its Drop:
        // that process is gone, so these are no one else's.
        ns.remove();
        must("ip netns add", ip(&["netns", "add", &ns.name]));
        must(
            "ip link add veth",
            ip(&[
                "link",
                "add",
                &ns.host_if,
                "type",
                "veth",
                "peer",
                "name",
                NETNS_IF,
                "netns",
                &ns.name,
            ]),
        );
        let (host_cidr, node_cidr) = (format!("{host_addr}/30"), format!("{node_addr}/30"));
        for (what, args) in [
            (
                "host address",
                vec!["addr", "add", &host_cidr, "dev", &ns.host_if],
            ),
            ("host link up", vec!["link", "set", &ns.host_if, "up"]),
            (
                "node address",
                vec!["-n", &ns.name, "addr", "add", &node_cidr, "dev", NETNS_IF],
            ),
            (
                "node link up",
                vec!["-n", &ns.name, "link", "set", NETNS_IF, "up"],
            ),
            (
                "node loopback up",
                vec!["-n", &ns.name, "link", "set", "lo", "up"],
            ),
        ] {
            must(what, ip(&args));
        }
        ns
    }

    /// Drops every packet both ways (a `blackhole` qdisc on both ends of the pair; the
    /// host has no iptables, and tc's classifiers and netem are not built in).
    pub fn cut(&self) {
        for (what, args) in [
            (
                "cut host end",
                vec![
                    "qdisc",
                    "replace",
                    "dev",
                    &self.host_if,
                    "root",
                    "blackhole",
                ],
            ),
            (
                "cut node end",
                vec![
                    "-n",
                    &self.name,
                    "qdisc",
                    "replace",
                    "dev",
                    NETNS_IF,
                    "root",
                    "blackhole",
                ],
            ),
        ] {
            must(
                what,
                Command::new("tc").args(args).output().expect("run tc"),
            );
        }
    }

    /// Undoes [`Netns::cut`]: what was sent meanwhile is retransmitted, as after a partition.
    pub fn reconnect(&self) {
        for (what, args) in [
            (
                "reconnect host end",
                vec!["qdisc", "del", "dev", &self.host_if, "root"],
            ),
            (
                "reconnect node end",
                vec!["-n", &self.name, "qdisc", "del", "dev", NETNS_IF, "root"],
            ),
        ] {
            must(
                what,
                Command::new("tc").args(args).output().expect("run tc"),
            );
        }
    }

    /// Deleting one end of a veth pair deletes both.
    fn remove(&self) {
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.remove();
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
        TestCluster::start_with(n, proxied, &[]).await
    }

    /// As [`TestCluster::start`], with the nodes at `isolable` each in a network namespace
    /// of its own (a [`Netns`]), so that [`TestCluster::isolate_node`] can cut it off.
    pub async fn start_isolable(n: usize, isolable: &[usize]) -> TestCluster {
        TestCluster::start_with(n, &[], isolable).await
    }

    async fn start_with(n: usize, proxied: &[usize], isolable: &[usize]) -> TestCluster {
        require_root();
        // A proxy dials its node on loopback, which a namespaced node does not listen on.
        assert!(proxied.iter().all(|i| !isolable.contains(i)));
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
                netns: None,
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
        for &i in isolable {
            c.nodes[i].netns = Some(Netns::create());
        }
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
                format!("{} {}:{port}\n", n.id, n.agent_host())
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

    /// Starts node `i`; a node with a network namespace runs inside it, its agent on the
    /// namespace's end of the veth pair.
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
        let mut cmd = match &n.netns {
            None => Command::new(env!("CARGO_BIN_EXE_berth")),
            // nsenter enters the network namespace only and execs berth (the child is
            // berth itself, for signals); `ip netns exec` would also give it a mount
            // namespace of its own, where its mounts would be out of the test's sight.
            Some(ns) => {
                let mut cmd = Command::new("nsenter");
                cmd.arg(format!("--net=/run/netns/{}", ns.name))
                    .arg("--")
                    .arg(env!("CARGO_BIN_EXE_berth"));
                cmd
            }
        };
        let host = n.agent_host();
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
            .arg(format!("{host}:{}", n.port))
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
        while std::net::TcpStream::connect((host.as_str(), n.port)).is_err() {
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
        self.second_controller_with(&[]).await
    }

    /// [`TestCluster::second_controller`] with extra arguments.
    pub async fn second_controller_with(&self, args: &[&str]) -> SecondController {
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
            .args(args)
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
        let n = &self.nodes[i];
        Endpoint::from_shared(format!("https://{}:{}", n.agent_host(), n.port))
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

    fn signal_node(&self, i: usize, signal: Signal) {
        let child = self.nodes[i].child.as_ref().expect("node running");
        kill(Pid::from_raw(child.id() as i32), signal).unwrap();
    }

    /// Freezes node `i` (SIGSTOP): its kernel still accepts connections to its agent, and
    /// nothing answers on them.
    pub fn stop_node(&self, i: usize) {
        self.signal_node(i, Signal::SIGSTOP);
    }

    /// Thaws node `i` (SIGCONT); it answers what was asked meanwhile.
    pub fn cont_node(&self, i: usize) {
        self.signal_node(i, Signal::SIGCONT);
    }

    /// Cuts node `i` off the network (see [`Netns::cut`]); it must have been started in a
    /// namespace ([`TestCluster::start_isolable`]).
    pub fn isolate_node(&self, i: usize) {
        self.nodes[i]
            .netns
            .as_ref()
            .expect("a namespaced node")
            .cut();
    }

    /// Undoes [`TestCluster::isolate_node`].
    pub fn reconnect_node(&self, i: usize) {
        self.nodes[i]
            .netns
            .as_ref()
            .expect("a namespaced node")
            .reconnect();
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
