//! [`PlacementStore`] as BerthVolume objects: etcd behind the API server is the consensus,
//! and resourceVersion the compare-and-swap. Every write names the resourceVersion it was
//! decided from (RBAC: berthvolumes get, list, create, update, delete).

use async_trait::async_trait;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, PostParams, Preconditions},
};

use super::{
    client::api_error,
    crd::{BerthVolume, BerthVolumeSpec},
};
use crate::{
    error::{Error, Result},
    placement::{Page, PlacementStore, Versioned, VolumePlacement},
    storage::VolumeId,
};

#[derive(Clone)]
pub struct PlacementApi {
    api: Api<BerthVolume>,
}

impl std::fmt::Debug for PlacementApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PlacementApi")
    }
}

impl PlacementApi {
    pub fn new(client: Client) -> Self {
        PlacementApi {
            api: Api::all(client),
        }
    }
}

/// 409 (a write conditioned on an old resourceVersion, or a create of an existing name) and
/// 404 on a conditional write (deleted meanwhile) are a lost compare-and-swap.
fn lost(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409 || s.code == 404)
}

fn conflict(id: &str, e: kube::Error) -> Error {
    Error::Conflict {
        what: format!("placement of {id}"),
        reason: e.to_string(),
    }
}

fn versioned(obj: BerthVolume) -> Result<Versioned> {
    let version = obj.metadata.resource_version.ok_or_else(|| Error::Peer {
        node: "kubernetes api".into(),
        status: tonic::Status::internal("a BerthVolume without a resourceVersion"),
    })?;
    Ok(Versioned {
        record: obj.spec.placement,
        version,
    })
}

fn object(record: &VolumePlacement, version: Option<&str>) -> Result<BerthVolume> {
    let id = record.id()?;
    Ok(BerthVolume {
        metadata: ObjectMeta {
            name: Some(id.to_string()),
            resource_version: version.map(str::to_string),
            ..Default::default()
        },
        spec: BerthVolumeSpec {
            placement: record.clone(),
        },
    })
}

#[async_trait]
impl PlacementStore for PlacementApi {
    async fn get(&self, id: &VolumeId) -> Result<Option<Versioned>> {
        self.api
            .get_opt(id.as_str())
            .await
            .map_err(api_error(format_args!("get BerthVolume {id}")))?
            .map(versioned)
            .transpose()
    }

    async fn create(&self, record: &VolumePlacement) -> Result<Versioned> {
        let obj = object(record, None)?;
        match self.api.create(&PostParams::default(), &obj).await {
            Ok(o) => versioned(o),
            Err(e) if matches!(&e, kube::Error::Api(s) if s.code == 409) => {
                Err(conflict(&record.volume_id, e))
            }
            Err(e) => Err(api_error(format_args!(
                "create BerthVolume {}",
                record.volume_id
            ))(e)),
        }
    }

    async fn replace(&self, record: &VolumePlacement, version: &str) -> Result<Versioned> {
        let obj = object(record, Some(version))?;
        let name = record.volume_id.as_str();
        match self.api.replace(name, &PostParams::default(), &obj).await {
            Ok(o) => versioned(o),
            Err(e) if lost(&e) => Err(conflict(name, e)),
            Err(e) => Err(api_error(format_args!("update BerthVolume {name}"))(e)),
        }
    }

    async fn delete(&self, id: &VolumeId, version: &str) -> Result<()> {
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: Some(version.to_string()),
                uid: None,
            }),
            ..Default::default()
        };
        match self.api.delete(id.as_str(), &dp).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) if lost(&e) => Err(conflict(id.as_str(), e)),
            Err(e) => Err(api_error(format_args!("delete BerthVolume {id}"))(e)),
        }
    }

    async fn list(&self, start: Option<&str>, limit: usize) -> Result<Page> {
        let mut lp = ListParams::default().limit(limit.clamp(1, u32::MAX as usize) as u32);
        if let Some(token) = start {
            lp = lp.continue_token(token);
        }
        let list = self.api.list(&lp).await.map_err(|e| match e {
            // An expired continue token (etcd compacted past it), or one the API server never
            // issued: the CO restarts its walk.
            kube::Error::Api(s) if s.code == 410 || (s.code == 400 && start.is_some()) => {
                Error::BadToken(start.unwrap_or_default().to_string())
            }
            e => api_error("list BerthVolumes")(e),
        })?;
        let next = list.metadata.continue_.filter(|c| !c.is_empty());
        let records = list
            .items
            .into_iter()
            .map(versioned)
            .collect::<Result<Vec<_>>>()?;
        Ok(Page { records, next })
    }
}
