//! `--metrics-listen`: a real all-in-one berth answers CSI calls, and its /metrics (scraped
//! over HTTP as Prometheus would) counts them by method and code, times them, and reports
//! its pool.

mod common;

use std::{
    io::{Read, Write},
    net::TcpStream,
};

use common::*;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET `path` over HTTP/1.1; the status line and the body.
fn get(port: u16, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("metrics port open");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP response");
    (head.to_string(), body.to_string())
}

/// The value of the sample `series` (name and labels exactly as exposed).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.parse().expect("a number"))
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_count_csi_calls_by_method_and_code_and_report_the_pool() {
    let port = free_port();
    let d = Driver::start_with(Options {
        extra_args: vec!["--metrics-listen".into(), format!("127.0.0.1:{port}")],
        ..Default::default()
    })
    .await;
    let mut ctl = d.controller().await;
    let vol = ctl
        .create_volume(create_req("metrics-1", 64 * MIB, mount_cap("ext4")))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    // Twice: idempotent, and counted twice.
    ctl.create_volume(create_req("metrics-1", 64 * MIB, mount_cap("ext4")))
        .await
        .unwrap();
    let missing = ctl
        .controller_get_volume(get_volume_req("0123456789abcdef0123456789abcdef"))
        .await
        .unwrap_err();
    let code = missing.code();
    let invalid = ctl.delete_volume(delete_volume_req("")).await.unwrap_err();
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument);

    let (head, text) = get(port, "/metrics");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    let code_name = match code {
        tonic::Code::NotFound => "NotFound",
        tonic::Code::InvalidArgument => "InvalidArgument",
        c => panic!("ControllerGetVolume of an unknown id answered {c:?}"),
    };
    for (series, want) in [
        (
            r#"berth_csi_requests_total{method="CreateVolume",code="OK"}"#,
            2.0,
        ),
        (
            &*format!(
                r#"berth_csi_requests_total{{method="ControllerGetVolume",code="{code_name}"}}"#
            ),
            1.0,
        ),
        (
            r#"berth_csi_requests_total{method="DeleteVolume",code="InvalidArgument"}"#,
            1.0,
        ),
        (
            r#"berth_csi_request_duration_seconds_count{method="CreateVolume"}"#,
            2.0,
        ),
        (
            r#"berth_csi_request_duration_seconds_bucket{method="DeleteVolume",le="+Inf"}"#,
            1.0,
        ),
    ] {
        assert_eq!(sample(&text, series), Some(want), "{series} in:\n{text}");
    }
    let node = format!(r#"{{node="{NODE_ID}"}}"#);
    let gauge = |name: &str| {
        sample(&text, &format!("{name}{node}"))
            .unwrap_or_else(|| panic!("{name}{node} missing from:\n{text}"))
    };
    let capacity = gauge("berth_pool_capacity_bytes");
    let reserved = gauge("berth_pool_reserved_bytes");
    let used = gauge("berth_pool_used_bytes");
    let available = gauge("berth_pool_available_bytes");
    // A 16 GiB pool image.
    assert!(
        capacity > 15.0 * GIB as f64 && capacity <= 16.0 * GIB as f64,
        "{capacity}"
    );
    assert!(
        reserved >= vol.capacity_bytes as f64,
        "the volume's capacity is reserved: {reserved}"
    );
    assert!(used > 0.0 && used < capacity, "{used}");
    assert!(available <= capacity - reserved, "{available}");

    let (head, _) = get(port, "/other");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");

    ctl.delete_volume(delete_volume_req(&vol.volume_id))
        .await
        .unwrap();
}
