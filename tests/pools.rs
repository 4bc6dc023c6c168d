//! Pool sources other than the embedded image: an admin-named directory (here on ext4, which
//! has no reflink, so snapshots must fall back to sparse copies and say so) and an
//! admin-named block device (formatted only when blank).

mod common;

use std::{path::Path, process::Command};

use common::*;

/// Makes a sparse image of `size` under `dir`, attaches it, and returns the device.
fn loop_device(dir: &Path, name: &str, size: &str) -> String {
    let img = dir.join(name);
    assert!(
        Command::new("truncate")
            .args(["-s", size])
            .arg(&img)
            .status()
            .unwrap()
            .success()
    );
    let out = Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "losetup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn directory_pool_without_reflink_falls_back_to_sparse_copies() {
    require_root();
    // Laid out as <dir>/state/pool so the harness's cleanup_dir tears it down in order.
    let outer = tempfile::Builder::new()
        .prefix("berth-pooldir-")
        .tempdir()
        .unwrap();
    let pool = outer.path().join("state/pool");
    std::fs::create_dir_all(&pool).unwrap();
    let dev = loop_device(outer.path(), "ext4.img", "2G");
    assert!(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", &dev])
            .status()
            .unwrap()
            .success()
    );
    assert!(
        Command::new("mount")
            .arg(&dev)
            .arg(&pool)
            .status()
            .unwrap()
            .success()
    );

    {
        let d = Driver::start_with(Options {
            extra_args: vec!["--pool-dir".into(), pool.to_string_lossy().into()],
            ..Default::default()
        })
        .await;
        assert!(
            d.log().contains("no reflink support"),
            "the fallback is announced:\n{}",
            d.log()
        );
        let ctl = d.controller().await;
        let cap = mount_cap("ext4");
        let vol = create_volume(&ctl, create_req("on-ext4", 256 * MIB, cap.clone())).await;
        let target = stage_and_publish(&d, &vol.volume_id, &cap, "a").await;
        write_pattern(&target.join("f"), 21, 4 << 20);
        let snap = create_snapshot(&ctl, "copy-snap", &vol.volume_id).await;
        write_pattern(&target.join("f"), 22, 4 << 20);

        let image = pool
            .join("berth/snapshots")
            .join(format!("{}.img", snap.snapshot_id));
        let allocated = {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(&image).unwrap().blocks() * 512
        };
        assert!(
            allocated < 128 << 20,
            "the copy stayed sparse: {allocated} bytes allocated of 256 MiB"
        );

        let restored = create_volume(
            &ctl,
            from_snapshot(
                create_req("from-copy", 256 * MIB, cap.clone()),
                &snap.snapshot_id,
            ),
        )
        .await;
        let t2 = stage_and_publish(&d, &restored.volume_id, &cap, "b").await;
        assert_eq!(std::fs::read(t2.join("f")).unwrap(), pattern(21, 4 << 20));
        unpublish_and_unstage(&d, &vol.volume_id, "a").await;
        unpublish_and_unstage(&d, &restored.volume_id, "b").await;
        delete_volume(&ctl, &vol.volume_id).await;
        delete_volume(&ctl, &restored.volume_id).await;
        delete_snapshot(&ctl, &snap.snapshot_id).await;
    }
    cleanup_dir(outer.path());
}

#[tokio::test(flavor = "multi_thread")]
async fn device_pool_is_formatted_once_and_kept() {
    require_root();
    let outer = tempfile::Builder::new()
        .prefix("berth-pooldev-")
        .tempdir()
        .unwrap();
    let dev = loop_device(outer.path(), "disk.img", "4G");
    let opts = Options {
        extra_args: vec!["--pool-device".into(), dev.clone()],
        ..Default::default()
    };
    let mut d = Driver::start_with(opts).await;
    let ctl = d.controller().await;
    let vol = create_volume(&ctl, create_req("kept", 64 * MIB, block_cap())).await;
    let fs = Command::new("blkid")
        .args(["-o", "value", "-s", "TYPE", &dev])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&fs.stdout).trim(),
        "xfs",
        "a blank device is formatted xfs"
    );

    // A restart must find the filesystem and keep what is on it, never format again.
    d.restart(None).await;
    let ids = list_volume_ids(&d.controller().await).await;
    assert_eq!(
        ids,
        vec![vol.volume_id.clone()],
        "the volume survives a restart on the device"
    );
    delete_volume(&d.controller().await, &vol.volume_id).await;
    drop(d);
    let out = Command::new("losetup").args(["-d", &dev]).status().unwrap();
    assert!(out.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn device_with_a_partition_table_is_refused() {
    require_root();
    let outer = tempfile::Builder::new()
        .prefix("berth-pooldev-")
        .tempdir()
        .unwrap();
    let img = outer.path().join("disk.img");
    assert!(
        Command::new("truncate")
            .args(["-s", "1G"])
            .arg(&img)
            .status()
            .unwrap()
            .success()
    );
    // An MBR with one Linux partition: somebody's disk, not a blank one.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        let mut entry = vec![0x00, 0, 2, 0, 0x83, 0, 0, 0];
        entry.extend(2048u32.to_le_bytes());
        entry.extend(4096u32.to_le_bytes());
        f.write_all_at(&entry, 446).unwrap();
        f.write_all_at(&[0x55, 0xAA], 510).unwrap();
    }
    let out = Command::new("losetup")
        .args(["--find", "--show"])
        .arg(&img)
        .output()
        .unwrap();
    let dev = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let run = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["all-in-one", "--pool-device", &dev, "--endpoint"])
        .arg(format!("unix://{}/csi.sock", outer.path().display()))
        .arg("--state-dir")
        .arg(outer.path().join("state"))
        .output()
        .unwrap();
    let detached = Command::new("losetup").args(["-d", &dev]).status().unwrap();
    assert!(
        !run.status.success(),
        "berth must not start on a partitioned device"
    );
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("partition table") && stderr.contains("only formats blank devices"),
        "{stderr}"
    );
    let pt = Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "PTTYPE"])
        .arg(&img)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&pt.stdout).trim(),
        "dos",
        "the partition table is untouched"
    );
    assert!(detached.success());
}

/// A second berth started on a live driver's socket refuses to start, before it touches any
/// state, and the first keeps serving on its socket (issue 11, item 10). That a stale
/// socket is still replaced is `server::tests::a_live_socket_is_not_taken`.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_driver_does_not_take_a_live_socket() {
    let d = Driver::start().await;
    let other = tempfile::tempdir().unwrap();
    let second = Command::new(env!("CARGO_BIN_EXE_berth"))
        .arg("all-in-one")
        .arg("--endpoint")
        .arg(d.endpoint())
        .arg("--state-dir")
        .arg(other.path().join("state"))
        .arg("--node-id")
        .arg("node-2")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        !second.status.success(),
        "the second driver started:\n{stderr}"
    );
    assert!(stderr.contains("in use"), "a clear reason: {stderr}");
    assert!(
        !other.path().join("state").exists(),
        "the second driver prepared state before refusing"
    );
    let mut identity = d.identity().await;
    identity
        .probe(csi::ProbeRequest {})
        .await
        .expect("the first driver still answers on its socket");
    d.assert_clean();
}

/// Issue 11, item 4: the embedded pool image on a host filesystem smaller than the pool.
/// Start-up says so, and the pool is mounted with discard, so deleting a volume gives its
/// space back to the host (the image's allocated blocks shrink).
#[tokio::test(flavor = "multi_thread")]
async fn an_embedded_pool_on_a_small_host_warns_and_gives_space_back() {
    require_root();
    let outer = tempfile::Builder::new()
        .prefix("berth-smallhost-")
        .tempdir()
        .unwrap();
    let state = outer.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let dev = loop_device(outer.path(), "host.img", "640M");
    assert!(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", &dev])
            .status()
            .unwrap()
            .success()
    );
    assert!(
        Command::new("mount")
            .arg(&dev)
            .arg(&state)
            .status()
            .unwrap()
            .success()
    );
    let mut d = Driver {
        dir: outer,
        child: None,
        opts: Options {
            pool_size: "4Gi",
            ..Default::default()
        },
    };
    d.restart(None).await;
    assert!(
        d.log().contains("larger than its host filesystem can hold"),
        "a 4 GiB pool on a 640 MiB host is announced:\n{}",
        d.log()
    );
    let pool = d.pool_root().to_string_lossy().to_string();
    let options = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(&pool))
        .map(|l| l.to_string())
        .expect("the pool is mounted");
    assert!(options.contains("discard"), "{options}");

    // The pool offers no more than its host can still hold, and a create past that is
    // refused with RESOURCE_EXHAUSTED instead of being promised (and later failing inside
    // the pool's XFS, shutting it down).
    let ctl = d.controller().await;
    let available = ctl
        .clone()
        .get_capacity(csi::GetCapacityRequest::default())
        .await
        .unwrap()
        .into_inner()
        .available_capacity;
    let host = nix::sys::statvfs::statvfs(&d.state_dir()).unwrap();
    let host_free = host.blocks_available() as i64 * host.fragment_size() as i64;
    assert!(
        available > 0 && available <= host_free,
        "GetCapacity offers {available} bytes on a host with {host_free} free"
    );
    let too_big = ctl
        .clone()
        .create_volume(create_req("past-the-host", 1 << 30, mount_cap("ext4")))
        .await
        .unwrap_err();
    assert_eq!(
        too_big.code(),
        tonic::Code::ResourceExhausted,
        "{too_big:?}"
    );

    let image = d.state_dir().join("pool.img");
    let allocated = || {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&image).unwrap().blocks() * 512
    };
    let cap = mount_cap("ext4");
    let vol = create_volume(&ctl, create_req("on-small-host", 256 * MIB, cap.clone())).await;
    let target = stage_and_publish(&d, &vol.volume_id, &cap, "a").await;
    write_pattern(&target.join("f"), 31, 200 << 20);
    unpublish_and_unstage(&d, &vol.volume_id, "a").await;
    let written = allocated();
    delete_volume(&ctl, &vol.volume_id).await;
    let started = std::time::Instant::now();
    let deadline = started + std::time::Duration::from_secs(60);
    while allocated() + (150 << 20) > written {
        assert!(
            std::time::Instant::now() < deadline,
            "the host got the deleted volume's space back: {written} bytes allocated \
             before the delete, {} after",
            allocated()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    eprintln!(
        "space back on the host {:?} after the delete",
        started.elapsed()
    );
}
