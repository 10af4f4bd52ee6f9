//! Tables for people (`--json` prints the resources as they are for scripts).

use protocol::cloud::{Attachment, DomainView, Instance};
use protocol::messages::HistoryResponse;

fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells.iter().enumerate().map(|(i, c)| format!("{:<w$}", c, w = widths[i])).collect::<Vec<_>>().join("  ").trim_end().to_string()
    };
    let mut out = vec![line(headers.iter().map(|h| h.to_string()).collect())];
    out.extend(rows.into_iter().map(line));
    out.join("\n")
}

fn acl_text(domain: &DomainView) -> String {
    domain.acl.iter().map(|e| format!("{}:{}", e.vm_id, e.mode)).collect::<Vec<_>>().join(",")
}

pub fn domains(domains: &[DomainView]) -> String {
    if domains.is_empty() {
        return "no domains yet: create one with `domain-manager domain create --vm VM:rw --size 64M`".into();
    }
    table(
        &["ID", "OWNER", "VERSION", "SIZE", "STATUS", "ACCESS"],
        domains
            .iter()
            .map(|d| vec![d.id.clone(), d.owner.clone(), d.version.to_string(), human_size(d.size_bytes), d.status.clone(), acl_text(d)])
            .collect(),
    )
}

pub fn domain(d: &DomainView) -> String {
    let metadata = d.metadata.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", ");
    format!(
        "domain      {}\nowner       {}\nversion     {}\nsize        {}\nstatus      {}\nmetadata    {}\naccess      {}\nshared with {}",
        d.id,
        d.owner,
        d.version,
        human_size(d.size_bytes),
        d.status,
        if metadata.is_empty() { "-".into() } else { metadata },
        if d.acl.is_empty() { "-".into() } else { acl_text(d) },
        if d.shared_with.is_empty() { "-".into() } else { d.shared_with.join(", ") },
    )
}

pub fn attachments(list: &[Attachment]) -> String {
    if list.is_empty() {
        return "no attachments".into();
    }
    table(
        &["ID", "DOMAIN", "VM", "HOST", "MODE", "STATUS", "MOUNT"],
        list.iter()
            .map(|a| vec![a.id.clone(), a.domain_id.clone(), a.instance_id.clone(), a.host.clone(), a.mode.to_string(), a.status.clone(), a.mount_path.clone()])
            .collect(),
    )
}

pub fn instances(list: &[Instance]) -> String {
    table(&["VM", "HOST"], list.iter().map(|i| vec![i.id.clone(), i.host.clone()]).collect())
}

pub fn history(history: &HistoryResponse) -> String {
    let body = table(
        &["#", "TIME (UTC s)", "EVENT", "OUTCOME", "VM", "HOST", "BY"],
        history
            .records
            .iter()
            .map(|r| {
                vec![
                    r.seq.to_string(),
                    r.at.to_string(),
                    r.event.clone(),
                    r.outcome.clone(),
                    r.vm_id.clone().unwrap_or_else(|| "-".into()),
                    r.host_id.clone().unwrap_or_else(|| "-".into()),
                    r.actor.clone(),
                ]
            })
            .collect(),
    );
    format!("{body}\n(the TTP verified the audit hash chain before answering)")
}

pub fn human_size(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (unit, size) in UNITS {
        if bytes >= size && bytes.is_multiple_of(size) {
            return format!("{} {unit}", bytes / size);
        }
    }
    format!("{bytes} B")
}
