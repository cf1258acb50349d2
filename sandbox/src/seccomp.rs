//! The seccomp filter of a RUN command: Docker's default profile (moby's `default.json`) for
//! x86_64 and aarch64, as it applies to a container with Docker's default capabilities. Every
//! syscall not listed fails with `EPERM`; `clone` is allowed only without namespace flags (no
//! nested user namespace, whose root would hold a full capability set); `personality` only
//! with the personas Docker allows; `clone3` fails with `ENOSYS`, so that libc falls back to
//! `clone`, whose flags the filter can see. Not listed, as in Docker: `unshare`, `setns`,
//! `mount`, `umount2`, `pivot_root`, `keyctl`, `add_key`, `request_key`, `bpf`,
//! `perf_event_open`, `userfaultfd`, `kexec_load`, the module calls, `reboot`, `swapon`,
//! clock setting, `acct`, `quotactl`, `open_by_handle_at`, `fanotify_init`, `lookup_dcookie`,
//! `vhangup`, `iopl`/`ioperm`, `syslog`, ... `ptrace` is allowed (Docker allows it on kernels
//! since 4.8, where it can no longer bypass seccomp).
//!
//! The programs are compiled once per process by `seccompiler` (in the parent: it allocates)
//! and installed by the child with `seccomp(SECCOMP_SET_MODE_FILTER)` after the mounts, before
//! the capability drop and the user switch: `no_new_privs` stays off (as in Docker, so that
//! setuid programs of the image work), which makes installing a filter need `CAP_SYS_ADMIN`.
//! What runs after it (capset, setgroups, setgid, setuid, prctl, close_range, execve) is
//! allowed by the filter.
//!
//! What this module deliberately is not: a profile language (the list is Docker's, fixed), or
//! a filter for 32-bit x86 or x32 programs (their calls do not match the native architecture
//! and are refused: a RUN step runs its image's native programs, or a foreign architecture's
//! under qemu-user, whose own syscalls are native).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};

use crate::failure::SandboxError;

/// The namespace flags of `clone` (`CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS |
/// CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET`): a `clone` with any of them is
/// refused, as Docker's profile refuses it without `CAP_SYS_ADMIN`.
const CLONE_NAMESPACE_FLAGS: u64 = 0x7E02_0000;

/// The personas Docker's profile allows `personality` to set: `PER_LINUX`, `PER_LINUX32`,
/// `UNAME26`, `PER_LINUX32 | UNAME26`, and the query `0xffffffff`.
const PERSONAS: [u64; 5] = [0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff];

macro_rules! syscalls {
    ($($name:ident),* $(,)?) => { [$(libc::$name),*] };
}

/// Syscalls allowed unconditionally on both architectures.
const COMMON: &[libc::c_long] = &syscalls![
    SYS_accept,
    SYS_accept4,
    SYS_adjtimex,
    SYS_bind,
    SYS_brk,
    SYS_capget,
    SYS_capset,
    SYS_chdir,
    SYS_chroot,
    SYS_clock_adjtime,
    SYS_clock_getres,
    SYS_clock_gettime,
    SYS_clock_nanosleep,
    SYS_close,
    SYS_close_range,
    SYS_connect,
    SYS_copy_file_range,
    SYS_dup,
    SYS_dup3,
    SYS_epoll_create1,
    SYS_epoll_ctl,
    SYS_epoll_pwait,
    SYS_epoll_pwait2,
    SYS_eventfd2,
    SYS_execve,
    SYS_execveat,
    SYS_exit,
    SYS_exit_group,
    SYS_faccessat,
    SYS_faccessat2,
    SYS_fadvise64,
    SYS_fallocate,
    SYS_fanotify_mark,
    SYS_fchdir,
    SYS_fchmod,
    SYS_fchmodat,
    SYS_fchown,
    SYS_fchownat,
    SYS_fcntl,
    SYS_fdatasync,
    SYS_fgetxattr,
    SYS_flistxattr,
    SYS_flock,
    SYS_fremovexattr,
    SYS_fsetxattr,
    SYS_fstat,
    SYS_fstatfs,
    SYS_fsync,
    SYS_ftruncate,
    SYS_futex,
    SYS_futex_waitv,
    SYS_getcpu,
    SYS_getcwd,
    SYS_getdents64,
    SYS_getegid,
    SYS_geteuid,
    SYS_getgid,
    SYS_getgroups,
    SYS_getitimer,
    SYS_getpeername,
    SYS_getpgid,
    SYS_getpid,
    SYS_getppid,
    SYS_getpriority,
    SYS_getrandom,
    SYS_getresgid,
    SYS_getresuid,
    SYS_getrlimit,
    SYS_get_robust_list,
    SYS_getrusage,
    SYS_getsid,
    SYS_getsockname,
    SYS_getsockopt,
    SYS_gettid,
    SYS_gettimeofday,
    SYS_getuid,
    SYS_getxattr,
    SYS_get_mempolicy,
    SYS_inotify_add_watch,
    SYS_inotify_init1,
    SYS_inotify_rm_watch,
    SYS_io_cancel,
    SYS_ioctl,
    SYS_io_destroy,
    SYS_io_getevents,
    SYS_ioprio_get,
    SYS_ioprio_set,
    SYS_io_setup,
    SYS_io_submit,
    SYS_kcmp,
    SYS_kill,
    SYS_landlock_add_rule,
    SYS_landlock_create_ruleset,
    SYS_landlock_restrict_self,
    SYS_lgetxattr,
    SYS_linkat,
    SYS_listen,
    SYS_listxattr,
    SYS_llistxattr,
    SYS_lremovexattr,
    SYS_lseek,
    SYS_lsetxattr,
    SYS_madvise,
    SYS_mbind,
    SYS_membarrier,
    SYS_memfd_create,
    SYS_mincore,
    SYS_mkdirat,
    SYS_mknodat,
    SYS_mlock,
    SYS_mlock2,
    SYS_mlockall,
    SYS_mmap,
    SYS_mprotect,
    SYS_mq_getsetattr,
    SYS_mq_notify,
    SYS_mq_open,
    SYS_mq_timedreceive,
    SYS_mq_timedsend,
    SYS_mq_unlink,
    SYS_mremap,
    SYS_msgctl,
    SYS_msgget,
    SYS_msgrcv,
    SYS_msgsnd,
    SYS_msync,
    SYS_munlock,
    SYS_munlockall,
    SYS_munmap,
    SYS_name_to_handle_at,
    SYS_nanosleep,
    SYS_newfstatat,
    SYS_openat,
    SYS_openat2,
    SYS_pidfd_getfd,
    SYS_pidfd_open,
    SYS_pidfd_send_signal,
    SYS_pipe2,
    SYS_pkey_alloc,
    SYS_pkey_free,
    SYS_pkey_mprotect,
    SYS_ppoll,
    SYS_prctl,
    SYS_pread64,
    SYS_preadv,
    SYS_preadv2,
    SYS_prlimit64,
    SYS_process_mrelease,
    SYS_process_vm_readv,
    SYS_process_vm_writev,
    SYS_pselect6,
    SYS_ptrace,
    SYS_pwrite64,
    SYS_pwritev,
    SYS_pwritev2,
    SYS_read,
    SYS_readahead,
    SYS_readlinkat,
    SYS_readv,
    SYS_recvfrom,
    SYS_recvmmsg,
    SYS_recvmsg,
    SYS_remap_file_pages,
    SYS_removexattr,
    SYS_renameat,
    SYS_renameat2,
    SYS_restart_syscall,
    SYS_rseq,
    SYS_rt_sigaction,
    SYS_rt_sigpending,
    SYS_rt_sigprocmask,
    SYS_rt_sigqueueinfo,
    SYS_rt_sigreturn,
    SYS_rt_sigsuspend,
    SYS_rt_sigtimedwait,
    SYS_rt_tgsigqueueinfo,
    SYS_sched_getaffinity,
    SYS_sched_getattr,
    SYS_sched_getparam,
    SYS_sched_get_priority_max,
    SYS_sched_get_priority_min,
    SYS_sched_getscheduler,
    SYS_sched_rr_get_interval,
    SYS_sched_setaffinity,
    SYS_sched_setattr,
    SYS_sched_setparam,
    SYS_sched_setscheduler,
    SYS_sched_yield,
    SYS_seccomp,
    SYS_semctl,
    SYS_semget,
    SYS_semop,
    SYS_semtimedop,
    SYS_sendfile,
    SYS_sendmmsg,
    SYS_sendmsg,
    SYS_sendto,
    SYS_setdomainname,
    SYS_setfsgid,
    SYS_setfsuid,
    SYS_setgid,
    SYS_setgroups,
    SYS_sethostname,
    SYS_setitimer,
    SYS_set_mempolicy,
    SYS_setpgid,
    SYS_setpriority,
    SYS_setregid,
    SYS_setresgid,
    SYS_setresuid,
    SYS_setreuid,
    SYS_setrlimit,
    SYS_set_robust_list,
    SYS_setsid,
    SYS_setsockopt,
    SYS_set_tid_address,
    SYS_setuid,
    SYS_setxattr,
    SYS_shmat,
    SYS_shmctl,
    SYS_shmdt,
    SYS_shmget,
    SYS_shutdown,
    SYS_sigaltstack,
    SYS_signalfd4,
    SYS_socket,
    SYS_socketpair,
    SYS_splice,
    SYS_statfs,
    SYS_statx,
    SYS_symlinkat,
    SYS_sync,
    SYS_sync_file_range,
    SYS_syncfs,
    SYS_sysinfo,
    SYS_tee,
    SYS_tgkill,
    SYS_timer_create,
    SYS_timer_delete,
    SYS_timer_getoverrun,
    SYS_timer_gettime,
    SYS_timer_settime,
    SYS_timerfd_create,
    SYS_timerfd_gettime,
    SYS_timerfd_settime,
    SYS_times,
    SYS_tkill,
    SYS_truncate,
    SYS_umask,
    SYS_uname,
    SYS_unlinkat,
    SYS_utimensat,
    SYS_vmsplice,
    SYS_wait4,
    SYS_waitid,
    SYS_write,
    SYS_writev,
];

/// The older calls x86_64 has besides (aarch64 has only their `*at` and `2` forms).
#[cfg(target_arch = "x86_64")]
const ARCHITECTURE: &[libc::c_long] = &syscalls![
    SYS_access,
    SYS_alarm,
    SYS_arch_prctl,
    SYS_chmod,
    SYS_chown,
    SYS_creat,
    SYS_dup2,
    SYS_epoll_create,
    SYS_epoll_wait,
    SYS_eventfd,
    SYS_fork,
    SYS_futimesat,
    SYS_getdents,
    SYS_getpgrp,
    SYS_inotify_init,
    SYS_lchown,
    SYS_link,
    SYS_lstat,
    SYS_mkdir,
    SYS_mknod,
    SYS_modify_ldt,
    SYS_open,
    SYS_pause,
    SYS_pipe,
    SYS_poll,
    SYS_readlink,
    SYS_rename,
    SYS_rmdir,
    SYS_select,
    SYS_signalfd,
    SYS_stat,
    SYS_symlink,
    SYS_time,
    SYS_unlink,
    SYS_utime,
    SYS_utimes,
    SYS_vfork,
];
#[cfg(target_arch = "aarch64")]
const ARCHITECTURE: &[libc::c_long] = &[];

#[cfg(target_arch = "x86_64")]
const TARGET: seccompiler::TargetArch = seccompiler::TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const TARGET: seccompiler::TargetArch = seccompiler::TargetArch::aarch64;

/// The two filters (both are installed; the kernel applies the stricter answer): Docker's
/// allowlist, and `clone3` → `ENOSYS`.
pub(crate) struct Programs {
    pub(crate) allowlist: BpfProgram,
    pub(crate) clone3: BpfProgram,
}

/// The programs, compiled on first use.
pub(crate) fn programs() -> Result<&'static Programs, SandboxError> {
    static PROGRAMS: OnceLock<Result<Programs, String>> = OnceLock::new();
    PROGRAMS.get_or_init(compile).as_ref().map_err(|reason| SandboxError::Io {
        action: "compile the RUN sandbox's seccomp filter",
        source: std::io::Error::other(reason.clone()),
    })
}

fn compile() -> Result<Programs, String> {
    let condition = |index: u8, operator: SeccompCmpOp, value: u64| {
        SeccompCondition::new(index, SeccompCmpArgLen::Qword, operator, value).map_err(|error| error.to_string())
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for call in COMMON.iter().chain(ARCHITECTURE) {
        rules.insert(*call, Vec::new());
    }
    let no_namespaces = condition(0, SeccompCmpOp::MaskedEq(CLONE_NAMESPACE_FLAGS), 0)?;
    rules.insert(libc::SYS_clone, vec![SeccompRule::new(vec![no_namespaces]).map_err(|error| error.to_string())?]);
    let mut personas = Vec::new();
    for persona in PERSONAS {
        let equal = condition(0, SeccompCmpOp::Eq, persona)?;
        personas.push(SeccompRule::new(vec![equal]).map_err(|error| error.to_string())?);
    }
    rules.insert(libc::SYS_personality, personas);
    let allowlist = SeccompFilter::new(rules, SeccompAction::Errno(libc::EPERM as u32), SeccompAction::Allow, TARGET)
        .and_then(BpfProgram::try_from)
        .map_err(|error| error.to_string())?;
    let clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TARGET,
    )
    .and_then(BpfProgram::try_from)
    .map_err(|error| error.to_string())?;
    Ok(Programs { allowlist, clone3 })
}

/// Installs `program` on the calling thread: `seccomp(SECCOMP_SET_MODE_FILTER, 0, &prog)`.
/// Runs in the sandbox child: one raw syscall, no allocation.
pub(crate) fn install(program: &BpfProgram) -> Result<(), rustix::io::Errno> {
    let filter = libc::sock_fprog {
        len: program.len() as libc::c_ushort,
        // `seccompiler::sock_filter` is `repr(C)` with the kernel's layout, as libc's is.
        filter: program.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: the kernel reads `len` instructions from `filter`, which `program` holds for the
    // duration of the call.
    let result = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0 as libc::c_ulong,
            &filter as *const libc::sock_fprog,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(rustix::io::Errno::from_raw_os_error(std::io::Error::last_os_error().raw_os_error().unwrap_or(0)))
    }
}
