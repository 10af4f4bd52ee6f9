//! Running the external tools (mmdebstrap, mke2fs, qemu-img, ...) with errors that say which
//! step failed, the command, and the end of its output; progress bars on long steps.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::error::{Error, Result};

fn missing_tool_hint(program: &str) -> String {
    let package = match program {
        "mmdebstrap" => "mmdebstrap",
        "mke2fs" | "debugfs" | "dumpe2fs" | "e2fsck" => "e2fsprogs",
        "qemu-img" => "qemu-utils",
        "oscap-chroot" => "openscap-utils",
        "gpgv" => "gpgv",
        "mkfs.vfat" => "dosfstools",
        "mcopy" | "mmd" => "mtools",
        "tar" => "tar",
        _ => "the package that provides it",
    };
    format!("{program} is not on PATH; install the Debian package {package} (scripts/install-deps.sh does)")
}

fn describe(program: &str, args: &[&str]) -> String {
    let mut s = program.to_string();
    for a in args {
        s.push(' ');
        s.push_str(a);
    }
    if s.len() > 400 {
        s.truncate(400);
        s.push_str(" …");
    }
    s
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs a command to completion; returns stdout. Fails with the step name, the command and
/// the last lines of its output.
pub fn run(step: &str, program: &str, args: &[&str], env: &[(&str, &str)]) -> Result<String> {
    let output = Command::new(program).args(args).envs(env.iter().copied()).stdin(Stdio::null()).output().map_err(
        |e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                Error::MissingTool { tool: program.into(), hint: missing_tool_hint(program) }
            }
            _ => Error::StepFailed {
                step: step.into(),
                command: describe(program, args),
                status: "could not start".into(),
                output: e.to_string(),
            },
        },
    )?;
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(Error::StepFailed {
            step: step.into(),
            command: describe(program, args),
            status: output.status.to_string(),
            output: tail(&format!("{stdout}\n{stderr}"), 25),
        });
    }
    Ok(stdout)
}

/// Runs a long command, showing its latest output line on a spinner.
pub fn run_with_spinner(
    step: &str,
    program: &str,
    args: &[String],
    env: &[(String, String)],
    bar: &ProgressBar,
) -> Result<String> {
    let mut child = Command::new(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                Error::MissingTool { tool: program.into(), hint: missing_tool_hint(program) }
            }
            _ => Error::StepFailed {
                step: step.into(),
                command: program.into(),
                status: "could not start".into(),
                output: e.to_string(),
            },
        })?;
    let stdout = child.stdout.take();
    let out_thread = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(out) = stdout {
            for line in BufReader::new(out).lines().map_while(|l| l.ok()) {
                s.push_str(&line);
                s.push('\n');
            }
        }
        s
    });
    let mut log = String::new();
    if let Some(err) = child.stderr.take() {
        for line in BufReader::new(err).lines().map_while(|l| l.ok()) {
            let short: String = line.chars().take(90).collect();
            bar.set_message(format!("{step}: {short}"));
            log.push_str(&line);
            log.push('\n');
        }
    }
    let status = child.wait().map_err(|e| Error::StepFailed {
        step: step.into(),
        command: program.into(),
        status: "wait failed".into(),
        output: e.to_string(),
    })?;
    let stdout = out_thread.join().unwrap_or_default();
    if !status.success() {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        return Err(Error::StepFailed {
            step: step.into(),
            command: describe(program, &refs),
            status: status.to_string(),
            output: tail(&log, 25),
        });
    }
    Ok(format!("{stdout}{log}"))
}

/// A spinner for one long step (hidden when stderr is not a terminal).
pub fn spinner(message: &str) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.set_message(message.to_string());
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// A byte-count bar for encrypting/decrypting/hashing large files.
pub fn byte_bar(message: &str, total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(message.to_string());
    bar
}

/// The version line of a tool, for the provenance record ("unknown" if it cannot tell).
pub fn tool_version(program: &str, args: &[&str]) -> String {
    match Command::new(program).args(args).output() {
        Ok(o) => {
            let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
            text.lines().next().unwrap_or("unknown").trim().to_string()
        }
        Err(_) => "not installed".into(),
    }
}
