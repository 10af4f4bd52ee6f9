//! `domain-manager`: the hospital admin's CLI for Skydd domains.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use domain_manager::config::DmConfig;
use domain_manager::ops::{parse_acl_entry, parse_metadata, parse_size, DomainManager, DEFAULT_GRANT_SECS};
use domain_manager::render;
use protocol::domain::{AccessMode, VolumeFormat};

#[derive(Parser)]
#[command(
    name = "domain-manager",
    about = "Own Skydd domains: encrypted volumes whose key only attested hosts can get, for the VMs you list",
    long_about = "A domain is an encrypted volume with metadata and an access list of VMs (ro or rw). You sign every \
version of it; the cloud platform stores it but never sees its key; the TTP releases the key only to an attested \
compute host for a VM in your list, and records every release and refusal in the viewing history.\n\n\
Typical session:\n  domain-manager domain create --meta department=cardiology --vm vm-a:rw --vm vm-b:ro --size 64M\n  \
domain-manager attach DOMAIN --vm vm-a --mode rw\n  domain-manager domain revoke DOMAIN --vm vm-b\n  domain-manager domain history DOMAIN"
)]
struct Cli {
    /// Configuration file (cloud platform URL, TTP URL, CA, your certificate and key).
    #[arg(long, global = true, env = "SKYDD_DM_CONFIG", default_value = "domain-manager.toml")]
    config: PathBuf,
    /// Print JSON for scripts instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create, inspect and change domains.
    #[command(subcommand)]
    Domain(DomainCommand),
    /// Attach a domain to a VM (signs a short-lived mount grant).
    Attach {
        domain: String,
        #[arg(long)]
        vm: String,
        /// ro or rw; must be covered by the VM's access.
        #[arg(long, default_value = "ro")]
        mode: AccessMode,
        /// Seconds the mount grant stays valid (1 to 3600: the TTP refuses longer grants
        /// with grant_too_long).
        #[arg(long, default_value_t = DEFAULT_GRANT_SECS,
              value_parser = clap::value_parser!(u64).range(1..=protocol::messages::MAX_GRANT_VALIDITY_SECS))]
        valid_for: u64,
        /// The purpose of use, signed into the grant for the domain's access policy:
        /// treatment, research, emergency (break-glass: needs --reason, and the owner's
        /// history announces it), ... (a-z 0-9 _ -, at most 32).
        #[arg(long, default_value = "")]
        purpose: String,
        /// Why, in a sentence (signed into the grant; required with --purpose emergency).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Detach a domain from a VM.
    Detach {
        domain: String,
        #[arg(long)]
        vm: String,
    },
    /// The attachments of your domains (the cloud's topology is the operator's).
    #[command(subcommand)]
    Vm(VmCommand),
    /// Serve a Block Storage v3 compatible endpoint for OpenStack clients (python-openstackclient,
    /// python-cinderclient) on this machine; every call is signed here with your key.
    #[command(
        long_about = "Serves the part of the OpenStack Block Storage v3 API (and of Compute v2.1 for `server add volume` / \
`server remove volume`) that the OpenStack clients use, on plain HTTP on loopback. Each call becomes Skydd operations \
signed here with your key and sent to the cloud platform over mutual TLS, as the other commands do: volumes are \
domains, attachments are mount grants and attaches. Clients use `auth_type: none` and endpoint overrides \
(docs/OPENSTACK.md has the clouds.yaml).\n\nThe gateway listens on loopback only unless --allow-remote is given: it has \
no authentication of its own, so whoever can reach it acts as you, with your signing key."
    )]
    ServeOpenstack {
        /// Address to listen on; port 0 picks a free port (printed on the first line).
        #[arg(long, default_value = "127.0.0.1:8776")]
        listen: std::net::SocketAddr,
        /// Allow a non-loopback --listen address. Whoever reaches the gateway acts with your signing
        /// key; give this only behind a firewall or tunnel that restricts who can.
        #[arg(long)]
        allow_remote: bool,
        /// The access policy of a volume created without a `skydd:acl` property: VM:ro or VM:rw
        /// (repeatable).
        #[arg(long = "default-vm")]
        default_vms: Vec<String>,
        /// A VM of the cloud, answered as a server by the compute API (repeatable). The operator
        /// keeps the topology: the gateway cannot list the cloud's VMs itself.
        #[arg(long = "server")]
        servers: Vec<String>,
    },
}

#[derive(Subcommand)]
enum DomainCommand {
    /// Create a domain you own (version 1).
    Create {
        /// Metadata KEY=VALUE (repeatable). Bound into the key: it can never change.
        #[arg(long = "meta")]
        metadata: Vec<String>,
        /// A VM and its access, VM:ro or VM:rw (repeatable).
        #[arg(long = "vm")]
        vms: Vec<String>,
        /// Another domain manager who may attach it and read its history (repeatable).
        #[arg(long = "share")]
        shared_with: Vec<String>,
        /// Data size, e.g. 64M or 10G.
        #[arg(long, default_value = "64M")]
        size: String,
        /// On-disk format: 2 adds a tag per sector and a hash tree whose root the TTP
        /// anchors, so a provider's tampering reads as an error and an old copy is refused;
        /// 1 is encryption alone (docs/FORMAT.md).
        #[arg(long, default_value = "2", value_parser = ["1", "2"])]
        format: String,
    },
    /// Make a format-1 domain format 2 (tamper- and rollback-evident). The secure component
    /// of the next read-write attach builds the tree and commits its first root; a read-only
    /// attach is refused until then. Safe to interrupt.
    Upgrade { domain: String },
    /// Domains you own or that are shared with you.
    List,
    /// One domain: version, metadata, access list, sharing.
    Show { domain: String },
    /// Give a VM access, or change its mode (a new signed version).
    Grant {
        domain: String,
        /// VM:ro or VM:rw
        #[arg(long)]
        vm: String,
    },
    /// Take a VM's access away; the cloud platform detaches it.
    Revoke {
        domain: String,
        #[arg(long)]
        vm: String,
        /// Then rotate the domain's key, so a copy of the old key reads nothing written after
        /// the re-encryption (docs/PROTOCOL.md "Key rotation").
        #[arg(long)]
        rotate: bool,
        /// With --rotate: leave the re-encryption to the next read-write attach even if a VM
        /// holds the domain read-write now.
        #[arg(long, requires = "rotate")]
        offline: bool,
    },
    /// Give the domain a new key and re-encrypt its volume to it.
    ///
    /// If a VM holds the domain read-write now, its host re-encrypts the volume online while
    /// the VM keeps reading and writing (a mount grant for that VM, purpose `key-rotation`, is
    /// signed for it and shows in the viewing history). Otherwise, or with --offline, the next
    /// read-write attach re-encrypts before the VM sees the volume. Until the re-encryption
    /// ends, read-only attaches and new rotations are refused (`key_rotation_in_progress`).
    Rotate {
        domain: String,
        /// Leave the re-encryption to the next read-write attach.
        #[arg(long)]
        offline: bool,
    },
    /// Share with another domain manager (it may attach and read the history).
    Share {
        domain: String,
        #[arg(long)]
        with: String,
        /// Remove the sharing instead.
        #[arg(long)]
        remove: bool,
    },
    /// Every key release and refusal for this domain, from the TTP; break-glass releases
    /// are announced above the table.
    History { domain: String },
    /// The domain's access policy (Cedar), checked by the TTP at every key release.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Crypto-shred the domain: its key can never be derived again.
    Delete {
        domain: String,
        /// Confirm: this cannot be undone.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Set the access policy from a Cedar file (a new signed version).
    #[command(long_about = policy_help())]
    Set {
        domain: String,
        /// The policy file (Cedar, UTF-8, at most 64 KiB).
        #[arg(long)]
        file: PathBuf,
    },
    /// Print the access policy in force (verified against your signature).
    Show { domain: String },
    /// Remove the access policy: the access list alone decides again (a new signed version).
    Clear { domain: String },
}

/// `domain policy set --help`: what a policy sees, and an example.
fn policy_help() -> String {
    format!("{POLICY_HELP}{}", protocol::policy::EXAMPLE_POLICY)
}

const POLICY_HELP: &str =
    "Sets the domain's access policy: Cedar policies the TTP checks at every key release, after the access list \
(a VM must be in the list AND a policy must permit; a forbid always wins). The TTP refuses a policy that does not \
parse or validate against the schema (policy_invalid) and names Cedar's error. A release is denied \
(policy_denied) unless a permit applies.\n\n\
What a policy sees (docs/PROTOCOL.md \"Access policy\"):\n  \
principal  Vm::\"<vm id>\"\n  \
action     Action::\"attach_ro\" or Action::\"attach_rw\" (the mode asked)\n  \
resource   Domain::\"<id>\" with .owner, .version, and metadata as tags (resource.getTag(\"department\"))\n  \
context    .now (unix s), .purpose, .reason, .grant_signer, .grant_lifetime_seconds (the grant's remaining \
validity), .host.id, .host.region (optional: test with `context.host has region`), .image.digest (optional: \
`context has image`)\n\n\
The purpose and reason come from the signed grant: `domain-manager attach D --vm V --purpose treatment`. Purpose \
\"emergency\" is break-glass: the TTP refuses it without a --reason whatever the policy says, and your `domain \
history` announces every one.\n\nExample (the @id names a policy in refusals and the audit record):\n\n";

#[derive(Subcommand)]
enum VmCommand {
    /// The attachments of your domains: which VM has which domain open, where, and how.
    List,
}

fn print<T: serde::Serialize>(json: bool, value: &T, table: impl FnOnce(&T) -> String) {
    if json {
        match serde_json::to_string_pretty(value) {
            Ok(text) => println!("{text}"),
            Err(e) => eprintln!("cannot encode JSON: {e}"),
        }
    } else {
        println!("{}", render::printable(&table(value)));
    }
}

/// What `domain rotate` and `domain revoke --rotate` tell the owner: where the re-encryption
/// runs (the cloud platform's word) and what holds until it ends.
fn rotated(view: &protocol::cloud::DomainView) -> String {
    let re_encryption = view.re_encryption.as_deref().unwrap_or("at the next read-write attach");
    format!(
        "The domain has a new key. The volume is re-encrypted {re_encryption}.\n\
         Until that ends only a read-write attach is served; after it the old key reads nothing."
    )
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // Refusals quote names and values others chose (metadata, VM ids).
            eprintln!("error: {}", render::printable(&error.to_string()));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> domain_manager::Result<()> {
    if let Command::ServeOpenstack { listen, allow_remote, .. } = &cli.command {
        // Before the key is loaded: a gateway that would expose it is not started at all.
        domain_manager::openstack::check_listen_address(listen, *allow_remote)?;
    }
    let config = DmConfig::load(&cli.config)?;
    let dm = DomainManager::connect(&config)?;
    let json = cli.json;
    match cli.command {
        Command::Domain(DomainCommand::Create { metadata, vms, shared_with, size, format }) => {
            let metadata = metadata.iter().map(|m| parse_metadata(m)).collect::<Result<_, _>>()?;
            let acl = vms.iter().map(|v| parse_acl_entry(v)).collect::<Result<_, _>>()?;
            let format = if format == "1" { VolumeFormat::V1 } else { VolumeFormat::V2 };
            let domain = dm.create_with_format(metadata, acl, shared_with, parse_size(&size)?, format).await?;
            print(json, &domain, render::domain);
            if !json {
                println!("\nnext: attach it with `domain-manager attach {} --vm VM --mode rw`", domain.id);
            }
        }
        Command::Domain(DomainCommand::Upgrade { domain }) => {
            let view = dm.upgrade(&domain).await?;
            print(json, &view, render::domain);
            if !json {
                println!(
                    "\n{domain} is format 2 from version {}: its next read-write attach builds the hash tree and \
                     commits the first root to the TTP.",
                    view.version
                );
            }
        }
        Command::Domain(DomainCommand::List) => print(json, &dm.list().await?, |d| render::domains(d)),
        Command::Domain(DomainCommand::Show { domain }) => print(json, &dm.show(&domain).await?, render::domain),
        Command::Domain(DomainCommand::Grant { domain, vm }) => {
            let entry = parse_acl_entry(&vm)?;
            let view = dm.grant(&domain, &entry.vm_id, entry.mode).await?;
            print(json, &view, render::domain);
        }
        Command::Domain(DomainCommand::Revoke { domain, vm, rotate, offline }) => {
            let mut view = dm.revoke(&domain, &vm).await?;
            if rotate {
                view = dm.rotate(&domain, !offline).await?;
            }
            print(json, &view, render::domain);
            if !json {
                println!("\n{vm} can no longer obtain the key; any attachment of it was detached.");
                if rotate {
                    println!("{}", rotated(&view));
                }
            }
        }
        Command::Domain(DomainCommand::Rotate { domain, offline }) => {
            let view = dm.rotate(&domain, !offline).await?;
            print(json, &view, render::domain);
            if !json {
                println!("\n{}", rotated(&view));
            }
        }
        Command::Domain(DomainCommand::Share { domain, with, remove }) => {
            let view = if remove { dm.unshare(&domain, &with).await? } else { dm.share(&domain, &with).await? };
            print(json, &view, render::domain);
        }
        Command::Domain(DomainCommand::History { domain }) => print(json, &dm.history(&domain).await?, render::history),
        Command::Domain(DomainCommand::Policy(PolicyCommand::Set { domain, file })) => {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| domain_manager::Error::Usage(format!("cannot read the policy {}: {e}", file.display())))?;
            let view = dm.set_policy(&domain, Some(text)).await?;
            print(json, &view, render::domain);
            if !json {
                println!("\nthe TTP validated the policy; it decides every key release from version {}", view.version);
            }
        }
        Command::Domain(DomainCommand::Policy(PolicyCommand::Show { domain })) => {
            let policy = dm.policy(&domain).await?;
            if json {
                print(true, &serde_json::json!({ "domain_id": domain, "policy": policy }), |_| String::new());
            } else {
                match policy {
                    Some(text) => println!("{}", render::printable(&text)),
                    None => println!("{domain} has no access policy: its access list alone decides"),
                }
            }
        }
        Command::Domain(DomainCommand::Policy(PolicyCommand::Clear { domain })) => {
            let view = dm.set_policy(&domain, None).await?;
            print(json, &view, render::domain);
        }
        Command::Domain(DomainCommand::Delete { domain, yes }) => {
            if !yes {
                return Err(domain_manager::Error::Usage(format!(
                    "deleting {domain} destroys its key for good; repeat with --yes to confirm"
                )));
            }
            let view = dm.delete(&domain).await?;
            print(json, &view, render::domain);
        }
        Command::Attach { domain, vm, mode, valid_for, purpose, reason } => {
            let attachment = dm.attach_for_purpose(&domain, &vm, mode, valid_for, &purpose, &reason).await?;
            print(json, &attachment, |a| render::attachments(std::slice::from_ref(a)));
        }
        Command::Detach { domain, vm } => {
            let attachment = dm.detach(&domain, &vm).await?;
            print(json, &attachment, |a| render::attachments(std::slice::from_ref(a)));
        }
        Command::ServeOpenstack { listen, allow_remote: _, default_vms, servers } => {
            let default_acl = default_vms.iter().map(|v| parse_acl_entry(v)).collect::<Result<_, _>>()?;
            for server in &servers {
                protocol::domain::validate_name("server", server)?;
            }
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .map_err(|e| domain_manager::Error::Usage(format!("cannot listen on {listen}: {e}")))?;
            let address = listener.local_addr().map_err(|e| domain_manager::Error::Usage(e.to_string()))?;
            println!("serving the OpenStack gateway for {} on http://{address}", dm.name);
            println!("clouds.yaml:\n  clouds:\n    skydd:\n      auth_type: none\n      block_storage_endpoint_override: http://{address}/v3\n      compute_endpoint_override: http://{address}/v2.1\n      identity_endpoint_override: http://{address}/identity\n      image_endpoint_override: http://{address}/image");
            let options = domain_manager::openstack::GatewayOptions { default_acl, servers };
            domain_manager::openstack::serve(listener, domain_manager::openstack::Gateway::new(dm, options)).await?;
        }
        Command::Vm(VmCommand::List) => {
            // The attachments of the caller's domains; where other VMs run is the operator's
            // to know (docs/CLOUD-API.md, "Who may call what").
            let attachments = dm.attachments().await?;
            if json {
                print(true, &serde_json::json!({ "attachments": attachments }), |_| String::new());
            } else {
                println!("{}", render::printable(&render::attachments(&attachments)));
            }
        }
    }
    Ok(())
}
