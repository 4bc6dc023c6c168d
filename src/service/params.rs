//! StorageClass `parameters` and VolumeAttributesClass `mutable_parameters`, typed.
//!
//! Keys are explicit renames; a key berth does not know is INVALID_ARGUMENT rather than
//! silently ignored, so a typo in a StorageClass fails the first provisioning loudly instead
//! of producing a volume that lacks what the user asked for.

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;

use crate::{
    error::{Error, Result},
    storage::{FsType, MutableSettings, Replication},
};

/// The StorageClass parameter that names the filesystem (the CO may also pass it in the
/// capability's fs_type, which wins).
pub const FSTYPE_KEY: &str = "csi.storage.k8s.io/fstype";
/// Object names the external-provisioner adds with `--extra-create-metadata`.
const METADATA_KEYS: [&str; 3] = [
    "csi.storage.k8s.io/pvc/name",
    "csi.storage.k8s.io/pvc/namespace",
    "csi.storage.k8s.io/pv/name",
];
/// The same for the external-snapshotter.
const SNAPSHOT_METADATA_KEYS: [&str; 3] = [
    "csi.storage.k8s.io/volumesnapshot/name",
    "csi.storage.k8s.io/volumesnapshot/namespace",
    "csi.storage.k8s.io/volumesnapshotcontent/name",
];

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Mutable {
    /// "true" / "false": allocate every block of the image up front.
    #[serde(rename = "preallocate")]
    preallocate: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateParams {
    pub fs_type: Option<FsType>,
    pub settings: MutableSettings,
    /// PVC/PV names, kept for events and for operators reading records.
    pub labels: BTreeMap<String, String>,
    pub replication: Replication,
    pub failover: Failover,
}

/// Who decides to promote a replica when the primary's node is lost (`failover`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Failover {
    /// The controller, once the node's lease has expired.
    #[default]
    Auto,
    /// An operator, with `berth promote` (or `berth node-gone`).
    Manual,
}

impl Failover {
    /// The setting of a volume from its recorded CreateVolume parameters, validated when
    /// it was created; a volume adopted without parameters fails over automatically.
    pub fn of(params: &BTreeMap<String, String>) -> Failover {
        match params.get(FAILOVER_KEY).map(String::as_str) {
            Some("manual") => Failover::Manual,
            _ => Failover::Auto,
        }
    }
}

/// StorageClass keys for replication and moves (creation only: a volume's copies are laid
/// out when it is made).
const REPLICAS_KEY: &str = "replicas";
const INTERVAL_KEY: &str = "replicationInterval";
const KEEP_SOURCE_KEY: &str = "moveKeepsSource";
const FAILOVER_KEY: &str = "failover";
/// More copies than this is a typo, not a plan: every copy is a full volume on a node.
const MAX_REPLICAS: u32 = 5;

/// The longest replication interval: a week. A replica that far behind protects nothing a
/// snapshot would not, so a longer one is a typo; the bound also keeps the scheduler's
/// signed arithmetic on ages (nanoseconds since the epoch, as i64) far from overflowing,
/// where a huge value used to wrap negative and make every volume due every second.
const MAX_INTERVAL_SECONDS: u64 = 7 * 24 * 3600;

/// "30s", "5m", "1h" or plain seconds; from one second to [`MAX_INTERVAL_SECONDS`].
fn parse_interval(v: &str) -> Result<u64> {
    let (num, mult) = [("s", 1u64), ("m", 60), ("h", 3600)]
        .iter()
        .find_map(|(suf, m)| v.strip_suffix(suf).map(|n| (n, *m)))
        .unwrap_or((v, 1));
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|n| (1..=MAX_INTERVAL_SECONDS).contains(n))
        .ok_or_else(|| {
            Error::invalid(
                "parameters",
                format!(
                    "{INTERVAL_KEY} {v:?} is not a duration from 1s to {}h, like 30s, 5m or 1h",
                    MAX_INTERVAL_SECONDS / 3600
                ),
            )
        })
}

fn parse_bool(key: &'static str, v: &str) -> Result<bool> {
    match v {
        "true" => Ok(true),
        "false" => Ok(false),
        other => Err(Error::invalid(
            key,
            format!("{other:?} is not \"true\" or \"false\""),
        )),
    }
}

fn parse_mutable(map: &HashMap<String, String>, into: &mut MutableSettings) -> Result<()> {
    let value = serde_json::to_value(map).expect("string maps serialize");
    let m: Mutable =
        serde_json::from_value(value).map_err(|e| Error::invalid("parameters", e.to_string()))?;
    if let Some(p) = m.preallocate {
        into.preallocate = parse_bool("preallocate", &p)?;
    }
    Ok(())
}

/// Parses CreateVolume's `parameters` and `mutable_parameters`.
pub fn create_params(
    params: &HashMap<String, String>,
    mutable: &HashMap<String, String>,
) -> Result<CreateParams> {
    let mut out = CreateParams::default();
    let mut rest = HashMap::new();
    for (k, v) in params {
        if k == FSTYPE_KEY {
            out.fs_type = Some(FsType::parse(v).ok_or_else(|| {
                Error::invalid(
                    "parameters",
                    format!("{FSTYPE_KEY} {v:?} is not ext4 or xfs"),
                )
            })?);
        } else if METADATA_KEYS.contains(&k.as_str()) {
            out.labels.insert(k.clone(), v.clone());
        } else if k == REPLICAS_KEY {
            out.replication.replicas = v
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=MAX_REPLICAS).contains(n))
                .ok_or_else(|| {
                    Error::invalid(
                        "parameters",
                        format!("{REPLICAS_KEY} {v:?} is not a number from 1 to {MAX_REPLICAS}"),
                    )
                })?;
        } else if k == INTERVAL_KEY {
            out.replication.interval_seconds = parse_interval(v)?;
        } else if k == KEEP_SOURCE_KEY {
            out.replication.keep_source = parse_bool("parameters", v)?;
        } else if k == FAILOVER_KEY {
            out.failover = match v.as_str() {
                "auto" => Failover::Auto,
                "manual" => Failover::Manual,
                other => {
                    return Err(Error::invalid(
                        "parameters",
                        format!("{FAILOVER_KEY} {other:?} is not \"auto\" or \"manual\""),
                    ));
                }
            };
        } else {
            rest.insert(k.clone(), v.clone());
        }
    }
    parse_mutable(&rest, &mut out.settings)?;
    parse_mutable(mutable, &mut out.settings)?;
    Ok(out)
}

/// Parses ControllerModifyVolume's `mutable_parameters` on top of the current settings.
pub fn modify_params(
    current: &MutableSettings,
    mutable: &HashMap<String, String>,
) -> Result<MutableSettings> {
    let mut out = current.clone();
    parse_mutable(mutable, &mut out)?;
    Ok(out)
}

/// CreateSnapshot / CreateVolumeGroupSnapshot take no parameters of their own.
pub fn snapshot_params(params: &HashMap<String, String>) -> Result<()> {
    match params
        .keys()
        .find(|k| !SNAPSHOT_METADATA_KEYS.contains(&k.as_str()))
    {
        Some(k) => Err(Error::invalid(
            "parameters",
            format!("unknown snapshot parameter {k:?}"),
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn create_parameters_table() {
        type Case<'a> = (
            Vec<(&'a str, &'a str)>,
            Vec<(&'a str, &'a str)>,
            Result<(Option<FsType>, bool), &'a str>,
        );
        let cases: Vec<Case> = vec![
            (vec![], vec![], Ok((None, false))),
            (
                vec![(FSTYPE_KEY, "xfs")],
                vec![],
                Ok((Some(FsType::Xfs), false)),
            ),
            (vec![(FSTYPE_KEY, "btrfs")], vec![], Err("btrfs")),
            (vec![("preallocate", "true")], vec![], Ok((None, true))),
            (vec![], vec![("preallocate", "true")], Ok((None, true))),
            (vec![("preallocate", "yes")], vec![], Err("yes")),
            (vec![("replicas", "0")], vec![], Err("replicas")),
            (vec![("replicas", "9")], vec![], Err("replicas")),
            (
                vec![("replicationInterval", "0s")],
                vec![],
                Err("replicationInterval"),
            ),
            (vec![("replicationInterval", "soon")], vec![], Err("soon")),
            (
                vec![("replicationInterval", "168h")],
                vec![],
                Ok((None, false)),
            ),
            (
                vec![("replicationInterval", "604801")],
                vec![],
                Err("replicationInterval"),
            ),
            // Wrapped negative as i64 before it was bounded.
            (
                vec![("replicationInterval", "9223372036854775808")],
                vec![],
                Err("replicationInterval"),
            ),
            (
                vec![("replicationInterval", "18446744073709551615s")],
                vec![],
                Err("replicationInterval"),
            ),
            (
                vec![("replicationInterval", "5124095576030431h")],
                vec![],
                Err("replicationInterval"),
            ),
            (vec![("moveKeepsSource", "maybe")], vec![], Err("maybe")),
            (vec![("failover", "manual")], vec![], Ok((None, false))),
            (vec![("failover", "sometimes")], vec![], Err("sometimes")),
            // Who promotes is decided at creation, like the copies.
            (vec![], vec![("failover", "auto")], Err("failover")),
            // Replication is laid out at creation; it is not a mutable parameter.
            (vec![], vec![("replicas", "2")], Err("replicas")),
            (
                vec![("csi.storage.k8s.io/pvc/name", "db")],
                vec![],
                Ok((None, false)),
            ),
            (vec![], vec![("bogus", "1")], Err("bogus")),
        ];
        for (params, mutable, want) in cases {
            let got = create_params(&map(&params), &map(&mutable));
            match (got, want) {
                (Ok(p), Ok((fs, pre))) => {
                    assert_eq!(
                        (p.fs_type, p.settings.preallocate),
                        (fs, pre),
                        "{params:?} {mutable:?}"
                    )
                }
                (Err(e), Err(word)) => {
                    assert_eq!(e.code(), tonic::Code::InvalidArgument);
                    assert!(e.to_string().contains(word), "{e} should mention {word}");
                }
                (got, want) => panic!("{params:?} {mutable:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn replication_parameters_parse() {
        let cases = [
            (vec![], Replication::default()),
            (
                vec![("replicas", "3"), ("replicationInterval", "5m")],
                Replication {
                    replicas: 3,
                    interval_seconds: 300,
                    keep_source: true,
                },
            ),
            (
                vec![("replicationInterval", "90"), ("moveKeepsSource", "false")],
                Replication {
                    replicas: 1,
                    interval_seconds: 90,
                    keep_source: false,
                },
            ),
        ];
        for (params, want) in cases {
            let got = create_params(&map(&params), &HashMap::new()).unwrap();
            assert_eq!(got.replication, want, "{params:?}");
        }
    }

    #[test]
    fn failover_is_automatic_unless_the_class_says_manual() {
        let cases = [
            (vec![], Failover::Auto),
            (vec![("failover", "auto")], Failover::Auto),
            (vec![("failover", "manual")], Failover::Manual),
        ];
        for (params, want) in cases {
            let got = create_params(&map(&params), &HashMap::new()).unwrap();
            assert_eq!(got.failover, want, "{params:?}");
            let recorded: BTreeMap<_, _> = map(&params).into_iter().collect();
            assert_eq!(Failover::of(&recorded), want, "{params:?}");
        }
    }

    #[test]
    fn labels_keep_kubernetes_names() {
        let p = create_params(
            &map(&[("csi.storage.k8s.io/pvc/namespace", "prod")]),
            &HashMap::new(),
        )
        .unwrap();
        assert_eq!(
            p.labels
                .get("csi.storage.k8s.io/pvc/namespace")
                .map(String::as_str),
            Some("prod")
        );
    }
}
