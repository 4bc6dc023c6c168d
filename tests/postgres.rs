//! PostgreSQL end to end: a real server (the Debian package) on a replicated berth volume,
//! a pgbench run while replication ships snapshots of the live filesystem, then a clean
//! stop, a move to another node and a start there. Every transaction pgbench reported
//! committed must be on the new node, the balances must add up, and `pg_amcheck` must find
//! nothing.
//!
//! Needs root, loop devices and PostgreSQL (`apt-get install postgresql`); fails loudly,
//! never skips, when the machine lacks them.

mod common;

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use berth::proto::agent::v1 as pb;
use common::{cluster::TestCluster, *};
use tokio::process::Command;

const VOL: i64 = 2 * GIB;
const SCALE: u32 = 10;
const BENCH_SECONDS: u32 = 10;

/// One pgbench transaction: the standard TPC-B-like updates plus one ledger row, so that
/// what committed can be counted afterwards. Every balance starts at 0 and each
/// transaction adds the same delta to one account, teller and branch, so after any number
/// of committed transactions sum(abalance) = sum(tbalance) = sum(bbalance) = sum(ledger.v).
const SCRIPT: &str = r"\set aid random(1, 100000 * :scale)
\set bid random(1, 1 * :scale)
\set tid random(1, 10 * :scale)
\set delta random(-5000, 5000)
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE bid = :bid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);
INSERT INTO ledger (client, v) VALUES (:client_id, :delta);
END;
";

/// The ledger names the client of each row: one client's transactions run one after the
/// other, so the rows a copy holds of each client are a prefix of what it committed, and
/// they can be matched against pgbench's per-transaction log.
const LEDGER_TABLE: &str =
    "CREATE TABLE ledger (id bigserial PRIMARY KEY, client int NOT NULL, v int NOT NULL)";

/// The newest PostgreSQL under /usr/lib/postgresql with every tool this test runs.
fn pg_bin() -> PathBuf {
    const TOOLS: [&str; 5] = ["initdb", "pg_ctl", "psql", "pgbench", "pg_amcheck"];
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            TOOLS
                .iter()
                .all(|t| bin.join(t).is_file())
                .then_some((major, bin))
        })
        .collect();
    found.sort();
    let bin = found.pop().map(|(_, b)| b);
    let bin = bin.unwrap_or_else(|| {
        panic!(
            "PostgreSQL 14 or newer is not installed (no /usr/lib/postgresql/*/bin with {TOOLS:?}): \
             apt-get install postgresql (CI installs it)"
        )
    });
    assert!(
        nix::unistd::User::from_name("postgres")
            .ok()
            .flatten()
            .is_some(),
        "no `postgres` OS user: apt-get install postgresql (CI installs it)"
    );
    bin
}

fn postgres_ids() -> (nix::unistd::Uid, nix::unistd::Gid) {
    let u = nix::unistd::User::from_name("postgres")
        .unwrap()
        .expect("postgres user");
    (u.uid, u.gid)
}

fn chown_postgres(p: &Path) {
    let (uid, gid) = postgres_ids();
    nix::unistd::chown(p, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown postgres {}: {e}", p.display()));
}

/// The harness's directories are 0700 root (tempfile); the server runs as `postgres` and
/// must traverse them to reach its data directory on the mounted volume.
fn let_postgres_traverse(target: &Path, upto: &Path) {
    for dir in target
        .ancestors()
        .skip(1)
        .take_while(|d| d.starts_with(upto))
    {
        let mut perm = std::fs::metadata(dir).unwrap().permissions();
        perm.set_mode(perm.mode() | 0o011);
        std::fs::set_permissions(dir, perm).unwrap();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs `cmd` to completion within `within`; panics with its output unless it exits 0.
async fn run(what: &str, cmd: &mut Command, within: Duration) -> String {
    cmd.env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(within, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {within:?}"))
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A PostgreSQL server this test runs as the `postgres` user on a data directory on a
/// berth volume; stopped (immediately) when dropped if the test did not stop it, so a
/// failing test never leaves a server holding the mount the harness must remove.
struct Server {
    bin: PathBuf,
    data: PathBuf,
    /// Owned by `postgres`: server logs and the pgbench script.
    work: PathBuf,
    port: u16,
    running: bool,
}

impl Server {
    fn as_postgres(&self, tool: &str) -> Command {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"])
            .arg(self.bin.join(tool))
            .current_dir(&self.work);
        c
    }

    /// A client tool, as root over TCP (trust authentication as `postgres`).
    fn client(&self, tool: &str) -> Command {
        let mut c = Command::new(self.bin.join(tool));
        c.env("PGHOST", "127.0.0.1")
            .env("PGPORT", self.port.to_string())
            .env("PGUSER", "postgres")
            .env("PGDATABASE", "postgres")
            .env("PGCONNECT_TIMEOUT", "10")
            .current_dir(&self.work);
        c
    }

    fn log_path(&self, node: &str) -> PathBuf {
        self.work.join(format!("postgres-{node}.log"))
    }

    async fn initdb(&self) {
        run(
            "initdb",
            self.as_postgres("initdb").arg("-D").arg(&self.data).args([
                "--auth=trust",
                "--username=postgres",
                "--encoding=UTF8",
                "--locale=C",
                // Checksums make a torn or stale page an error on read, not a quiet
                // wrong answer.
                "--data-checksums",
                "--no-instructions",
            ]),
            Duration::from_secs(60),
        )
        .await;
        let conf = format!(
            "\n# berth test\nlisten_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = ''\n\
             max_wal_size = '512MB'\nfsync = on\nfull_page_writes = on\n",
            self.port
        );
        let path = self.data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(&conf);
        std::fs::write(&path, text).unwrap();
    }

    async fn start(&mut self, node: &str) {
        let log = self.log_path(node);
        self.running = true;
        run(
            &format!("pg_ctl start on {node}"),
            self.as_postgres("pg_ctl")
                .arg("-D")
                .arg(&self.data)
                .arg("-l")
                .arg(&log)
                .args(["-w", "-t", "60", "start"]),
            Duration::from_secs(90),
        )
        .await;
    }

    async fn stop_fast(&mut self) {
        run(
            "pg_ctl stop -m fast",
            self.as_postgres("pg_ctl")
                .arg("-D")
                .arg(&self.data)
                .args(["-w", "-t", "60", "-m", "fast", "stop"]),
            Duration::from_secs(90),
        )
        .await;
        self.running = false;
    }

    async fn sql(&self, sql: &str) -> String {
        run(
            &format!("psql -c {sql:?}"),
            self.client("psql")
                .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql]),
            Duration::from_secs(60),
        )
        .await
        .trim()
        .to_string()
    }

    /// The figures that must be the same before and after the move.
    async fn ledger(&self) -> Ledger {
        let row = self
            .sql(
                "SELECT (SELECT count(*) FROM ledger), \
                        (SELECT coalesce(sum(v), 0) FROM ledger), \
                        (SELECT count(*) FROM pgbench_history), \
                        (SELECT sum(abalance) FROM pgbench_accounts), \
                        (SELECT sum(tbalance) FROM pgbench_tellers), \
                        (SELECT sum(bbalance) FROM pgbench_branches)",
            )
            .await;
        let f: Vec<i64> = row
            .split('|')
            .map(|x| {
                x.parse()
                    .unwrap_or_else(|e| panic!("ledger row {row:?}: {e}"))
            })
            .collect();
        assert_eq!(f.len(), 6, "ledger row {row:?}");
        Ledger {
            rows: f[0],
            sum_v: f[1],
            history: f[2],
            accounts: f[3],
            tellers: f[4],
            branches: f[5],
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.running {
            let _ = std::process::Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(self.bin.join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .args(["-w", "-t", "30", "-m", "immediate", "stop"])
                .current_dir(&self.work)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ledger {
    rows: i64,
    sum_v: i64,
    history: i64,
    accounts: i64,
    tellers: i64,
    branches: i64,
}

impl Ledger {
    /// Each committed transaction moved the same delta through every table.
    fn assert_balanced(&self, when: &str) {
        assert_eq!(
            self.history, self.rows,
            "{when}: history vs ledger {self:?}"
        );
        for (what, sum) in [
            ("accounts", self.accounts),
            ("tellers", self.tellers),
            ("branches", self.branches),
        ] {
            assert_eq!(sum, self.sum_v, "{when}: {what} balance vs ledger {self:?}");
        }
    }
}

/// "number of transactions actually processed: N" (pgbench counts committed ones only).
fn processed(out: &str) -> i64 {
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed:"))
        .unwrap_or_else(|| panic!("no transaction count in pgbench's output:\n{out}"));
    line.trim()
        .split('/')
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("pgbench count {line:?}: {e}"))
}

fn ctl_publish(volume_id: &str, node: &str) -> csi::ControllerPublishVolumeRequest {
    csi::ControllerPublishVolumeRequest {
        volume_id: volume_id.into(),
        node_id: node.into(),
        volume_capability: Some(mount_cap("ext4")),
        readonly: false,
        ..Default::default()
    }
}

/// Retries a controller call the spec lets fail with ABORTED while another operation on
/// the volume (here: a replication round) is in flight, as a CO would.
async fn retry_aborted<T, F, Fut>(what: &str, c: &TestCluster, mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut aborted = 0;
    loop {
        match call().await {
            Ok(r) => {
                if aborted > 0 {
                    eprintln!("{what}: ABORTED {aborted} time(s) before it went through");
                }
                return r.into_inner();
            }
            Err(s) if s.code() == tonic::Code::Aborted && Instant::now() < deadline => {
                aborted += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => panic!("{what}: {s:?}\n{}", c.logs()),
        }
    }
}

async fn create_mount(c: &TestCluster, name: &str, on: usize, params: &[(&str, &str)]) -> String {
    let mut req = create_req(name, VOL, mount_cap("ext4"));
    req.parameters = common::params(params);
    req.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![],
        preferred: vec![csi::Topology {
            segments: [(
                "topology.berth.csi.dev/node".to_string(),
                c.nodes[on].id.clone(),
            )]
            .into(),
        }],
    });
    create_volume(&c.ctl().await, req).await.volume_id
}

/// Publishes a filesystem volume on node `i` as the CO would; returns the target path.
async fn attach(c: &TestCluster, i: usize, vol: &str) -> PathBuf {
    let node = c.nodes[i].id.clone();
    let ctl = c.ctl().await;
    retry_aborted(&format!("ControllerPublish on {node}"), c, || {
        let (mut ctl, req) = (ctl.clone(), ctl_publish(vol, &node));
        async move { ctl.controller_publish_volume(req).await }
    })
    .await;
    let staging = c.nodes[i].path(&format!("{vol}/staging"));
    let target = c.nodes[i].path(&format!("{vol}/target"));
    let mut n = c.node(i).await;
    n.node_stage_volume(stage_req(vol, &staging, mount_cap("ext4")))
        .await
        .unwrap_or_else(|e| panic!("NodeStage on {node}: {e:?}\n{}", c.logs()));
    n.node_publish_volume(publish_req(
        vol,
        &staging,
        &target,
        mount_cap("ext4"),
        false,
    ))
    .await
    .unwrap_or_else(|e| panic!("NodePublish on {node}: {e:?}\n{}", c.logs()));
    assert!(is_mounted(&target), "{} is not a mount", target.display());
    target
}

async fn detach(c: &TestCluster, i: usize, vol: &str) {
    let node = c.nodes[i].id.clone();
    let staging = c.nodes[i].path(&format!("{vol}/staging"));
    let target = c.nodes[i].path(&format!("{vol}/target"));
    let mut n = c.node(i).await;
    n.node_unpublish_volume(unpublish_req(vol, &target))
        .await
        .unwrap_or_else(|e| panic!("NodeUnpublish on {node}: {e:?}\n{}", c.logs()));
    n.node_unstage_volume(unstage_req(vol, &staging))
        .await
        .unwrap_or_else(|e| panic!("NodeUnstage on {node}: {e:?}\n{}", c.logs()));
    let ctl = c.ctl().await;
    retry_aborted(&format!("ControllerUnpublish on {node}"), c, || {
        let mut ctl = ctl.clone();
        let req = csi::ControllerUnpublishVolumeRequest {
            volume_id: vol.into(),
            node_id: node.clone(),
            ..Default::default()
        };
        async move { ctl.controller_unpublish_volume(req).await }
    })
    .await;
}

/// Nodes other than A (index 0) that hold a replica of `vol`.
async fn replica_holders(c: &TestCluster, vol: &str) -> Vec<usize> {
    c.copies(vol)
        .await
        .into_iter()
        .filter(|(i, r)| *i != 0 && *r == pb::Role::Replica)
        .map(|(i, _)| i)
        .collect()
}

async fn condition_message(c: &TestCluster, vol: &str) -> String {
    get_volume(&c.ctl().await, vol)
        .await
        .status
        .and_then(|s| s.volume_condition)
        .map(|c| c.message)
        .unwrap_or_default()
}

/// A directory owned by `postgres` for the server's logs, holding the pgbench script.
fn work_dir() -> tempfile::TempDir {
    let work = tempfile::Builder::new()
        .prefix("berth-pg-")
        .tempdir()
        .unwrap();
    chown_postgres(work.path());
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(work.path().join("ledger.sql"), SCRIPT).unwrap();
    work
}

/// Publishes `vol` on A (node 0), and runs there a fresh PostgreSQL with pgbench's tables
/// (`pgbench -i`) and an empty ledger.
async fn postgres_on_a(c: &TestCluster, vol: &str, bin: PathBuf, work: &Path) -> Server {
    let target_a = attach(c, 0, vol).await;
    let_postgres_traverse(&target_a, c.dir.path());
    let data_a = target_a.join("pgdata");
    std::fs::create_dir(&data_a).unwrap();
    chown_postgres(&data_a);
    std::fs::set_permissions(&data_a, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut pg = Server {
        bin,
        data: data_a,
        work: work.to_path_buf(),
        port: free_port(),
        running: false,
    };
    pg.initdb().await;
    pg.start("node-a").await;
    run(
        "pgbench -i",
        pg.client("pgbench")
            .args(["-i", "-q", "-s", &SCALE.to_string()]),
        Duration::from_secs(120),
    )
    .await;
    pg.sql(LEDGER_TABLE).await;
    let start = pg.ledger().await;
    assert_eq!(start.rows, 0);
    start.assert_balanced("after pgbench -i");
    pg
}

/// Issue: initdb on a berth volume on A, `pgbench -i` then a pgbench run while
/// replication runs; stop PostgreSQL, unpublish, publish on B, start PostgreSQL there;
/// every transaction pgbench reported committed is present; pg_amcheck finds nothing.
#[tokio::test(flavor = "multi_thread")]
async fn postgres_survives_a_move_with_every_committed_transaction() {
    let bin = pg_bin();
    let t0 = Instant::now();
    let c = TestCluster::start(3).await;
    let work = work_dir();
    let script = work.path().join("ledger.sql");

    let vol = create_mount(
        &c,
        "pvc-postgres",
        0,
        &[("replicas", "2"), ("replicationInterval", "1s")],
    )
    .await;
    assert_eq!(c.copies(&vol).await[0], (0, pb::Role::Primary));

    // ---- A: initdb, pgbench -i, pgbench while replication ships snapshots --------------
    // Declared after the cluster, so dropped (server stopped) before the harness unmounts.
    let mut pg = postgres_on_a(&c, &vol, bin, work.path()).await;
    eprintln!("[{:?}] pgbench -i -s {SCALE} done", t0.elapsed());

    let mut bench = pg.client("pgbench");
    bench
        .args([
            "-n",
            "-c",
            "4",
            "-j",
            "2",
            "-T",
            &BENCH_SECONDS.to_string(),
            "-f",
        ])
        .arg(&script);
    let bench = tokio::spawn(async move {
        run(
            "pgbench run",
            &mut bench,
            Duration::from_secs(BENCH_SECONDS as u64 + 60),
        )
        .await
    });
    let mut seen_during: Vec<usize> = Vec::new();
    let mut received_at_sighting = 0;
    let mut message = String::new();
    while !bench.is_finished() {
        let holders = replica_holders(&c, &vol).await;
        if !holders.is_empty() && seen_during.is_empty() {
            seen_during = holders;
            received_at_sighting = c.counters(seen_during[0]).await.received_data_bytes;
            message = condition_message(&c, &vol).await;
            eprintln!(
                "[{:?}] replica on {:?} during pgbench: {message:?}",
                t0.elapsed(),
                seen_during
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let out = bench.await.unwrap();
    let committed = processed(&out);
    if let Some(failed) = out
        .lines()
        .find_map(|l| l.strip_prefix("number of failed transactions:"))
    {
        assert!(
            failed.trim().starts_with("0 "),
            "pgbench failed transactions: {failed}\n{out}"
        );
    }
    assert!(committed > 0, "pgbench committed nothing:\n{out}");
    eprintln!("[{:?}] pgbench committed {committed}", t0.elapsed());
    assert!(
        !seen_during.is_empty(),
        "no replica of {vol} reached another node during {BENCH_SECONDS}s of pgbench \
         (replicas=2, replicationInterval=1s): copies {:?}\n{}",
        c.copies(&vol).await,
        c.logs()
    );
    // The replica kept being refreshed while pgbench wrote, not only shipped once.
    let refreshed = c.counters(seen_during[0]).await.received_data_bytes - received_at_sighting;
    assert!(
        refreshed > 0,
        "no replication round reached node {} while pgbench ran\n{}",
        c.nodes[seen_during[0]].id,
        c.logs()
    );
    assert!(
        message.contains("replicas:"),
        "ControllerGetVolume's volume_condition.message lacks the replica report: {message:?}"
    );

    let before = pg.ledger().await;
    before.assert_balanced("on A after pgbench");
    assert_eq!(
        before.rows, committed,
        "on A: ledger rows vs transactions pgbench reported committed"
    );

    // ---- the move: stop on A, unpublish, publish on B ----------------------------------
    pg.stop_fast().await;
    detach(&c, 0, &vol).await;
    let holders = replica_holders(&c, &vol).await;
    let b = holders.first().copied().unwrap_or(1);
    let node_b = c.nodes[b].id.clone();
    let received_before = c.counters(b).await.received_data_bytes;
    let moved_at = Instant::now();
    let target_b = attach(&c, b, &vol).await;
    let shipped = c.counters(b).await.received_data_bytes - received_before;
    eprintln!(
        "[{:?}] moved to {node_b} in {:?}, {shipped} bytes on the wire",
        t0.elapsed(),
        moved_at.elapsed()
    );
    let copies = c.copies(&vol).await;
    assert!(copies.contains(&(b, pb::Role::Primary)), "{copies:?}");

    let_postgres_traverse(&target_b, c.dir.path());
    let data_b = target_b.join("pgdata");
    let (uid, _) = postgres_ids();
    let meta = std::fs::metadata(&data_b)
        .unwrap_or_else(|e| panic!("{} on {node_b}: {e}", data_b.display()));
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&meta),
        uid.as_raw(),
        "ownership moved with the data"
    );
    pg.data = data_b;
    pg.start(&node_b).await;
    let log_b = std::fs::read_to_string(pg.log_path(&node_b)).unwrap_or_default();
    assert!(
        !log_b.contains("not properly shut down") && !log_b.contains("redo starts"),
        "PostgreSQL on {node_b} ran crash recovery: the move did not carry the clean \
         shutdown from A:\n{log_b}"
    );

    let after = pg.ledger().await;
    assert!(
        after.rows >= committed,
        "on {node_b}: {} ledger rows, but pgbench reported {committed} committed",
        after.rows
    );
    assert_eq!(after, before, "on {node_b}: the database differs from A's");
    after.assert_balanced(&format!("on {node_b}"));

    let amcheck = run(
        "pg_amcheck",
        pg.client("pg_amcheck")
            .args(["--all", "--heapallindexed", "--install-missing"]),
        Duration::from_secs(120),
    )
    .await;
    assert!(
        amcheck.trim().is_empty(),
        "pg_amcheck reported on {node_b}:\n{amcheck}"
    );
    eprintln!("[{:?}] pg_amcheck clean on {node_b}", t0.elapsed());

    // ---- tidy up ---------------------------------------------------------------------
    pg.stop_fast().await;
    detach(&c, b, &vol).await;
    let ctl = c.ctl().await;
    retry_aborted("DeleteVolume", &c, || {
        let (mut ctl, req) = (ctl.clone(), delete_volume_req(&vol));
        async move { ctl.delete_volume(req).await }
    })
    .await;
    assert_eq!(c.copies(&vol).await, vec![], "every copy deleted");
    eprintln!("[{:?}] done", t0.elapsed());
}

// ---- failover: the node dies under pgbench --------------------------------------------

const FAILOVER_INTERVAL_SECONDS: i64 = 2;
/// How late a due replication round may start: the controller looks every second, at
/// the nodes' inventories, which it polls every second.
const ROUND_SCHEDULING_SLACK_NANOS: i64 = 2_000_000_000;
/// What may separate a snapshot's recorded time (taken once its reflink is done) from the
/// instant the reflink froze the image, and a client's acknowledgement from its commit
/// record's write: the record's RFC 3339 time counts whole seconds, so a second.
const CUT_TOLERANCE_NANOS: i64 = 1_000_000_000;

fn unix_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

fn secs(nanos: i64) -> String {
    format!("{:.3} s", nanos as f64 / 1e9)
}

fn record_of(c: &TestCluster, vol: &str) -> berth::placement::VolumePlacement {
    let path = c
        .controller_state()
        .join("placement")
        .join(format!("{vol}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    serde_json::from_value(v["record"].clone()).unwrap()
}

/// The shipping snapshots of `vol` node `i` holds: (id, when cut, unix nanoseconds), to
/// the nanosecond, where the placement record has whole seconds.
fn shipping_cuts(c: &TestCluster, i: usize, vol: &str) -> Vec<(String, i64)> {
    let dir = c.nodes[i].pool_root().join("berth/snapshots");
    let mut out: Vec<(String, i64)> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let text = std::fs::read_to_string(e.path()).ok()?;
            let v: serde_json::Value = serde_json::from_str(&text).ok()?;
            if v["source_volume"] != vol || v["shipping"] != true || v["state"] != "ready" {
                return None;
            }
            Some((
                v["id"].as_str()?.to_string(),
                v["created_unix_nanos"].as_i64()?,
            ))
        })
        .collect();
    out.sort_by_key(|s| s.1);
    out
}

/// What pgbench's per-transaction log (`--log`, one file per thread) says each client saw
/// committed: the completion time (unix nanoseconds) of each of its transactions, in
/// order. A failed transaction's line has a word where its latency would be.
fn committed_by_client(dir: &Path) -> std::collections::BTreeMap<i64, Vec<i64>> {
    let mut by: std::collections::BTreeMap<i64, Vec<(i64, i64)>> = Default::default();
    for e in std::fs::read_dir(dir).unwrap() {
        let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            assert!(f.len() >= 6, "pgbench log line {line:?}");
            if f[2].parse::<i64>().is_err() {
                continue;
            }
            let n = |i: usize| -> i64 {
                f[i].parse()
                    .unwrap_or_else(|e| panic!("pgbench log line {line:?}: {e}"))
            };
            by.entry(n(0))
                .or_default()
                .push((n(1), n(4) * 1_000_000_000 + n(5) * 1_000));
        }
    }
    by.into_iter()
        .map(|(client, mut txs)| {
            txs.sort();
            (client, txs.into_iter().map(|t| t.1).collect())
        })
        .collect()
}

/// The processes whose parent is `pid` (a postmaster's backends).
fn children_of(pid: i32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let child: i32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // "pid (comm) state ppid …": the command may hold spaces and parentheses.
            let ppid: i32 = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            (ppid == pid).then_some(child)
        })
        .collect()
}

/// Whether `pid` runs (a zombie does not).
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| Some(s.rsplit_once(')')?.1.split_whitespace().next()? != "Z"))
        .unwrap_or(false)
}

/// ControllerPublish + NodeStage + NodePublish on node `i`, retried while a CO would
/// (UNAVAILABLE while the failover is not done yet, ABORTED while another operation on
/// the volume runs). Returns the target path.
async fn attach_after_failover(c: &TestCluster, i: usize, vol: &str) -> PathBuf {
    let node = c.nodes[i].id.clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    let retry = |e: &tonic::Status| {
        matches!(e.code(), tonic::Code::Unavailable | tonic::Code::Aborted)
            && Instant::now() < deadline
    };
    loop {
        match c
            .ctl()
            .await
            .controller_publish_volume(ctl_publish(vol, &node))
            .await
        {
            Ok(_) => break,
            Err(e) if retry(&e) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("ControllerPublish on {node}: {e:?}\n{}", c.logs()),
        }
    }
    let staging = c.nodes[i].path(&format!("{vol}/staging"));
    let target = c.nodes[i].path(&format!("{vol}/target"));
    let mut n = c.node(i).await;
    loop {
        match n
            .node_stage_volume(stage_req(vol, &staging, mount_cap("ext4")))
            .await
        {
            Ok(_) => break,
            Err(e) if retry(&e) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("NodeStage on {node}: {e:?}\n{}", c.logs()),
        }
    }
    n.node_publish_volume(publish_req(
        vol,
        &staging,
        &target,
        mount_cap("ext4"),
        false,
    ))
    .await
    .unwrap_or_else(|e| panic!("NodePublish on {node}: {e:?}\n{}", c.logs()));
    target
}

/// Issue 13: pgbench on a replicated volume (replicationInterval 2s) on A; A's berth
/// process is killed (SIGKILL) while pgbench runs. The host lives on, so the fence is
/// what stops PostgreSQL there (its first I/O error is timed); what still runs is killed
/// as a host crash would. The volume fails over to B, PostgreSQL starts there through
/// crash recovery, pg_amcheck finds nothing, the balances add up, and every transaction a
/// client saw committed that B lacks was committed after the snapshot B was promoted
/// from: the loss is bounded by the replication schedule, and counted.
#[tokio::test(flavor = "multi_thread")]
async fn postgres_fails_over_when_its_node_dies_losing_only_the_last_interval() {
    let bin = pg_bin();
    let t0 = Instant::now();
    let mut c = TestCluster::start(2).await;
    let work = work_dir();
    let script = work.path().join("ledger.sql");
    let tx_logs = work.path().join("txlog");
    std::fs::create_dir(&tx_logs).unwrap();
    let interval = format!("{FAILOVER_INTERVAL_SECONDS}s");
    let vol = create_mount(
        &c,
        "pvc-postgres-failover",
        0,
        &[("replicas", "2"), ("replicationInterval", &interval)],
    )
    .await;
    let mut pg = postgres_on_a(&c, &vol, bin, work.path()).await;
    let postmaster: i32 = std::fs::read_to_string(pg.data.join("postmaster.pid"))
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    eprintln!("[{:?}] pgbench -i -s {SCALE} done on A", t0.elapsed());

    // pgbench runs until the server under it dies; each client's transactions are logged
    // with the time the client saw each commit.
    let mut bench = pg.client("pgbench");
    bench
        .args(["-n", "-c", "4", "-j", "2", "-T", "300", "--log"])
        .arg(format!("--log-prefix={}", tx_logs.join("tx").display()))
        .arg("-f")
        .arg(&script)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let bench = bench.spawn().unwrap();

    // Replication rounds while pgbench writes: how long each took, from its cut to the
    // record naming it.
    let mut rounds: Vec<(String, i64)> = Vec::new();
    let watch_until = Instant::now() + Duration::from_secs(60);
    while rounds.len() < 4 {
        assert!(
            Instant::now() < watch_until,
            "fewer than 4 replication rounds in 60 s of pgbench: {rounds:?}\n{}",
            c.logs()
        );
        let newest = record_of(&c, &vol)
            .replicas
            .first()
            .map(|r| r.snapshot.clone())
            .unwrap_or_default();
        if !newest.is_empty() && rounds.last().is_none_or(|r| r.0 != newest) {
            let seen = unix_nanos();
            let cut = shipping_cuts(&c, 0, &vol)
                .into_iter()
                .find(|s| s.0 == newest)
                .map(|s| s.1);
            if let Some(cut) = cut {
                rounds.push((newest, seen - cut));
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The first round shipped the whole volume; the rest are what a round under pgbench
    // costs.
    let round_max = rounds[1..].iter().map(|r| r.1).max().unwrap();
    eprintln!(
        "[{:?}] rounds under pgbench took (cut to recorded) {:?}",
        t0.elapsed(),
        rounds.iter().map(|r| secs(r.1)).collect::<Vec<_>>()
    );

    // ---- A dies ------------------------------------------------------------------------
    let log_a = pg.log_path("node-a");
    let log_len = std::fs::metadata(&log_a).map(|m| m.len()).unwrap_or(0) as usize;
    c.kill_node(0);
    let killed = Instant::now();
    let killed_unix = unix_nanos();
    // Until PostgreSQL on A reports an I/O error and its postmaster exits, or 15 s.
    let mut first_error: Option<(Duration, String)> = None;
    let mut died_at: Option<Duration> = None;
    while killed.elapsed() < Duration::from_secs(15) {
        if first_error.is_none() {
            let text = std::fs::read_to_string(&log_a).unwrap_or_default();
            first_error = text.get(log_len..).and_then(|new| {
                new.lines()
                    .find(|l| {
                        ["PANIC", "ERROR", "FATAL", "could not"]
                            .iter()
                            .any(|w| l.contains(w))
                    })
                    .map(|l| (killed.elapsed(), l.to_string()))
            });
        }
        if died_at.is_none() && !running(postmaster) {
            died_at = Some(killed.elapsed());
        }
        if first_error.is_some() && died_at.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // What still runs of that server is killed, as a crash of the host would.
    let leftover: Vec<i32> = std::iter::once(postmaster)
        .chain(children_of(postmaster))
        .filter(|p| running(*p))
        .collect();
    for p in &leftover {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*p),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    pg.running = false;
    let (error_after, error_line) = first_error.clone().unwrap_or_else(|| {
        panic!(
            "PostgreSQL on A reported no error within 15 s of the kill: A did not fence\n{}",
            std::fs::read_to_string(&log_a).unwrap_or_default()
        )
    });
    eprintln!(
        "[{:?}] killed A's berth; PostgreSQL's first error {error_after:?} after: {error_line:?}; \
         postmaster {}; SIGKILLed {leftover:?}",
        t0.elapsed(),
        died_at.map_or(
            "still running at the end of the watch".to_string(),
            |d| format!("exited by itself {d:?} after")
        ),
    );
    assert!(
        error_after <= Duration::from_secs(8),
        "the fence (fence-after 6 s) stops PostgreSQL's writes: first error {error_after:?} after the kill"
    );
    let out = tokio::time::timeout(Duration::from_secs(60), bench.wait_with_output())
        .await
        .expect("pgbench ends once its server is gone")
        .unwrap();
    let committed = committed_by_client(&tx_logs);
    let total: usize = committed.values().map(Vec::len).sum();
    assert!(
        total > 0,
        "pgbench logged no committed transaction:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let last_commit = committed
        .values()
        .filter_map(|t| t.last())
        .max()
        .copied()
        .unwrap();

    // ---- the failover ------------------------------------------------------------------
    let deadline = Instant::now() + Duration::from_secs(40);
    let failover = loop {
        if let Some(f) = record_of(&c, &vol).failover {
            break f;
        }
        assert!(
            Instant::now() < deadline,
            "no failover within 40 s of the kill\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let failed_over = killed.elapsed();
    assert_eq!(failover.from, c.nodes[0].id);
    let target_b = attach_after_failover(&c, 1, &vol).await;
    let attached = killed.elapsed();
    let cuts = shipping_cuts(&c, 0, &vol);
    let cut = cuts
        .iter()
        .find(|s| s.0 == failover.snapshot)
        .map(|s| s.1)
        .unwrap_or_else(|| panic!("A lacks snapshot {} {cuts:?}", failover.snapshot));
    let recorded: k8s_openapi::jiff::Timestamp = failover.snapshot_time.parse().unwrap();
    assert_eq!(
        recorded.as_second(),
        cut / 1_000_000_000,
        "the record's snapshotTime is the snapshot's cut"
    );

    // ---- B: crash recovery, checks -----------------------------------------------------
    let_postgres_traverse(&target_b, c.dir.path());
    pg.data = target_b.join("pgdata");
    pg.start("node-b").await;
    let serving = killed.elapsed();
    let log_b = std::fs::read_to_string(pg.log_path("node-b")).unwrap_or_default();
    assert!(
        log_b.contains("not properly shut down") || log_b.contains("was interrupted"),
        "PostgreSQL on B did not run crash recovery:\n{log_b}"
    );
    let amcheck = run(
        "pg_amcheck",
        pg.client("pg_amcheck")
            .args(["--all", "--heapallindexed", "--install-missing"]),
        Duration::from_secs(120),
    )
    .await;
    assert!(
        amcheck.trim().is_empty(),
        "pg_amcheck reported on B:\n{amcheck}"
    );
    let after = pg.ledger().await;
    after.assert_balanced("on B after the failover");
    let present: std::collections::BTreeMap<i64, usize> = pg
        .sql("SELECT client, count(*) FROM ledger GROUP BY client")
        .await
        .lines()
        .map(|l| {
            let (c, n) = l.split_once('|').unwrap();
            (c.parse().unwrap(), n.parse().unwrap())
        })
        .collect();

    // Each client's rows on B are the first of its transactions. Those B lacks must all
    // have been acknowledged after the cut; those B holds, before it (or in flight at it:
    // a commit written before the cut, acknowledged after). B may hold one transaction
    // more per client than the client saw: committed, not yet acknowledged.
    let mut lost: Vec<i64> = Vec::new();
    let mut newest_kept = i64::MIN;
    for (client, times) in &committed {
        let held = present.get(client).copied().unwrap_or(0);
        assert!(
            held <= times.len() + 1,
            "client {client}: B holds {held} transactions, the client saw {} committed",
            times.len()
        );
        lost.extend(&times[held.min(times.len())..]);
        if let Some(t) = times[..held.min(times.len())].last() {
            newest_kept = newest_kept.max(*t);
        }
    }
    assert_eq!(
        present
            .keys()
            .filter(|k| !committed.contains_key(k))
            .count(),
        0,
        "B holds rows of clients that committed nothing: {present:?}"
    );
    lost.sort();
    let (lost_before_kill, lost_after_kill) = (
        lost.iter().filter(|t| **t < killed_unix).count(),
        lost.iter().filter(|t| **t >= killed_unix).count(),
    );
    if let Some(first_lost) = lost.first() {
        assert!(
            *first_lost >= cut - CUT_TOLERANCE_NANOS,
            "a transaction acknowledged {} before the cut is missing on B",
            secs(cut - first_lost)
        );
    }
    assert!(
        newest_kept <= cut + CUT_TOLERANCE_NANOS,
        "B holds a transaction acknowledged {} after the cut",
        secs(newest_kept - cut)
    );
    // The replication schedule bounds the loss: the next round was cut at most an
    // interval (and the scheduler's slack) after this one, and had not finished when A
    // died.
    let next_cut = cuts.iter().map(|s| s.1).find(|t| *t > cut);
    let gap = next_cut.unwrap_or(killed_unix) - cut;
    let rpo = killed_unix - cut;
    assert!(
        gap <= FAILOVER_INTERVAL_SECONDS * 1_000_000_000 + ROUND_SCHEDULING_SLACK_NANOS,
        "{} between the failover snapshot's cut and the next cut, or A's death (interval {interval})",
        secs(gap)
    );
    // The RPO is that gap, plus how far the next round had got when A died.
    let next_round = next_cut.map_or("no round was cut after it".to_string(), |t| {
        format!(
            "the next round was cut {} after it and had run {} when A died",
            secs(t - cut),
            secs(killed_unix - t)
        )
    });
    eprintln!(
        "[{:?}] failover: recorded {failed_over:?}, published and staged on B {attached:?}, \
         PostgreSQL serving on B {serving:?} after the kill",
        t0.elapsed()
    );
    eprintln!(
        "transactions: {total} acknowledged, {} lost ({lost_before_kill} acknowledged before \
         the kill, {lost_after_kill} after it until A's fence), {} on B; RPO at the kill {} \
         ({next_round}; rounds under pgbench took up to {}); writes acknowledged until {} \
         after the kill; first lost {} after the cut, newest kept {} after it",
        lost.len(),
        after.rows,
        secs(rpo),
        secs(round_max),
        secs(last_commit - killed_unix),
        lost.first().map_or("-".into(), |t| secs(t - cut)),
        secs(newest_kept - cut),
    );

    // ---- tidy up: B's filesystem is clean; A's kubelet unstages its stale copy ---------
    pg.stop_fast().await;
    detach(&c, 1, &vol).await;
    let image_b = c.nodes[1]
        .pool_root()
        .join("berth/volumes")
        .join(format!("{vol}.img"));
    run(
        "e2fsck -fn on B's image",
        Command::new("e2fsck").arg("-fn").arg(&image_b),
        Duration::from_secs(120),
    )
    .await;
    c.restart_node(0, None).await;
    let staging_a = c.nodes[0].path(&format!("{vol}/staging"));
    let target_a = c.nodes[0].path(&format!("{vol}/target"));
    let mut a = c.node(0).await;
    a.node_unpublish_volume(unpublish_req(&vol, &target_a))
        .await
        .unwrap();
    a.node_unstage_volume(unstage_req(&vol, &staging_a))
        .await
        .unwrap();
    eprintln!("[{:?}] done", t0.elapsed());
}
