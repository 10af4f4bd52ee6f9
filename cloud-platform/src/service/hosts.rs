//! Compute hosts and the placement of instances on them: the operator's alone (role
//! cloud-platform), since a tenant who could place a VM could have another tenant's key
//! released to a host of its choosing.

use net::{Identity, Role};
use protocol::cloud::{ComputeHost, Instance, InstanceList};
use protocol::domain::validate_name;
use protocol::refusal::Refusal;

use super::{require_role, CloudPlatform, AGENT_TIMEOUT};
use crate::error::{Error, Result};
use crate::store::Page;

impl CloudPlatform {
    /// `POST /v1/hosts`: records (or replaces) where a host's secure component listens.
    /// Only the operator (role cloud-platform) may; a bad host id or `agent_url` is 400
    /// `bad_request`.
    pub async fn register_host(&self, caller: &Identity, host: ComputeHost) -> Result<ComputeHost> {
        require_role(caller, &[Role::CloudPlatform], "register a compute host")?;
        validate_name("host id", &host.id).map_err(|e| Error::BadRequest(e.to_string()))?;
        net::Client::from_files(&host.agent_url, &self.agent_tls, Role::SecureComponent, AGENT_TIMEOUT)
            .map_err(|e| Error::BadRequest(format!("agent_url of host {}: {e}", host.id)))?;
        let stored = host.clone();
        self.store(move |s| s.put_host(&stored)).await?;
        tracing::info!(host = %host.id, agent_url = %host.agent_url, by = %caller.name, "host registered");
        Ok(host)
    }

    /// `GET /v1/hosts`: every registered host. The topology is the operator's: a tenant
    /// learns nothing of other tenants' hosts and VMs (403 `forbidden` for other roles).
    pub async fn hosts(&self, caller: &Identity) -> Result<Vec<ComputeHost>> {
        require_role(caller, &[Role::CloudPlatform], "list the compute hosts")?;
        self.store(|s| s.hosts()).await
    }

    /// `POST /v1/instances`: records which host a VM runs on. Placement is the operator's
    /// alone (role cloud-platform): a tenant who could register or move a VM could have
    /// another tenant's key released to a host of its choosing. An unregistered host is 404
    /// `host_unknown`.
    pub async fn register_instance(&self, caller: &Identity, instance: Instance) -> Result<Instance> {
        require_role(caller, &[Role::CloudPlatform], "place an instance on a host")?;
        validate_name("instance id", &instance.id).map_err(|e| Error::BadRequest(e.to_string()))?;
        let stored = instance.clone();
        self.store(move |s| {
            if s.host(&stored.host)?.is_none() {
                return Err(Error::NotFound {
                    code: Refusal::HostUnknown,
                    message: format!(
                        "host {} is not registered; the operator registers it with POST /v1/hosts before instances can run on it",
                        stored.host
                    ),
                });
            }
            s.put_instance(&stored)
        })
        .await?;
        tracing::info!(instance = %instance.id, host = %instance.host, by = %caller.name, "instance registered");
        Ok(instance)
    }

    /// `GET /v1/instances`: one page of instances, by id; the operator's only (see
    /// [`CloudPlatform::hosts`]).
    pub async fn instances(&self, caller: &Identity, page: Page) -> Result<InstanceList> {
        require_role(caller, &[Role::CloudPlatform], "list the instances")?;
        let p = page.clone();
        let rows = self.store(move |s| s.instances(&p)).await?;
        let (instances, next_marker) = page.finish(rows, |i| &i.id);
        Ok(InstanceList { instances, next_marker })
    }

    pub(super) async fn host_of(&self, host_id: &str) -> Result<ComputeHost> {
        let id = host_id.to_string();
        self.store(move |s| s.host(&id)).await?.ok_or_else(|| Error::NotFound {
            code: Refusal::HostUnknown,
            message: format!("host {host_id} is not registered; the operator registers it with POST /v1/hosts"),
        })
    }
}
