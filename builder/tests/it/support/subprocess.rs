//! Subprocess entry points: tests that need a process of their own (to be killed, to race
//! another process, to run in another working directory) re-execute this test binary on one
//! test, the entry point, which does the work in the child.
//!
//! An entry point must not pass on its own, as if it had checked something:
//!
//! - it is `#[ignore = "subprocess entry point of PARENT"]`, so that `cargo test` does not run
//!   it (and lists it as ignored, not as passed);
//! - it reads what to do from environment variables that only its parent test sets, through
//!   `variable`, which fails the test when one is missing (`cargo test -- --ignored` runs it
//!   without them);
//! - the parent names it with `entry_point!(function)`, which refers to the function itself: an
//!   entry point renamed or moved to another module is a compile error, never a filter that
//!   matches no test and so runs nothing;
//! - the parent checks what the child did (its output, a file it wrote), so that a child that
//!   ran no test fails the parent too.
//!
//! This file is also the `support::subprocess` module of `examples/tests/it` (by `#[path]`).

use std::ffi::OsString;
use std::process::Command;

/// A test of this binary that another test runs in a process of its own.
#[derive(Debug, Clone)]
pub struct EntryPoint {
    /// libtest's name of the test: its module path below the crate root, then its own name.
    name: String,
}

/// The `EntryPoint` of `function`, an ignored `#[test]` fn in scope in the calling module.
macro_rules! entry_point {
    ($function:ident) => {{
        // The function itself, not only its name: a renamed entry point does not compile.
        let _: fn() = $function;
        $crate::support::subprocess::EntryPoint::new(module_path!(), stringify!($function))
    }};
}
pub(crate) use entry_point;

impl EntryPoint {
    /// The entry point `function` of module `module_path` (as `module_path!()` gives it, which
    /// starts with the crate's name: libtest's test names do not).
    pub fn new(module_path: &str, function: &str) -> EntryPoint {
        let name = match module_path.split_once("::") {
            Some((_crate_name, module)) => format!("{module}::{function}"),
            None => function.to_owned(),
        };
        EntryPoint { name }
    }

    /// A command that runs this test, and no other, in a new process of this test binary:
    /// `CURRENT_EXE --ignored --exact NAME --nocapture` (what it prints reaches the child's
    /// stdout). The caller sets the environment variables the entry point reads.
    pub fn command(&self) -> Command {
        let mut command = Command::new(std::env::current_exe().expect("the path of the running test binary"));
        command.args(["--ignored", "--exact", &self.name, "--nocapture", "--test-threads=1"]);
        command
    }
}

/// In an entry point: the environment variable its parent test set. Missing, the test fails:
/// run other than by `parent` (the parent test's name), an entry point has nothing to do and
/// must not pass.
pub fn variable(name: &str, parent: &str) -> OsString {
    std::env::var_os(name).unwrap_or_else(|| {
        panic!(
            "{name} is not set: this test is a subprocess entry point of `{parent}`, which sets it; run on its \
             own, it has nothing to check"
        )
    })
}
