//! The runner's side of the RUN sandbox. The sandbox itself (namespaces, the overlay mount,
//! pivot_root, exec, and every `unsafe` block) is the `layerwright-sandbox` crate, whose types
//! the runner uses directly; this module only hands it the process [`spec`] resolved.
//!
//! What this module deliberately is not: a syscall, or a wrapper around the crate's types.
//!
//! [`spec`]: super::spec

use layerwright_sandbox::ProcessSpec;

use crate::run::spec;

impl From<spec::ProcessSpec> for ProcessSpec {
    fn from(process: spec::ProcessSpec) -> ProcessSpec {
        // Destructured whole, so that a field added to the spec cannot be left behind here.
        let spec::ProcessSpec { argv, env, workdir, uid, gid, groups, exec_candidates } = process;
        ProcessSpec { argv, env, workdir, uid, gid, groups, exec_candidates }
    }
}
