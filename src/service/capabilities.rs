//! Everything berth advertises, in one place, so what it claims and what it implements are
//! reviewed together.

use crate::proto::csi::v1::{
    self as csi,
    controller_service_capability::rpc::Type as CtrlCap,
    group_controller_service_capability::rpc::Type as GroupCap,
    node_service_capability::rpc::Type as NodeCap,
    plugin_capability::{service::Type as PluginService, volume_expansion::Type as Expansion},
    volume_capability::access_mode::Mode,
};

pub const CONTROLLER: &[CtrlCap] = &[
    CtrlCap::CreateDeleteVolume,
    CtrlCap::PublishUnpublishVolume,
    CtrlCap::ListVolumes,
    CtrlCap::GetCapacity,
    CtrlCap::CreateDeleteSnapshot,
    CtrlCap::ListSnapshots,
    CtrlCap::CloneVolume,
    CtrlCap::PublishReadonly,
    CtrlCap::ExpandVolume,
    CtrlCap::ListVolumesPublishedNodes,
    CtrlCap::VolumeCondition,
    CtrlCap::GetVolume,
    CtrlCap::SingleNodeMultiWriter,
    CtrlCap::ModifyVolume,
    CtrlCap::GetSnapshot,
];

pub const NODE: &[NodeCap] = &[
    NodeCap::StageUnstageVolume,
    NodeCap::GetVolumeStats,
    NodeCap::ExpandVolume,
    NodeCap::VolumeCondition,
    NodeCap::SingleNodeMultiWriter,
];

pub const GROUP: &[GroupCap] = &[GroupCap::CreateDeleteGetVolumeGroupSnapshot];

/// Services a process advertises depend on what it runs.
pub fn plugin_services(controller: bool) -> Vec<PluginService> {
    let mut v = vec![PluginService::VolumeAccessibilityConstraints];
    if controller {
        v.push(PluginService::ControllerService);
        v.push(PluginService::GroupControllerService);
        v.push(PluginService::SnapshotMetadataService);
    }
    v
}

/// Filesystems grow while mounted; block volumes need no node step at all.
pub const EXPANSION: Expansion = Expansion::Online;

/// A volume lives on one node, so every single-node mode works and no multi-node one does.
pub fn access_mode_supported(mode: Mode) -> bool {
    match mode {
        Mode::SingleNodeWriter
        | Mode::SingleNodeReaderOnly
        | Mode::SingleNodeSingleWriter
        | Mode::SingleNodeMultiWriter => true,
        Mode::Unknown
        | Mode::MultiNodeReaderOnly
        | Mode::MultiNodeSingleWriter
        | Mode::MultiNodeMultiWriter => false,
    }
}

pub fn read_only_mode(mode: Mode) -> bool {
    matches!(mode, Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly)
}

/// ControllerGetCapabilities' answer, the same for a single node and a cluster.
pub fn controller_response() -> csi::ControllerGetCapabilitiesResponse {
    use csi::controller_service_capability::{Rpc, Type};
    csi::ControllerGetCapabilitiesResponse {
        capabilities: CONTROLLER
            .iter()
            .map(|&t| csi::ControllerServiceCapability {
                r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
            })
            .collect(),
    }
}

/// GroupControllerGetCapabilities' answer, the same for a single node and a cluster.
pub fn group_response() -> csi::GroupControllerGetCapabilitiesResponse {
    use csi::group_controller_service_capability::{Rpc, Type};
    csi::GroupControllerGetCapabilitiesResponse {
        capabilities: GROUP
            .iter()
            .map(|&t| csi::GroupControllerServiceCapability {
                r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
            })
            .collect(),
    }
}
