//! The binary's process-level promises: three modes, SIGTERM drains in-flight RPCs, a clear
//! error without root, JSON logs, a stale socket replaced.

mod common;

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use csi::plugin_capability::service::Type as ServiceType;

struct Proc {
    child: Child,
    endpoint: String,
    log: std::path::PathBuf,
}

impl Proc {
    async fn start(mode: &str, dir: &Path, name: &str, extra: &[&str]) -> Proc {
        Proc::start_env(mode, dir, name, extra, &[]).await
    }

    async fn start_env(
        mode: &str,
        dir: &Path,
        name: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Proc {
        let sock = dir.join(format!("{name}.sock"));
        let endpoint = format!("unix://{}", sock.display());
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_berth"))
            .arg(mode)
            .args([
                "--endpoint",
                &endpoint,
                "--node-id",
                NODE_ID,
                "--pool-size",
                "4Gi",
            ])
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(extra)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut p = Proc {
            child,
            endpoint,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while berth::client::connect(&p.endpoint).await.is_err() {
            if let Some(s) = p.child.try_wait().unwrap() {
                panic!(
                    "{mode} exited ({s}): {}",
                    std::fs::read_to_string(&p.log).unwrap()
                );
            }
            assert!(Instant::now() < deadline, "{mode} did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        p
    }

    fn sigterm(&self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
    }

    async fn wait(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "did not exit");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cleanup(dir: &Path) {
    common::cleanup_dir(dir);
}

async fn services(endpoint: &str) -> Vec<ServiceType> {
    let ch = berth::client::connect(endpoint).await.unwrap();
    let caps = csi::identity_client::IdentityClient::new(ch)
        .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    caps.iter()
        .filter_map(|c| match &c.r#type {
            Some(csi::plugin_capability::Type::Service(s)) => ServiceType::try_from(s.r#type).ok(),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn controller_and_node_processes_share_one_state_dir() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let mut ctl = Proc::start("controller", dir.path(), "controller", &[]).await;
    let mut node = Proc::start("node", dir.path(), "node", &[]).await;

    assert!(
        services(&ctl.endpoint)
            .await
            .contains(&ServiceType::ControllerService)
    );
    assert!(
        !services(&node.endpoint)
            .await
            .contains(&ServiceType::ControllerService),
        "a node does not advertise the controller service"
    );
    let node_ch = berth::client::connect(&node.endpoint).await.unwrap();
    let err = csi::controller_client::ControllerClient::new(node_ch.clone())
        .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::Unimplemented,
        "the node process serves no controller"
    );

    let mut c = csi::controller_client::ControllerClient::new(
        berth::client::connect(&ctl.endpoint).await.unwrap(),
    );
    let cap = mount_cap("ext4");
    let vol = c
        .create_volume(create_req("split", 64 * MIB, cap.clone()))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let mut n = csi::node_client::NodeClient::new(node_ch);
    let staging = dir.path().join("k8s/staging");
    let target = dir.path().join("k8s/target");
    n.node_stage_volume(csi::NodeStageVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: staging.to_string_lossy().into(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    n.node_publish_volume(csi::NodePublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: staging.to_string_lossy().into(),
        target_path: target.to_string_lossy().into(),
        volume_capability: Some(cap),
        ..Default::default()
    })
    .await
    .unwrap();
    write_pattern(&target.join("f"), 3, 1 << 20);
    assert_eq!(
        std::fs::read(target.join("f")).unwrap(),
        pattern(3, 1 << 20)
    );

    ctl.sigterm();
    node.sigterm();
    assert!(ctl.wait().await.success());
    assert!(node.wait().await.success());
    assert!(
        !Path::new(ctl.endpoint.trim_start_matches("unix://")).exists(),
        "socket removed on exit"
    );
    cleanup(dir.path());
}

/// SIGTERM lets a running RPC finish before the process exits.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_in_flight_requests() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let mut p = Proc::start_env(
        "all-in-one",
        dir.path(),
        "aio",
        &[],
        &[("BERTH_FAILPOINT", "create-volume:after-record:sleep=1500")],
    )
    .await;
    let mut c = csi::controller_client::ControllerClient::new(
        berth::client::connect(&p.endpoint).await.unwrap(),
    );
    let started = Instant::now();
    let call = tokio::spawn(async move {
        c.create_volume(create_req("slow", 64 * MIB, block_cap()))
            .await
    });
    // Wait until the RPC is held at the failpoint, then ask the process to stop.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&p.log).unwrap().contains("holding") {
        assert!(Instant::now() < deadline, "RPC never reached the failpoint");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    p.sigterm();
    let result = call.await.unwrap();
    assert!(
        result.is_ok(),
        "in-flight CreateVolume completed: {result:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert!(p.wait().await.success(), "clean exit after draining");
    cleanup(dir.path());
}

#[tokio::test(flavor = "multi_thread")]
async fn without_root_it_says_so() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_berth"))
        .args(["all-in-one", "--endpoint"])
        .arg(format!("unix://{}/csi.sock", dir.path().display()))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("must run as root"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_and_stale_socket() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    // A socket file left by a crashed process.
    let stale = std::os::unix::net::UnixListener::bind(dir.path().join("aio.sock")).unwrap();
    drop(stale);
    let mut p = Proc::start("all-in-one", dir.path(), "aio", &["--log-format", "json"]).await;
    p.sigterm();
    assert!(p.wait().await.success());
    let log = std::fs::read_to_string(&p.log).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert!(!lines.is_empty());
    for l in lines {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(
            v.get("level").is_some() && v.get("timestamp").is_some(),
            "{l}"
        );
    }
    cleanup(dir.path());
}

/// The CO may also talk to berth over TCP (`--endpoint tcp://host:port`).
#[tokio::test(flavor = "multi_thread")]
async fn serves_over_tcp() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("tcp://127.0.0.1:{port}");
    let log = dir.path().join("tcp.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args([
            "all-in-one",
            "--endpoint",
            &endpoint,
            "--node-id",
            NODE_ID,
            "--pool-size",
            "2Gi",
        ])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let channel = loop {
        if let Ok(c) = berth::client::connect(&endpoint).await {
            break c;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "{}",
            std::fs::read_to_string(&log).unwrap()
        );
        assert!(Instant::now() < deadline, "no TCP listener");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let info = csi::identity_client::IdentityClient::new(channel)
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "berth.csi.dev");
    let _ = child.kill();
    let _ = child.wait();
    cleanup(dir.path());
}
