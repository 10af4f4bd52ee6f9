//! Tables for people (`--json` prints the resources as they are for scripts).

use protocol::cloud::{Attachment, DomainView};
use protocol::messages::HistoryResponse;

/// Text made safe for a terminal: control characters other than newline and tab (ESC, BEL,
/// CR, DEL, C1) and the Unicode bidirectional overrides are shown escaped (`\u{1b}`). A
/// metadata value or name that another domain manager chose must not move the cursor,
/// recolour, retitle or hide lines on this one's terminal. JSON output (`--json`) escapes them
/// by itself.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let bidi = matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        if (c.is_control() && c != '\n' && c != '\t') || bidi {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{:<w$}", c, w = widths[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut out = vec![line(headers.iter().map(|h| h.to_string()).collect())];
    out.extend(rows.into_iter().map(line));
    out.join("\n")
}

fn acl_text(domain: &DomainView) -> String {
    domain.acl.iter().map(|e| format!("{}:{}", e.vm_id, e.mode)).collect::<Vec<_>>().join(",")
}

/// The domains as a table (id, owner, version, size, status, access list), or a hint to
/// create one if there is none.
pub fn domains(domains: &[DomainView]) -> String {
    if domains.is_empty() {
        return "no domains yet: create one with `domain-manager domain create --vm VM:rw --size 64M`".into();
    }
    table(
        &["ID", "OWNER", "VERSION", "SIZE", "STATUS", "ACCESS"],
        domains
            .iter()
            .map(|d| {
                vec![
                    d.id.clone(),
                    d.owner.clone(),
                    d.version.to_string(),
                    human_size(d.size_bytes),
                    d.status.clone(),
                    acl_text(d),
                ]
            })
            .collect(),
    )
}

/// One domain in full, one field per line.
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
    ) + &format!("\nkey         {}", key_text(d))
}

/// The key generation of the header in force, and whether a rotation is unfinished.
fn key_text(d: &DomainView) -> String {
    let generation = protocol::messages::Registration::decode(&d.header.registration.message)
        .map(|r| format!("generation {}", r.key_generation))
        .unwrap_or_else(|_| "generation unknown (the registration does not decode)".into());
    let Some(rotation) = &d.header.rotation else { return generation };
    // The data area's 4096-byte sectors: how far the boundary has moved.
    let sectors = (d.size_bytes / 4096).max(1);
    let percent = rotation.boundary.min(sectors) * 100 / sectors;
    let where_ = if d.status == "in-use" {
        "re-encrypting online on the host that holds it read-write, or at its next read-write attach"
    } else {
        "the next read-write attach finishes it"
    };
    format!(
        "{generation}, rotation in progress: {percent} % re-encrypted (sector {} of {sectors}); {where_}",
        rotation.boundary
    )
}

/// The attachments as a table (domain, VM, host, mode, status, mount path).
pub fn attachments(list: &[Attachment]) -> String {
    if list.is_empty() {
        return "no attachments".into();
    }
    table(
        &["ID", "DOMAIN", "VM", "HOST", "MODE", "STATUS", "MOUNT"],
        list.iter()
            .map(|a| {
                vec![
                    a.id.clone(),
                    a.domain_id.clone(),
                    a.instance_id.clone(),
                    a.host.clone(),
                    a.mode.to_string(),
                    a.status.to_string(),
                    a.mount_path.clone(),
                ]
            })
            .collect(),
    )
}

/// The audit event of a break-glass release (the TTP's `key_release::BREAK_GLASS_EVENT`).
pub const BREAK_GLASS_EVENT: &str = "break_glass_release";

/// One line per granted break-glass release in the history, to print above it so that the
/// owner cannot miss one: `BREAK-GLASS: vm-x read domain D on host H at T, by manager M:
/// <reason>` (docs/PROTOCOL.md "Access policy").
pub fn break_glass_notices(history: &HistoryResponse) -> Vec<String> {
    history
        .records
        .iter()
        .filter(|r| r.event == BREAK_GLASS_EVENT && r.outcome == "ok")
        .map(|r| {
            // The TTP's message: "... (ro), grant by M, placement by P, ..., reason: R".
            let manager = r
                .message
                .split_once("grant by ")
                .and_then(|(_, rest)| rest.split(',').next())
                .unwrap_or("an unnamed manager");
            let reason = r.message.rsplit_once(", reason: ").map_or(r.message.as_str(), |(_, reason)| reason);
            let access = if r.message.contains("(rw)") { "opened (read-write)" } else { "read" };
            printable(&format!(
                "BREAK-GLASS: {} {access} domain {} on host {} at {} (UTC s), by manager {manager}: {reason}",
                r.vm_id.as_deref().unwrap_or("-"),
                r.domain_id.as_deref().unwrap_or(&history.domain_id),
                r.host_id.as_deref().unwrap_or("-"),
                r.at
            ))
            .replace('\n', " ")
        })
        .collect()
}

/// A domain's viewing history as a table, noting that the TTP verified the hash chain. The
/// TTP's message is shown for refusals and integrity records (an `integrity_violation` names
/// the sector there); a granted release's is left out, the other columns say it all.
pub fn history(history: &HistoryResponse) -> String {
    let detail = |r: &protocol::messages::AuditRecord| {
        if r.outcome != "ok" || r.event.starts_with("integrity_") || r.event == BREAK_GLASS_EVENT {
            printable(&r.message.replace('\n', " "))
        } else {
            String::new()
        }
    };
    let row = |seq: String, event: String, r: &protocol::messages::AuditRecord, detail: String| {
        vec![
            seq,
            r.at.to_string(),
            event,
            r.outcome.clone(),
            r.vm_id.clone().unwrap_or_else(|| "-".into()),
            r.host_id.clone().unwrap_or_else(|| "-".into()),
            r.actor.clone(),
            detail,
        ]
    };
    // A format-2 volume commits a root at every flush of its VM: a run of successful commits
    // by one host is one row here (`--json` keeps every record).
    let is_commit = |r: &protocol::messages::AuditRecord| r.event == "integrity_commit" && r.outcome == "ok";
    let mut rows = Vec::new();
    let records = &history.records;
    let mut i = 0;
    while i < records.len() {
        let first = &records[i];
        let mut end = i + 1;
        while is_commit(first)
            && end < records.len()
            && is_commit(&records[end])
            && records[end].host_id == first.host_id
        {
            end += 1;
        }
        let last = &records[end - 1];
        if end - i > 1 {
            let seq = format!("{}-{}", first.seq, last.seq);
            let detail = format!("{} commits; newest: {}", end - i, detail(last));
            rows.push(row(seq, format!("{} x{}", first.event, end - i), last, detail));
        } else {
            rows.push(row(first.seq.to_string(), first.event.clone(), first, detail(first)));
        }
        i = end;
    }
    let body = table(&["#", "TIME (UTC s)", "EVENT", "OUTCOME", "VM", "HOST", "BY", "DETAIL"], rows);
    let notices = break_glass_notices(history);
    let notices = if notices.is_empty() { String::new() } else { format!("{}\n\n", notices.join("\n")) };
    format!("{notices}{body}\n(the TTP verified the audit hash chain before answering)")
}

/// `bytes` in the largest binary unit that divides it exactly ("64 MiB"), else in bytes.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (unit, size) in UNITS {
        if bytes >= size && bytes.is_multiple_of(size) {
            return format!("{} {unit}", bytes / size);
        }
    }
    format!("{bytes} B")
}

#[cfg(test)]
mod tests {
    use super::{history, key_text, printable};
    use protocol::messages::{AuditRecord, HistoryResponse};

    #[test]
    fn a_rotation_shows_its_progress_and_where_it_goes_on() {
        use protocol::cloud::DomainView;
        use protocol::messages::{HeaderRecord, Registration, RotationState};
        use protocol::signing::SignedEnvelope;
        let envelope = |message: Vec<u8>| SignedEnvelope { message, signature: vec![], signer_certificate: vec![] };
        let registration = Registration {
            domain_id: "d".into(),
            version: 1,
            descriptor_hash: [1; 32],
            metadata_hash: [2; 32],
            nonce_r: [3; protocol::kdf::NONCE_BYTES],
            registered_at: 1_700_000_000,
            key_generation: 2,
        };
        let rotation = RotationState { previous_registration: envelope(vec![]), boundary: 4096, hotzone: None };
        let mut view = DomainView {
            id: "d".into(),
            owner: "dm-alice".into(),
            version: 1,
            metadata: Default::default(),
            acl: vec![],
            shared_with: vec![],
            size_bytes: 64 << 20,
            status: "in-use".into(),
            created_at: 0,
            header: HeaderRecord {
                descriptor: envelope(vec![]),
                registration: envelope(registration.encode()),
                rotation: Some(rotation),
            },
            re_encryption: None,
        };
        let shown = key_text(&view);
        assert!(
            shown.starts_with("generation 2, rotation in progress: 25 % re-encrypted (sector 4096 of 16384)"),
            "{shown}"
        );
        assert!(shown.contains("online on the host that holds it read-write"), "{shown}");
        view.status = "available".into();
        assert!(key_text(&view).ends_with("the next read-write attach finishes it"));
        view.header.rotation = None;
        assert_eq!(key_text(&view), "generation 2");
    }

    #[test]
    fn terminal_controls_from_other_parties_are_shown_escaped() {
        let hostile = "cardiology\u{1b}]0;owned\u{7}\u{1b}[2J\rfake\u{202e}txt.exe\u{9b}";
        let shown = printable(hostile);
        assert!(!shown.chars().any(|c| c.is_control() || c == '\u{202e}'), "{shown:?}");
        assert!(shown.starts_with("cardiology\\u{1b}]0;owned\\u{7}"), "{shown}");
        assert_eq!(printable("line 1\n\tline 2 \u{e9}"), "line 1\n\tline 2 \u{e9}");
    }

    #[test]
    fn history_shows_what_a_violation_report_names() {
        let record = |seq: u64, event: &str, outcome: &str, message: &str| AuditRecord {
            seq,
            at: 1_700_000_000,
            event: event.into(),
            outcome: outcome.into(),
            message: message.into(),
            domain_id: Some("d".into()),
            host_id: Some("compute-1".into()),
            vm_id: Some("vm-a".into()),
            actor: "compute-1".into(),
            prev_hash: String::new(),
            hash: String::new(),
            format: 2,
        };
        let shown = history(&HistoryResponse {
            domain_id: "d".into(),
            records: vec![
                record(1, "key_release", "ok", "key of domain d released"),
                record(
                    2,
                    "integrity_violation",
                    "integrity_violation",
                    "sector 1234: ciphertext does not match its tag",
                ),
            ],
            checkpoint: None,
            since: None,
        });
        assert!(shown.contains("integrity_violation  vm-a"), "{shown}");
        assert!(shown.contains("sector 1234: ciphertext does not match its tag"), "{shown}");
        assert!(!shown.contains("key of domain d released"), "{shown}");

        // A granted break-glass release is announced above the table, with its reason.
        let glass = record(
            9,
            "break_glass_release",
            "ok",
            "key of domain d version 3 released to vm-a on compute-1 (ro), grant by dm-er, placement by cp-1, \
             purpose emergency, reason: unconscious patient, no consent",
        );
        let shown =
            history(&HistoryResponse { domain_id: "d".into(), records: vec![glass], checkpoint: None, since: None });
        assert!(
            shown.starts_with(
                "BREAK-GLASS: vm-a read domain d on host compute-1 at 1700000000 (UTC s), by manager dm-er: \
                 unconscious patient, no consent\n"
            ),
            "{shown}"
        );

        // A run of root commits is one row; a refused commit breaks the run.
        let mut records: Vec<AuditRecord> =
            (3..=6).map(|seq| record(seq, "integrity_commit", "ok", &format!("epoch {} committed", seq - 2))).collect();
        records.push(record(7, "integrity_commit", "integrity_epoch_stale", "epoch 1 again"));
        records.push(record(8, "integrity_commit", "ok", "epoch 5 committed"));
        let shown = history(&HistoryResponse { domain_id: "d".into(), records, checkpoint: None, since: None });
        assert!(shown.contains("3-6") && shown.contains("integrity_commit x4"), "{shown}");
        assert!(shown.contains("4 commits; newest: epoch 4 committed"), "{shown}");
        assert!(!shown.contains("epoch 2 committed"), "{shown}");
        assert!(shown.contains("integrity_epoch_stale") && shown.contains("epoch 5 committed"), "{shown}");
    }
}
