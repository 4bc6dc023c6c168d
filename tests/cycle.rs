//! Lifecycle soak: many create → stage → publish → unpublish → unstage → delete cycles leave
//! nothing behind — no loop device, mount, pool file or node record — and the driver's own
//! resources (its loop devices, its open files) do not grow with the number of cycles.

mod common;

use std::{
    path::Path,
    time::{Duration, Instant},
};

use common::*;
use csi::{controller_client::ControllerClient, node_client::NodeClient};
use tonic::transport::Channel;

const CYCLES: usize = 500;
/// Cycles run on this many workers at once, each on its own volumes. Sequential: a cycle
/// takes ~50 ms here (500 in ~25-70 s depending on load; the runtime is printed at the end),
/// well inside the ~3 minutes that would call for 4 concurrent workers, which on 2 cores
/// were no faster (4 workers: ~64 ms per cycle overall).
const WORKERS: usize = 1;
/// Small, and ext4: mkfs.xfs refuses anything under 300 MiB.
const SIZE: i64 = 16 * MIB;

/// Loop devices backed by anything in this driver's directory: the pool's own device and
/// every volume's (a leaked device of a deleted image shows as "… (deleted)" and counts too).
fn driver_loop_devices(d: &Driver) -> Vec<String> {
    let out = std::process::Command::new("losetup")
        .args(["--list", "--noheadings", "-O", "NAME,BACK-FILE"])
        .output()
        .expect("losetup");
    let dir = d.dir.path().to_string_lossy().into_owned();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&dir))
        .map(|l| l.to_string())
        .collect()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|rd| rd.count())
        .unwrap_or(0)
}

fn node_records(d: &Driver) -> Vec<String> {
    std::fs::read_dir(d.state_dir().join("node"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

struct Worker {
    ctl: ControllerClient<Channel>,
    node: NodeClient<Channel>,
}

impl Worker {
    /// One full lifecycle of a fresh volume; returns how long it took.
    async fn cycle(&mut self, d: &Driver, i: usize) -> Duration {
        let started = Instant::now();
        let cap = mount_cap("ext4");
        let vol = self
            .ctl
            .create_volume(create_req(&format!("pvc-cycle-{i}"), SIZE, cap.clone()))
            .await
            .unwrap_or_else(|s| panic!("cycle {i}: create: {s:?}"))
            .into_inner()
            .volume
            .unwrap();
        let id = vol.volume_id;
        let staging = d.staging_path(&format!("cycle-{i}"));
        let target = d.target_path(&format!("cycle-{i}"));
        self.node
            .node_stage_volume(stage_req(&id, &staging, cap.clone()))
            .await
            .unwrap_or_else(|s| panic!("cycle {i}: stage: {s:?}"));
        self.node
            .node_publish_volume(publish_req(&id, &staging, &target, cap, false))
            .await
            .unwrap_or_else(|s| panic!("cycle {i}: publish: {s:?}"));
        // The volume is really there: a small durable write through the published path.
        write_pattern(&target.join("f"), i as u64, 4096);
        self.node
            .node_unpublish_volume(unpublish_req(&id, &target))
            .await
            .unwrap_or_else(|s| panic!("cycle {i}: unpublish: {s:?}"));
        self.node
            .node_unstage_volume(unstage_req(&id, &staging))
            .await
            .unwrap_or_else(|s| panic!("cycle {i}: unstage: {s:?}"));
        self.ctl
            .delete_volume(delete_volume_req(&id))
            .await
            .unwrap_or_else(|s| panic!("cycle {i}: delete: {s:?}"));
        assert!(
            !Path::new(&target).exists(),
            "cycle {i}: unpublish leaves no target behind"
        );
        started.elapsed()
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycles_leave_nothing_behind() {
    let d = Driver::start().await;
    let pid = d.child.as_ref().unwrap().id();
    let baseline_loops = driver_loop_devices(&d);
    assert_eq!(
        baseline_loops.len(),
        1,
        "only the pool's own loop device at start: {baseline_loops:?}"
    );

    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        workers.push(Worker {
            ctl: d.controller().await,
            node: d.node().await,
        });
    }
    // A few cycles first, so the process's thread pools and connections are warm before its
    // open files are counted.
    let mut durations = Vec::with_capacity(CYCLES);
    let started = Instant::now();
    for (w, worker) in workers.iter_mut().enumerate() {
        durations.push(worker.cycle(&d, w).await);
    }
    let baseline_fds = open_fds(pid);

    let mut max_loops = 0;
    let mut max_fds = 0;
    let per_worker: Vec<Vec<usize>> = (0..WORKERS)
        .map(|w| (WORKERS + w..CYCLES).step_by(WORKERS).collect())
        .collect();
    let runs = workers.iter_mut().zip(per_worker).map(|(worker, cycles)| {
        let d = &d;
        async move {
            let mut out = Vec::with_capacity(cycles.len());
            for i in cycles {
                out.push(worker.cycle(d, i).await);
            }
            out
        }
    });
    let sampler = async {
        // Samples what the driver holds while the workers run.
        loop {
            max_loops = max_loops.max(driver_loop_devices(&d).len());
            max_fds = max_fds.max(open_fds(pid));
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    let results = tokio::select! {
        r = futures::future::join_all(runs) => r,
        _ = sampler => unreachable!(),
    };
    for r in results {
        durations.extend(r);
    }
    let elapsed = started.elapsed();
    assert_eq!(durations.len(), CYCLES);

    // Nothing left: no loop device, mount, pool file or node record of any volume.
    d.assert_clean();
    assert_eq!(node_records(&d), Vec::<String>::new(), "node records left");
    let final_loops = driver_loop_devices(&d);
    assert_eq!(
        final_loops, baseline_loops,
        "the driver's loop devices grew over {CYCLES} cycles"
    );
    assert!(
        max_loops <= 1 + WORKERS,
        "at most one loop device per worker's volume at a time, saw {max_loops}"
    );
    let final_fds = open_fds(pid);
    assert!(
        final_fds <= baseline_fds + 8,
        "berth's open files grew from {baseline_fds} to {final_fds} over {CYCLES} cycles"
    );
    let status = d
        .identity()
        .await
        .probe(csi::ProbeRequest {})
        .await
        .expect("probe after the soak")
        .into_inner();
    assert_ne!(status.ready, Some(false), "driver not ready after the soak");

    let mut sorted = durations.clone();
    sorted.sort();
    println!(
        "{CYCLES} cycles on {WORKERS} workers in {elapsed:.1?} ({:.1?} per cycle overall); \
         per cycle: median {:.1?}, p95 {:.1?}, max {:.1?}; loop devices at most {max_loops}, \
         open files {baseline_fds} -> {final_fds} (max {max_fds})",
        elapsed / CYCLES as u32,
        percentile(&sorted, 0.5),
        percentile(&sorted, 0.95),
        sorted[sorted.len() - 1],
    );
}
