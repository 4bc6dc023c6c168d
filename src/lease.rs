//! A node's liveness lease and the self-fence that makes failover safe (docs/moving.md,
//! "When a node dies").
//!
//! The controller may promote a replica of a volume elsewhere only once the primary's node
//! has not renewed its lease for the lease *duration*, measured by the controller's own
//! clock from when it saw the last renewal. The node fences its replicated primaries once
//! it has not renewed for *fence-after*, measured from when it *sent* the renewal it last
//! had confirmed, which is before the controller can have seen it. So the node stops
//! writing at least `duration - fence_after` before any promotion; that margin covers the
//! rate at which the two clocks may drift apart and a fence that runs late.
//!
//! The fence must not depend on this process: a frozen (SIGSTOP) or killed agent on a live
//! host cannot fence anything, while the database above its loop devices writes on. So a
//! small child, the fence keeper (`berth fence-keeper`), holds the deadline too. It is told
//! the deadline at every renewal, lives in its own process group, and when the deadline
//! passes without word, whatever became of the agent, fences the replicated primaries it
//! finds in the pool's records then: a volume made after the last renewal is fenced too.

use std::{
    collections::VecDeque,
    io::{BufRead, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::{
    error::{Error, Result},
    storage::{VolumeRecord, loopdev, pool::Pool},
    util::fsutil,
};

/// Lease timings, the same flags on nodes and controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseTimings {
    /// How often a lease is renewed.
    pub period: Duration,
    /// How long after the last renewal it saw the controller may promote elsewhere.
    pub duration: Duration,
    /// How long after its last confirmed renewal a node fences itself.
    pub fence_after: Duration,
}

impl Default for LeaseTimings {
    /// 2 s renewals tolerate two lost renewals before a node fences at 6 s; the 4 s left
    /// to the 10 s duration dwarf any clock-rate drift (parts per million) and cover a
    /// fence that runs seconds late on a loaded host. 10 s keeps a failover's storage part
    /// near 11 s (docs/BENCHMARKS.md, "Node loss and failover").
    fn default() -> Self {
        LeaseTimings {
            period: Duration::from_secs(2),
            duration: Duration::from_secs(10),
            fence_after: Duration::from_secs(6),
        }
    }
}

impl LeaseTimings {
    /// Refuses timings under which a node could write after a promotion, or fence itself
    /// between two routine renewals.
    pub fn check(&self) -> Result<()> {
        // One renewal may be lost without a fence.
        if self.fence_after < self.period * 2 {
            return Err(Error::invalid(
                "--lease-fence-after",
                format!(
                    "{:?} must be at least twice --lease-period ({:?}): one lost renewal must not fence a node",
                    self.fence_after, self.period
                ),
            ));
        }
        // At least a fifth of the duration, and a second, between fence and promotion.
        let margin = (self.duration / 5).max(Duration::from_secs(1));
        if self.fence_after + margin > self.duration {
            return Err(Error::invalid(
                "--lease-fence-after",
                format!(
                    "{:?} must be at most --lease-duration ({:?}) minus {margin:?}: the margin covers clock drift and a late fence",
                    self.fence_after, self.duration
                ),
            ));
        }
        Ok(())
    }
}

/// What survives a restart: until when the lease was valid, by the wall clock (the only
/// clock that spans processes). A restarted agent that finds it past fences at once.
#[derive(Serialize, Deserialize)]
struct Persisted {
    valid_until_unix_ms: u64,
}

/// One line to the fence keeper.
#[derive(Serialize, Deserialize)]
struct KeeperOrder {
    /// Fence this many milliseconds after reading this line, unless another line comes.
    within_ms: u64,
}

/// Tokens of renewals answered and not yet confirmed: a few per controller is plenty.
const PENDING: usize = 16;

/// The node side of the lease.
pub struct NodeLease {
    pool: Arc<Pool>,
    fence_after: Duration,
    file: PathBuf,
    valid_until: Mutex<Instant>,
    pending: Mutex<VecDeque<(u64, Instant)>>,
    keeper: Mutex<Option<(Child, ChildStdin)>>,
}

impl std::fmt::Debug for NodeLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeLease")
            .field("fence_after", &self.fence_after)
            .finish_non_exhaustive()
    }
}

impl NodeLease {
    /// Picks up the lease where the last run of the agent left it, and starts a fence
    /// keeper. A node that never held a lease starts with one `fence_after` long: no
    /// controller can have seen it renew, so none counts towards its expiry yet.
    pub fn start(pool: Arc<Pool>, state_dir: &Path, fence_after: Duration) -> Result<Arc<Self>> {
        let file = state_dir.join("lease.json");
        let now = Instant::now();
        let valid_until = match fsutil::read_json::<Persisted>(&file)? {
            Some(p) => {
                let left =
                    Duration::from_millis(p.valid_until_unix_ms).saturating_sub(since_epoch());
                now + left
            }
            None => now + fence_after,
        };
        let lease = Arc::new(NodeLease {
            pool,
            fence_after,
            file,
            valid_until: Mutex::new(valid_until),
            pending: Mutex::default(),
            keeper: Mutex::default(),
        });
        lease.spawn_keeper(state_dir)?;
        Ok(lease)
    }

    /// Whether the lease has lapsed.
    pub fn lapsed(&self) -> bool {
        Instant::now() >= *self.valid_until.lock().expect("lease lock")
    }

    /// A renewal sent at `sent` was accepted: the lease holds until `sent + fence_after`.
    pub fn renewed(&self, sent: Instant) {
        let until = sent + self.fence_after;
        {
            let mut v = self.valid_until.lock().expect("lease lock");
            if until <= *v {
                return;
            }
            *v = until;
        }
        let left = until.saturating_duration_since(Instant::now());
        let wall = since_epoch() + left;
        if let Err(e) = fsutil::write_json(
            &self.file,
            &Persisted {
                valid_until_unix_ms: wall.as_millis() as u64,
            },
        ) {
            tracing::warn!(error = %e, "cannot record the lease; a restart fences at once");
        }
        self.tell_keeper(left);
    }

    /// The controller's renewal (a nodes file): notes when `token` was answered, and
    /// extends the lease from when the `confirm`ed one was.
    pub fn controller_renewal(&self, confirm: u64, token: u64) {
        let confirmed = {
            let mut p = self.pending.lock().expect("lease lock");
            let at = p.iter().position(|(t, _)| *t == confirm).map(|i| p[i].1);
            if token != 0 {
                if p.len() == PENDING {
                    p.pop_front();
                }
                p.push_back((token, Instant::now()));
            }
            at
        };
        if let Some(sent) = confirmed {
            self.renewed(sent);
        }
    }

    /// Every `period`, while the lease has lapsed: suspends each replicated primary not
    /// suspended yet (a volume created or resumed meanwhile is caught at the next tick).
    pub async fn watch(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut fenced = false;
        loop {
            if self.lapsed() {
                match self.fence_all().await {
                    Ok(n) if n > 0 || !fenced => {
                        tracing::warn!(
                            volumes = n,
                            "lease lapsed: replicated primaries fenced until the controller resumes them"
                        );
                    }
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "lease lapsed and fencing failed"),
                }
                fenced = true;
            } else if std::mem::take(&mut fenced) {
                tracing::info!("lease renewed; fenced volumes wait for the controller");
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Suspends every replicated primary not suspended yet; how many.
    /// One that cannot be fenced does not keep the others from it; it is tried again at
    /// the next tick (and the keeper fences its devices anyway).
    pub async fn fence_all(&self) -> Result<usize> {
        let mut fenced = 0;
        for v in self.pool.fenceable()? {
            match self.pool.suspend(&v.id).await {
                Ok(()) => fenced += 1,
                Err(e) => tracing::error!(volume.id = %v.id, error = %e, "cannot fence a volume"),
            }
        }
        Ok(fenced)
    }

    fn tell_keeper(&self, within: Duration) {
        let order = KeeperOrder {
            within_ms: within.as_millis() as u64,
        };
        let mut line = serde_json::to_vec(&order).expect("orders serialize");
        line.push(b'\n');
        let mut k = self.keeper.lock().expect("keeper lock");
        if let Some((_, stdin)) = k.as_mut()
            && let Err(e) = stdin.write_all(&line).and_then(|_| stdin.flush())
        {
            // The agent's own watch still fences while it runs.
            tracing::error!(error = %e, "the fence keeper is gone");
            *k = None;
        }
    }

    /// Starts this run's keeper, then stops the one an earlier run left (its deadline is
    /// this run's now, and it would fence at it even after this run renews).
    fn spawn_keeper(&self, state_dir: &Path) -> Result<()> {
        let pid_file = state_dir.join("fence-keeper.pid");
        let old = std::fs::read_to_string(&pid_file).ok();
        let exe = std::env::current_exe().map_err(Error::io("locate", "/proc/self/exe"))?;
        let mut child = {
            use std::os::unix::process::CommandExt;
            Command::new(exe)
                .arg("fence-keeper")
                .arg("--volumes")
                .arg(self.pool.volumes_dir())
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .process_group(0)
                .spawn()
                .map_err(Error::io("start", "berth fence-keeper"))?
        };
        let stdin = child.stdin.take().expect("stdin is piped");
        *self.keeper.lock().expect("keeper lock") = Some((child, stdin));
        let left = self
            .valid_until
            .lock()
            .expect("lease lock")
            .saturating_duration_since(Instant::now());
        self.tell_keeper(left);
        if let Some(pid) = old.and_then(|p| p.trim().parse::<i32>().ok()) {
            stop_keeper(pid);
        }
        let pid = self
            .keeper
            .lock()
            .expect("keeper lock")
            .as_ref()
            .map(|(c, _)| c.id());
        if let Some(pid) = pid {
            fsutil::write_atomic(&pid_file, pid.to_string().as_bytes())?;
        }
        Ok(())
    }
}

/// Stops an earlier run's keeper, if that pid is still one (pids are reused).
fn stop_keeper(pid: i32) {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if cmdline.split(|b| *b == 0).any(|a| a == b"fence-keeper") {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

fn since_epoch() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// `berth fence-keeper --volumes DIR`: reads orders on stdin, fences the replicated
/// primaries of the pool whose volume images and records are in DIR when an order's
/// deadline passes without a newer one, and exits once the agent is gone (stdin closed)
/// and its last deadline has been kept. Plain threads, no runtime: it must keep time when
/// nothing else does.
pub fn run_keeper(volumes: &Path) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::channel::<KeeperOrder>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            match serde_json::from_str(&line) {
                Ok(order) => {
                    if tx.send(order).is_err() {
                        break;
                    }
                }
                Err(e) => eprintln!("berth fence-keeper: bad order: {e}"),
            }
        }
    });
    use std::sync::mpsc::RecvTimeoutError;
    let mut armed: Option<Instant> = None;
    let mut agent_gone = false;
    loop {
        let next = match (&armed, agent_gone) {
            (None, true) => return Ok(()),
            (None, false) => match rx.recv() {
                Ok(o) => Some(o),
                Err(_) => {
                    agent_gone = true;
                    continue;
                }
            },
            (Some(at), false) => {
                match rx.recv_timeout(at.saturating_duration_since(Instant::now())) {
                    Ok(o) => Some(o),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => {
                        agent_gone = true;
                        continue;
                    }
                }
            }
            (Some(at), true) => {
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
                None
            }
        };
        match next {
            Some(o) => armed = Some(Instant::now() + Duration::from_millis(o.within_ms)),
            None => {
                armed = None;
                fence_replicated(volumes);
            }
        }
    }
}

/// Fences every writable loop device backed by a volume image in `volumes` whose record
/// says the volume is replicated: the copies a controller may promote elsewhere.
fn fence_replicated(volumes: &Path) {
    let devices = match loopdev::list_blocking() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("berth fence-keeper: cannot list loop devices: {e}");
            return;
        }
    };
    for d in devices {
        if d.deleted || d.read_only || d.fenced || d.backing_file.parent() != Some(volumes) {
            continue;
        }
        let record = d.backing_file.with_extension("json");
        let replicated = matches!(
            fsutil::read_json::<VolumeRecord>(&record),
            Ok(Some(v)) if v.replication.replicas > 1
        );
        if !replicated {
            continue;
        }
        match loopdev::set_fenced(&d.device, true) {
            Ok(()) => eprintln!(
                "berth fence-keeper: lease lapsed; fenced {} ({})",
                d.device.display(),
                d.backing_file.display()
            ),
            Err(e) => eprintln!(
                "berth fence-keeper: cannot fence {}: {e}",
                d.device.display()
            ),
        }
    }
}
