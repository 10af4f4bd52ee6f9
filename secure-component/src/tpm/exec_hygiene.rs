//! Keeping the TPM connection out of child processes. The TSS opens its TPM sockets without
//! close-on-exec, and swtpm serves one connection at a time: a long-lived child that kept a
//! copy of a connection its owner closed would make the owner's next connection wait for
//! as long as the child lives.

/// Marks every socket of this process that lacks close-on-exec (the TSS opens its TPM
/// sockets without it; everything Rust opens has it) close-on-exec, so that a program this
/// process starts (mkfs, virsh, a swtpm) does not keep a copy of the TPM connection: swtpm
/// serves one connection at a time and would not answer this process's next one while a
/// child still held the old one.
pub(super) fn close_sockets_on_exec() {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else { return };
    for entry in entries.flatten() {
        let Some(fd) = entry.file_name().to_str().and_then(|name| name.parse::<libc::c_int>().ok()) else {
            continue;
        };
        let is_socket =
            std::fs::read_link(entry.path()).is_ok_and(|target| target.to_string_lossy().starts_with("socket:"));
        if !is_socket {
            continue;
        }
        // SAFETY: fcntl on a descriptor number only reads or sets its flags; a number that was
        // closed meanwhile makes it fail with EBADF, which is ignored.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
}

/// Makes `command`'s child inherit no descriptor of this process but stdio, whatever other
/// threads opened without close-on-exec meanwhile (a TPM connection being set up, say). For
/// every long-lived child: a swtpm, a service started as a child process, a VM.
pub fn close_inherited_fds_on_exec(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and makes one
    // async-signal-safe system call: close_range with CLOSE_RANGE_CLOEXEC marks every
    // descriptor from 3 up close-on-exec (stdio is in place by then; std's own error pipe is
    // close-on-exec already). Its result is ignored: on a kernel without close_range the
    // child inherits as before.
    unsafe {
        command.pre_exec(|| {
            const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
            libc::syscall(libc::SYS_close_range, 3 as libc::c_uint, libc::c_uint::MAX, CLOSE_RANGE_CLOEXEC);
            Ok(())
        });
    }
}
