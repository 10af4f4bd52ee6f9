//! Trusted launch reports (docs/PROTOCOL.md "Trusted launch"): after every launch attempt an
//! enrolled compute host tells the TTP what became of it, and the TTP appends it to the audit
//! chain as a `launch` record, so a refused (tampered, unlisted) image is on the record beyond
//! the host's own log.

use protocol::image::{LaunchReport, LaunchReportResponse, LAUNCH_OK};
use protocol::pki::{Identity, Role};

use super::{Subject, Ttp};
use crate::error::Result;

/// The audit event of an accepted launch report; its outcome is the host's.
pub const LAUNCH_EVENT: &str = "launch";
/// The audit event of a launch report the TTP refused (a caller that is not an enrolled
/// host, a malformed report); its outcome is the TTP's refusal code. Kept apart from
/// [`LAUNCH_EVENT`] so that a `launch` record always says what a host reported.
pub const LAUNCH_REPORT_REFUSED_EVENT: &str = "launch_report";

impl Ttp {
    /// `POST /v1/launches`: the caller must be a secure component (`forbidden`) of an enrolled
    /// host (`host_unknown`), the host being its certificate name, as for a quote challenge;
    /// the report must validate (`bad_request`). Appends a `launch` record with the reported
    /// outcome, this host and the VM, its message naming the image's file name and digest;
    /// a refused report is audited as `launch_report` with the refusal's code instead.
    pub fn report_launch(&self, actor: &Identity, report: &LaunchReport) -> Result<LaunchReportResponse> {
        // Only checked ids go into a refusal's record: the host once it is known enrolled
        // (the caller's name is the record's actor either way), never a refused report's VM.
        let mut refused_subject = Subject::default();
        let accepted = (|| -> Result<()> {
            Self::require_role(actor, Role::SecureComponent, "report a VM launch")?;
            self.host_record(&actor.name)?;
            refused_subject.host_id = Some(actor.name.clone());
            report.validate()?;
            Ok(())
        })();
        if let Err(error) = accepted {
            let entry = Self::audit_entry(LAUNCH_REPORT_REFUSED_EVENT, actor, &refused_subject, Err(&error));
            self.store.append_audit(entry)?;
            return Err(error);
        }
        let subject = Subject { domain_id: None, host_id: Some(actor.name.clone()), vm_id: Some(report.vm_id.clone()) };
        let mut entry = Self::audit_entry(LAUNCH_EVENT, actor, &subject, Ok(launch_message(&actor.name, report)));
        entry.outcome = report.outcome.clone();
        let record = self.store.append_audit(entry)?;
        Ok(LaunchReportResponse { audit_seq: record.seq })
    }
}

/// "compute-2 refused to launch vm-x (image_not_allowed) from image web.raw, sha256 <hex>:
/// <the host's text>": who, what, which image, and the host's own words.
fn launch_message(host_id: &str, report: &LaunchReport) -> String {
    let what = if report.outcome == LAUNCH_OK {
        format!("{host_id} launched {}", report.vm_id)
    } else {
        format!("{host_id} refused to launch {} ({})", report.vm_id, report.outcome)
    };
    let name = report.image_name.as_deref().unwrap_or("(no file name)");
    let digest = report.image_digest.as_deref().map_or_else(|| "not hashed".to_string(), |d| format!("sha256 {d}"));
    format!("{what} from image {name}, {digest}: {}", report.message)
}

#[cfg(test)]
mod tests;
