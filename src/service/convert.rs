//! Conversions between `csi.v1` messages and berth's domain types, with the request
//! validation the spec's field rules ask for.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use prost_types::Timestamp;

use super::{TOPOLOGY_KEY, capabilities, params::CreateParams};
use crate::{
    error::{Error, Result},
    proto::csi::v1 as csi,
    storage::{
        FsType, GroupSnapshotId, SnapshotId, SnapshotRecord, VolumeId, VolumeKind, VolumeRecord,
        VolumeSource, node::Usage,
    },
};

pub fn required<'a>(value: &'a str, field: &'static str) -> Result<&'a str> {
    if value.is_empty() {
        Err(Error::Missing(field))
    } else {
        Ok(value)
    }
}

/// A CO-chosen object name (CreateVolume, CreateSnapshot, CreateVolumeGroupSnapshot). The
/// spec allows any Unicode string except those holding control characters other than the
/// common whitespace: U+0000-U+0008, U+000B, U+000C, U+000E-U+001F, U+007F-U+009F.
pub fn name(value: &str) -> Result<&str> {
    let v = required(value, "name")?;
    let banned =
        |c: &char| matches!(*c as u32, 0x00..=0x08 | 0x0b | 0x0c | 0x0e..=0x1f | 0x7f..=0x9f);
    match v.chars().find(banned) {
        Some(c) => Err(Error::invalid(
            "name",
            format!("contains the banned control character U+{:04X}", c as u32),
        )),
        None => Ok(v),
    }
}

/// A volume id from a request. `None` when it is not an id berth could have issued: such a
/// volume does not exist, which each RPC answers in its own way (NOT_FOUND, or success for
/// deletes).
pub fn volume_id(s: &str) -> Result<Option<VolumeId>> {
    Ok(VolumeId::parse(required(s, "volume_id")?))
}

pub fn existing_volume_id(s: &str) -> Result<VolumeId> {
    volume_id(s)?.ok_or_else(|| Error::VolumeNotFound(s.to_string()))
}

pub fn snapshot_id(s: &str) -> Result<Option<SnapshotId>> {
    Ok(SnapshotId::parse(required(s, "snapshot_id")?))
}

pub fn group_id(s: &str) -> Result<Option<GroupSnapshotId>> {
    Ok(GroupSnapshotId::parse(required(s, "group_snapshot_id")?))
}

/// A path the CO gives for a mount: absolute, normalized, no `..`.
pub fn co_path(s: &str, field: &'static str) -> Result<PathBuf> {
    let p = Path::new(required(s, field)?);
    // Checked on the string: Path::components() silently drops "." and doubled slashes.
    let clean = p.is_absolute()
        && s.len() > 1
        && s[1..].split('/').all(|seg| !matches!(seg, "" | "." | ".."))
        && !s.contains('\0');
    if !clean {
        return Err(Error::invalid(
            field,
            format!("{s:?} is not an absolute, normalized path"),
        ));
    }
    Ok(p.to_owned())
}

pub fn capacity(range: Option<&csi::CapacityRange>) -> Result<(u64, u64)> {
    let Some(r) = range else { return Ok((0, 0)) };
    if r.required_bytes < 0 || r.limit_bytes < 0 {
        return Err(Error::invalid(
            "capacity_range",
            "byte counts must not be negative",
        ));
    }
    Ok((r.required_bytes as u64, r.limit_bytes as u64))
}

/// The checks of a request's own fields, which the spec answers with INVALID_ARGUMENT
/// before anything is looked up: the node's controller and the cluster controller run the
/// same ones, so a malformed request gets the same code whether or not the volume exists.
pub trait Shape {
    /// The volume the request names, once its fields are well formed.
    fn checked(&self) -> Result<VolumeId>;
}

impl Shape for csi::ValidateVolumeCapabilitiesRequest {
    fn checked(&self) -> Result<VolumeId> {
        required(&self.volume_id, "volume_id")?;
        if self.volume_capabilities.is_empty() {
            return Err(Error::Missing("volume_capabilities"));
        }
        for c in &self.volume_capabilities {
            well_formed(c)?;
        }
        existing_volume_id(&self.volume_id)
    }
}

/// ControllerExpandVolume's fields, checked as [`Shape`] checks them: the volume and the
/// (required, limit) bytes of its capacity range.
pub fn expand_request(req: &csi::ControllerExpandVolumeRequest) -> Result<(VolumeId, u64, u64)> {
    required(&req.volume_id, "volume_id")?;
    let range = req
        .capacity_range
        .as_ref()
        .ok_or(Error::Missing("capacity_range"))?;
    let (required_bytes, limit_bytes) = capacity(Some(range))?;
    Ok((
        existing_volume_id(&req.volume_id)?,
        required_bytes,
        limit_bytes,
    ))
}

impl Shape for csi::ControllerExpandVolumeRequest {
    fn checked(&self) -> Result<VolumeId> {
        expand_request(self).map(|(id, ..)| id)
    }
}

impl Shape for csi::CreateSnapshotRequest {
    fn checked(&self) -> Result<VolumeId> {
        name(&self.name)?;
        let source = required(&self.source_volume_id, "source_volume_id")?;
        super::params::snapshot_params(&self.parameters)?;
        VolumeId::parse(source).ok_or_else(|| Error::VolumeNotFound(source.to_string()))
    }
}

impl Shape for csi::ControllerModifyVolumeRequest {
    fn checked(&self) -> Result<VolumeId> {
        required(&self.volume_id, "volume_id")?;
        if self.mutable_parameters.is_empty() {
            return Err(Error::Missing("mutable_parameters"));
        }
        existing_volume_id(&self.volume_id)
    }
}

pub fn mode(cap: &csi::VolumeCapability) -> csi::volume_capability::access_mode::Mode {
    cap.access_mode
        .as_ref()
        .and_then(|m| csi::volume_capability::access_mode::Mode::try_from(m.mode).ok())
        .unwrap_or(csi::volume_capability::access_mode::Mode::Unknown)
}

/// The fields the spec marks REQUIRED inside a capability (an access type, an access mode):
/// a capability without them is malformed, INVALID_ARGUMENT in every RPC — unlike a
/// well-formed capability the volume cannot serve, whose code each RPC's table chooses.
pub fn well_formed(cap: &csi::VolumeCapability) -> Result<()> {
    if cap.access_type.is_none() {
        return Err(Error::invalid(
            "volume_capability",
            "access_type (block or mount) is required",
        ));
    }
    if mode(cap) == csi::volume_capability::access_mode::Mode::Unknown {
        return Err(Error::invalid(
            "volume_capability",
            "access_mode is required (and must be a known mode)",
        ));
    }
    Ok(())
}

/// Why a capability cannot be served, or `None` if it can. Shared by CreateVolume,
/// ValidateVolumeCapabilities and the node RPCs, which report the same fact with different
/// codes.
pub fn unsupported(cap: &csi::VolumeCapability) -> Option<String> {
    let m = mode(cap);
    if !capabilities::access_mode_supported(m) {
        return Some(format!(
            "access mode {} is not supported (berth volumes are single-node)",
            m.as_str_name()
        ));
    }
    match &cap.access_type {
        None => Some("access_type (block or mount) is required".into()),
        Some(csi::volume_capability::AccessType::Block(_)) => None,
        Some(csi::volume_capability::AccessType::Mount(m)) => {
            if !m.fs_type.is_empty() && FsType::parse(&m.fs_type).is_none() {
                return Some(format!(
                    "fs_type {:?} is not supported (ext4, xfs)",
                    m.fs_type
                ));
            }
            if !m.volume_mount_group.is_empty() {
                return Some("volume_mount_group is not supported".into());
            }
            crate::storage::mount::validate_mount_flags(&m.mount_flags)
                .err()
                .map(|e| e.to_string())
        }
    }
}

/// The volume kind CreateVolume's capabilities and parameters ask for.
pub fn volume_kind(caps: &[csi::VolumeCapability], params: &CreateParams) -> Result<VolumeKind> {
    if caps.is_empty() {
        return Err(Error::Missing("volume_capabilities"));
    }
    let mut kind: Option<VolumeKind> = None;
    for cap in caps {
        if let Some(why) = unsupported(cap) {
            return Err(Error::invalid("volume_capabilities", why));
        }
        let this = match &cap.access_type {
            Some(csi::volume_capability::AccessType::Block(_)) => VolumeKind::Block,
            Some(csi::volume_capability::AccessType::Mount(m)) => VolumeKind::Filesystem {
                fs_type: FsType::parse(&m.fs_type)
                    .or(params.fs_type)
                    .unwrap_or(FsType::Ext4),
            },
            None => unreachable!("unsupported() rejects a missing access_type"),
        };
        match &kind {
            Some(k) if k != &this => {
                return Err(Error::invalid(
                    "volume_capabilities",
                    format!("capabilities disagree: {k:?} and {this:?}"),
                ));
            }
            _ => kind = Some(this),
        }
    }
    Ok(kind.expect("at least one capability"))
}

/// Whether an existing volume can serve a capability (ValidateVolumeCapabilities,
/// ControllerPublishVolume).
pub fn fits(vol: &VolumeRecord, cap: &csi::VolumeCapability) -> Option<String> {
    if let Some(why) = unsupported(cap) {
        return Some(why);
    }
    match (&vol.kind, &cap.access_type) {
        (VolumeKind::Block, Some(csi::volume_capability::AccessType::Block(_))) => None,
        (
            VolumeKind::Filesystem { fs_type },
            Some(csi::volume_capability::AccessType::Mount(m)),
        ) => match FsType::parse(&m.fs_type) {
            Some(want) if want != *fs_type => {
                Some(format!("volume is {}, not {}", fs_type.as_str(), m.fs_type))
            }
            _ => None,
        },
        (kind, _) => Some(format!("volume is {kind:?}")),
    }
}

/// The node-side view of a capability.
pub fn usage(cap: &csi::VolumeCapability) -> Result<Usage> {
    if let Some(why) = unsupported(cap) {
        return Err(Error::invalid("volume_capability", why));
    }
    Ok(match &cap.access_type {
        Some(csi::volume_capability::AccessType::Mount(m)) => Usage::Mount {
            fs_type: FsType::parse(&m.fs_type),
            flags: m.mount_flags.clone(),
        },
        _ => Usage::Block,
    })
}

pub fn content_source(src: Option<&csi::VolumeContentSource>) -> Result<Option<VolumeSource>> {
    use csi::volume_content_source::Type;
    Ok(match src.and_then(|s| s.r#type.as_ref()) {
        None => None,
        Some(Type::Snapshot(s)) => Some(VolumeSource::Snapshot(
            snapshot_id(&s.snapshot_id)?
                .ok_or_else(|| Error::SnapshotNotFound(s.snapshot_id.clone()))?,
        )),
        Some(Type::Volume(v)) => Some(VolumeSource::Volume(
            volume_id(&v.volume_id)?.ok_or_else(|| Error::VolumeNotFound(v.volume_id.clone()))?,
        )),
    })
}

pub fn to_content_source(src: &Option<VolumeSource>) -> Option<csi::VolumeContentSource> {
    use csi::volume_content_source::{SnapshotSource, Type, VolumeSource as VS};
    src.as_ref().map(|s| csi::VolumeContentSource {
        r#type: Some(match s {
            VolumeSource::Snapshot(id) => Type::Snapshot(SnapshotSource {
                snapshot_id: id.to_string(),
            }),
            VolumeSource::Volume(id) => Type::Volume(VS {
                volume_id: id.to_string(),
            }),
        }),
    })
}

pub fn topology(node_id: &str) -> csi::Topology {
    csi::Topology {
        segments: HashMap::from([(TOPOLOGY_KEY.to_string(), node_id.to_string())]),
    }
}

/// Whether this node satisfies the requisite topology (none given: any node does).
pub fn topology_allows(req: Option<&csi::TopologyRequirement>, node_id: &str) -> bool {
    let Some(req) = req else { return true };
    if req.requisite.is_empty() {
        return true;
    }
    req.requisite
        .iter()
        .any(|t| t.segments.get(TOPOLOGY_KEY).is_none_or(|v| v == node_id))
}

pub fn to_volume(v: &VolumeRecord, node_id: &str) -> csi::Volume {
    let mut ctx = HashMap::new();
    if let VolumeKind::Filesystem { fs_type } = v.kind {
        ctx.insert("fsType".to_string(), fs_type.as_str().to_string());
    }
    csi::Volume {
        capacity_bytes: v.capacity_bytes as i64,
        volume_id: v.id.to_string(),
        volume_context: ctx,
        content_source: to_content_source(&v.source),
        accessible_topology: vec![topology(node_id)],
    }
}

pub fn timestamp(unix_nanos: u128) -> Timestamp {
    Timestamp {
        seconds: (unix_nanos / 1_000_000_000) as i64,
        nanos: (unix_nanos % 1_000_000_000) as i32,
    }
}

pub fn to_snapshot(s: &SnapshotRecord) -> csi::Snapshot {
    csi::Snapshot {
        size_bytes: s.size_bytes as i64,
        snapshot_id: s.id.to_string(),
        source_volume_id: s.source_volume.to_string(),
        creation_time: Some(timestamp(s.created_unix_nanos)),
        // Snapshots are reflinks completed inside CreateSnapshot: usable at once.
        ready_to_use: true,
        group_snapshot_id: s.group.as_ref().map(|g| g.to_string()).unwrap_or_default(),
    }
}

/// Pagination over a list sorted by id: the token is the last id returned. A token that is
/// not an id of the listed kind was not issued by berth: ABORTED, per the spec.
pub fn paginate<T, F: Fn(&T) -> &str>(
    items: Vec<T>,
    max_entries: i32,
    token: &str,
    valid_token: impl Fn(&str) -> bool,
    id: F,
) -> Result<(Vec<T>, String)> {
    if max_entries < 0 {
        return Err(Error::invalid("max_entries", "must not be negative"));
    }
    if !token.is_empty() && !valid_token(token) {
        return Err(Error::BadToken(token.to_string()));
    }
    let mut page: Vec<T> = items
        .into_iter()
        .filter(|i| token.is_empty() || id(i) > token)
        .collect();
    let limit = if max_entries == 0 {
        usize::MAX
    } else {
        max_entries as usize
    };
    let next = if page.len() > limit {
        page.truncate(limit);
        id(page.last().expect("limit is at least one")).to_string()
    } else {
        String::new()
    };
    Ok((page, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn co_paths_must_be_clean_and_absolute() {
        for ok in ["/var/lib/kubelet/pods/x/volumes/v", "/a"] {
            assert!(co_path(ok, "target_path").is_ok(), "{ok}");
        }
        for bad in ["", "relative/x", "/a/../etc", "/a/./b", "/a//b/.."] {
            assert!(co_path(bad, "target_path").is_err(), "{bad}");
        }
    }

    #[test]
    fn pagination_walks_every_item_once() {
        let items: Vec<String> = (0..7).map(|i| format!("vol-{i}")).collect();
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let (page, next) = paginate(
                items.clone(),
                3,
                &token,
                |t| t.starts_with("vol-"),
                |s| s.as_str(),
            )
            .unwrap();
            seen.extend(page);
            if next.is_empty() {
                break;
            }
            token = next;
        }
        assert_eq!(seen, items);
        assert!(matches!(
            paginate(
                items.clone(),
                0,
                "junk",
                |t| t.starts_with("vol-"),
                |s| s.as_str()
            ),
            Err(Error::BadToken(_))
        ));
        assert!(paginate(items, -1, "", |_| true, |s| s.as_str()).is_err());
    }
}
