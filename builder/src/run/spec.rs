//! What a RUN command executes as: its argv, environment, working directory and user, resolved
//! from the image config as it stands and the step's own options, the way Docker resolves them.
//!
//! - argv: a shell string runs as the config's `Shell` (default `/bin/sh -c`) plus the string;
//!   an argv runs as given. A program name without `/` is looked up in the `PATH` of the
//!   command's environment, inside the image (the candidates are listed here and tried in order
//!   by the sandbox, as `execvp` does).
//! - env: the config's `Env`, then the step's variables (a later value of a name wins), `PATH`
//!   defaulted as Docker does, `HOME` from the user's passwd entry (else `/root` or `/`).
//! - workdir: the step's (relative to the config's), else the config's `WorkingDir`, else `/`.
//! - user: `uid[:gid]` numeric, or names looked up in the image's `/etc/passwd` and
//!   `/etc/group`; supplementary groups are the groups that list the user by name (not the
//!   primary group, and none for `uid:gid`), as runc sets them.
//!
//! What it deliberately is not: anything that touches the disk or runs a process. The caller
//! reads `/etc/passwd` and `/etc/group` out of the image and hands their text in, so every
//! decision here is a pure function and unit-tested as such.

use layerwright_dsl::{Run, RunCommand, normalize_image_path};
use serde_json::Value;
use thiserror::Error;

/// The `PATH` of a command whose image config sets none (Docker's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The process a RUN step starts: the sandbox's own type, which this module fills in.
pub use layerwright_sandbox::ProcessSpec;

/// Why what a RUN command executes as could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum SpecError {
    /// The step gives its command as an argv with no elements.
    #[error("the command is an empty argv")]
    EmptyArgv,
    /// An argument or environment entry holds a NUL byte, which `execve` cannot pass.
    #[error("a command argument or environment entry contains a NUL byte: {text:?}")]
    NulByte {
        /// The argument or `NAME=value` entry.
        text: String,
    },
    /// An environment variable the step sets has an empty name or one with `=` in it.
    #[error("environment variable name {name:?} is empty or contains `=`")]
    BadEnvName {
        /// The name as given.
        name: String,
    },
    /// The working directory (the step's joined to the config's) is not a valid image path.
    #[error("working directory {workdir:?}: {reason}")]
    BadWorkdir {
        /// The working directory after joining.
        workdir: String,
        /// Why it is not a valid image path.
        reason: String,
    },
    /// The user is given by a name that the image's `/etc/passwd` does not hold.
    #[error("user {user:?} is not in the image's /etc/passwd (use a numeric uid[:gid])")]
    UnknownUser {
        /// The user name.
        user: String,
    },
    /// The group is given by a name that the image's `/etc/group` does not hold.
    #[error("group {group:?} is not in the image's /etc/group (use a numeric gid)")]
    UnknownGroup {
        /// The group name.
        group: String,
    },
    /// The user (`user[:group]`) is empty, or has an empty group after the `:`.
    #[error("user {user:?} is empty or malformed")]
    BadUser {
        /// The user as given.
        user: String,
    },
}

/// One line of `/etc/passwd`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

fn passwd_entries(passwd: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    passwd.lines().filter_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 7 || line.starts_with('#') {
            return None;
        }
        Some(PasswdEntry {
            name: fields[0],
            uid: fields[2].parse().ok()?,
            gid: fields[3].parse().ok()?,
            home: fields[5],
        })
    })
}

/// One line of `/etc/group`: name, gid, members.
fn group_entries(group: &str) -> impl Iterator<Item = (&str, u32, Vec<&str>)> {
    group.lines().filter_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 4 || line.starts_with('#') {
            return None;
        }
        let members = fields[3].split(',').filter(|member| !member.is_empty()).collect();
        Some((fields[0], fields[2].parse().ok()?, members))
    })
}

/// The `config` object of an image config document (`{}` when absent).
fn runtime_config(config: &Value) -> &Value {
    config.get("config").unwrap_or(&Value::Null)
}

fn string_array(value: Option<&Value>) -> Option<Vec<String>> {
    let items = value?.as_array()?;
    items.iter().map(|item| item.as_str().map(str::to_owned)).collect()
}

/// Resolves what `run` executes on top of an image whose config is `config`. `passwd` and
/// `group` are the image's `/etc/passwd` and `/etc/group`, when it has them.
pub fn resolve(run: &Run, config: &Value, passwd: Option<&str>, group: Option<&str>) -> Result<ProcessSpec, SpecError> {
    let runtime = runtime_config(config);
    let argv = match &run.command {
        RunCommand::Shell(command) => {
            let mut shell = string_array(runtime.get("Shell"))
                .filter(|shell| !shell.is_empty())
                .unwrap_or_else(|| vec!["/bin/sh".to_owned(), "-c".to_owned()]);
            shell.push(command.clone());
            shell
        }
        RunCommand::Argv(argv) => argv.clone(),
    };
    if argv.is_empty() || argv[0].is_empty() {
        return Err(SpecError::EmptyArgv);
    }
    if let Some(text) = argv.iter().find(|argument| argument.contains('\0')) {
        return Err(SpecError::NulByte { text: text.clone() });
    }

    let config_workdir = runtime.get("WorkingDir").and_then(Value::as_str).filter(|dir| !dir.is_empty()).unwrap_or("/");
    let workdir = resolve_workdir(config_workdir, run.workdir.as_deref())?;

    let user_text = run
        .user
        .as_deref()
        .or_else(|| runtime.get("User").and_then(Value::as_str))
        .filter(|user| !user.is_empty())
        .unwrap_or("0");
    let user = resolve_user(user_text, passwd.unwrap_or(""), group.unwrap_or(""))?;

    let mut env: Vec<String> = string_array(runtime.get("Env")).unwrap_or_default();
    for (name, value) in &run.env {
        if name.is_empty() || name.contains('=') {
            return Err(SpecError::BadEnvName { name: name.clone() });
        }
        set_variable(&mut env, name, value);
    }
    if variable(&env, "PATH").is_none() {
        env.push(format!("PATH={DEFAULT_PATH}"));
    }
    if variable(&env, "HOME").is_none() {
        env.push(format!("HOME={}", user.home));
    }
    if let Some(text) = env.iter().find(|entry| entry.contains('\0')) {
        return Err(SpecError::NulByte { text: text.clone() });
    }

    let exec_candidates = exec_candidates(&argv[0], variable(&env, "PATH").unwrap_or(DEFAULT_PATH));
    Ok(ProcessSpec { argv, env, workdir, uid: user.uid, gid: user.gid, groups: user.groups, exec_candidates })
}

/// The value of `name` in `NAME=value` entries (the last one wins, as in a shell).
fn variable<'a>(env: &'a [String], name: &str) -> Option<&'a str> {
    env.iter().rev().find_map(|entry| entry.strip_prefix(name)?.strip_prefix('='))
}

/// Replaces the entry of `name`, or appends one.
fn set_variable(env: &mut Vec<String>, name: &str, value: &str) {
    let entry = format!("{name}={value}");
    match env.iter_mut().find(|existing| existing.split_once('=').is_some_and(|(existing, _)| existing == name)) {
        Some(existing) => *existing = entry,
        None => env.push(entry),
    }
}

/// The step's workdir (relative ones relative to the config's), else the config's, as an
/// absolute normalised path.
fn resolve_workdir(config_workdir: &str, step_workdir: Option<&str>) -> Result<String, SpecError> {
    let joined = match step_workdir {
        Some(dir) if dir.starts_with('/') => dir.to_owned(),
        Some(dir) => format!("{}/{dir}", config_workdir.trim_end_matches('/')),
        None => config_workdir.to_owned(),
    };
    let normalised = normalize_image_path(&joined)
        .map_err(|error| SpecError::BadWorkdir { workdir: joined.clone(), reason: error.to_string() })?;
    Ok(format!("/{normalised}"))
}

/// A resolved user.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ResolvedUser {
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
    home: String,
}

/// `user[:group]`, each numeric or a name. As runc does: a numeric uid that passwd does not
/// know gets gid 0 and home `/`; a known user gets its passwd gid and home.
fn resolve_user(text: &str, passwd: &str, group: &str) -> Result<ResolvedUser, SpecError> {
    let (user_part, group_part) = match text.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (text, None),
    };
    if user_part.is_empty() || group_part.is_some_and(str::is_empty) {
        return Err(SpecError::BadUser { user: text.to_owned() });
    }
    let entry = match user_part.parse::<u32>() {
        Ok(uid) => passwd_entries(passwd).find(|entry| entry.uid == uid),
        Err(_) => Some(
            passwd_entries(passwd)
                .find(|entry| entry.name == user_part)
                .ok_or_else(|| SpecError::UnknownUser { user: user_part.to_owned() })?,
        ),
    };
    let uid = match (&entry, user_part.parse::<u32>()) {
        (_, Ok(uid)) => uid,
        (Some(entry), Err(_)) => entry.uid,
        (None, Err(_)) => unreachable!("a name that is not found returned above"),
    };
    let gid = match group_part {
        Some(group_text) => match group_text.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group_entries(group)
                .find(|(name, _, _)| *name == group_text)
                .map(|(_, gid, _)| gid)
                .ok_or_else(|| SpecError::UnknownGroup { group: group_text.to_owned() })?,
        },
        None => entry.as_ref().map_or(0, |entry| entry.gid),
    };
    let home = match &entry {
        Some(entry) if !entry.home.is_empty() => entry.home.to_owned(),
        _ if uid == 0 => "/root".to_owned(),
        _ => "/".to_owned(),
    };
    // As runc: the supplementary groups are the groups of the image's /etc/group that name the
    // user, without the primary group (the process has that as its gid); an explicit group, as
    // in `USER u:g`, leaves none, and so does a numeric uid passwd does not know.
    let mut groups = Vec::new();
    if group_part.is_none()
        && let Some(entry) = &entry
    {
        groups.extend(
            group_entries(group).filter(|(_, _, members)| members.contains(&entry.name)).map(|(_, gid, _)| gid),
        );
    }
    groups.sort_unstable();
    groups.dedup();
    Ok(ResolvedUser { uid, gid, groups, home })
}

/// Where `execve` looks for `program`: itself when it names a path, else each `PATH` entry
/// (an empty entry is the working directory, as in `execvp`).
fn exec_candidates(program: &str, path: &str) -> Vec<String> {
    if program.contains('/') {
        return vec![program.to_owned()];
    }
    path.split(':')
        .map(|directory| match directory {
            "" => format!("./{program}"),
            directory => format!("{}/{program}", directory.trim_end_matches('/')),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                          app:x:1000:1001:app:/home/app:/bin/sh\n\
                          nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
    const GROUP: &str = "root:x:0:\nstaff:x:50:app,other\napp:x:1001:\nnogroup:x:65534:\n";

    fn config(runtime: Value) -> Value {
        json!({ "config": runtime })
    }

    /// (step, image config `config` object, expected argv, env, workdir, uid, gid, groups).
    #[test]
    fn commands_resolve_like_docker() {
        type Case =
            (Run, Value, &'static [&'static str], &'static [&'static str], &'static str, u32, u32, &'static [u32]);
        let cases: Vec<Case> = vec![
            // A bare image: sh -c, Docker's PATH, root's HOME, /, root.
            (
                Run::shell("echo hi"),
                json!({}),
                &["/bin/sh", "-c", "echo hi"],
                &["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root"],
                "/",
                0,
                0,
                &[],
            ),
            // The config's Shell, Env, WorkingDir and User; the step's env overrides by name.
            (
                Run::shell("make").env("MODE", "debug").env("EXTRA", "a=b"),
                json!({
                    "Shell": ["/bin/bash", "-eu", "-c"],
                    "Env": ["PATH=/opt/bin:/bin", "MODE=release"],
                    "WorkingDir": "/src",
                    "User": "app",
                }),
                &["/bin/bash", "-eu", "-c", "make"],
                &["PATH=/opt/bin:/bin", "MODE=debug", "EXTRA=a=b", "HOME=/home/app"],
                "/src",
                1000,
                1001,
                &[50],
            ),
            // The step's workdir is relative to the config's; its user wins; uid:group names.
            (
                Run::argv(["ls", "-l"]).workdir("sub/./dir/").user("1000:staff"),
                json!({ "WorkingDir": "/src", "User": "nobody" }),
                &["ls", "-l"],
                &["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/home/app"],
                "/src/sub/dir",
                1000,
                50,
                &[],
            ),
            // A numeric uid passwd does not know: gid 0, HOME /.
            (
                Run::shell("id").user("4242").workdir("/abs"),
                json!({ "WorkingDir": "/ignored" }),
                &["/bin/sh", "-c", "id"],
                &["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/"],
                "/abs",
                4242,
                0,
                &[],
            ),
            // A numeric gid; HOME from the config's env is kept.
            (
                Run::shell("id").user("4242:7").env("HOME", "/work"),
                json!({}),
                &["/bin/sh", "-c", "id"],
                &["HOME=/work", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                "/",
                4242,
                7,
                &[],
            ),
        ];
        for (run, runtime, argv, env, workdir, uid, gid, groups) in cases {
            let spec = resolve(&run, &config(runtime), Some(PASSWD), Some(GROUP)).unwrap();
            assert_eq!(spec.argv, argv, "{run:?}");
            assert_eq!(spec.env, env, "{run:?}");
            assert_eq!(spec.workdir, workdir, "{run:?}");
            assert_eq!((spec.uid, spec.gid), (uid, gid), "{run:?}");
            assert_eq!(spec.groups, groups, "{run:?}");
        }
    }

    #[test]
    fn programs_are_looked_up_in_the_commands_path() {
        let spec = resolve(&Run::argv(["make", "all"]).env("PATH", "/opt/bin::/bin/"), &json!({}), None, None).unwrap();
        assert_eq!(spec.exec_candidates, ["/opt/bin/make", "./make", "/bin/make"]);
        let spec = resolve(&Run::argv(["./configure"]), &json!({}), None, None).unwrap();
        assert_eq!(spec.exec_candidates, ["./configure"]);
        let spec = resolve(&Run::shell("true"), &json!({}), None, None).unwrap();
        assert_eq!(spec.exec_candidates, ["/bin/sh"]);
    }

    #[test]
    fn bad_commands_and_users_are_refused_with_what_is_wrong() {
        let cases: Vec<(Run, &str)> = vec![
            (Run::argv(Vec::<String>::new()), "the command is an empty argv"),
            (Run::argv(["a\0b"]), "contains a NUL byte"),
            (Run::shell("x").env("A=B", "c"), "environment variable name \"A=B\""),
            (Run::shell("x").user("ghost"), "user \"ghost\" is not in the image's /etc/passwd"),
            (Run::shell("x").user("app:ghosts"), "group \"ghosts\" is not in the image's /etc/group"),
            (Run::shell("x").user(":1"), "user \":1\" is empty or malformed"),
            (Run::shell("x").user("1:"), "user \"1:\" is empty or malformed"),
            (Run::shell("x").workdir("/a/../b"), "working directory \"/a/../b\""),
        ];
        for (run, expected) in cases {
            let error = resolve(&run, &json!({}), Some(PASSWD), Some(GROUP)).unwrap_err().to_string();
            assert!(error.contains(expected), "{run:?}: {error:?} does not contain {expected:?}");
        }
    }
}
