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
INSERT INTO ledger (v) VALUES (:delta);
END;
";

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

/// Issue: initdb on a berth volume on A, `pgbench -i` then a pgbench run while
/// replication runs; stop PostgreSQL, unpublish, publish on B, start PostgreSQL there;
/// every transaction pgbench reported committed is present; pg_amcheck finds nothing.
#[tokio::test(flavor = "multi_thread")]
async fn postgres_survives_a_move_with_every_committed_transaction() {
    let bin = pg_bin();
    let t0 = Instant::now();
    let c = TestCluster::start(3).await;
    let work = tempfile::Builder::new()
        .prefix("berth-pg-")
        .tempdir()
        .unwrap();
    chown_postgres(work.path());
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = work.path().join("ledger.sql");
    std::fs::write(&script, SCRIPT).unwrap();

    let vol = create_mount(
        &c,
        "pvc-postgres",
        0,
        &[("replicas", "2"), ("replicationInterval", "1s")],
    )
    .await;
    assert_eq!(c.copies(&vol).await[0], (0, pb::Role::Primary));

    // ---- A: initdb, pgbench -i, pgbench while replication ships snapshots --------------
    let target_a = attach(&c, 0, &vol).await;
    let_postgres_traverse(&target_a, c.dir.path());
    let data_a = target_a.join("pgdata");
    std::fs::create_dir(&data_a).unwrap();
    chown_postgres(&data_a);
    std::fs::set_permissions(&data_a, std::fs::Permissions::from_mode(0o700)).unwrap();
    // Declared after the cluster, so dropped (server stopped) before the harness unmounts.
    let mut pg = Server {
        bin: bin.clone(),
        data: data_a.clone(),
        work: work.path().to_path_buf(),
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
    pg.sql("CREATE TABLE ledger (id bigserial PRIMARY KEY, v int NOT NULL)")
        .await;
    let start = pg.ledger().await;
    assert_eq!(start.rows, 0);
    start.assert_balanced("after pgbench -i");
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
