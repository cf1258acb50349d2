//! Step keys for a plan: the tracked salsa query of every node, level by level in parallel, and
//! the local action records those keys name.
//!
//! What it deliberately is not: the key's definition (that is `layerwright_cache::key`).

use layerwright_cache::{ActionRecord, StepKey, Store};
use rayon::prelude::*;

use super::error::StepFailure;
use super::plan::PlannedNode;
use crate::remote_cache::NodeShape;

/// The key of every planned node, one depth level at a time (in parallel within a level).
///
/// A step's key query asks for its parent's key, so a query started at the top of a deep chain
/// recurses down the whole chain inside salsa, whose frames are large: a chain of 200 steps can
/// overflow a worker's stack. Level by level, every query finds the keys of its inputs already
/// memoized and recurses one level at most.
pub(super) fn key_by_depth(
    plan: &[PlannedNode],
    queries: &layerwright_cache::KeyQueries,
    workers: &rayon::ThreadPool,
) -> Vec<StepKey> {
    let mut depths = vec![0usize; plan.len()];
    let mut levels: Vec<Vec<usize>> = Vec::new();
    for (index, node) in plan.iter().enumerate() {
        // Inputs come before the nodes that use them in the plan.
        let depth = node.inputs.iter().map(|input| depths[*input] + 1).max().unwrap_or(0);
        depths[index] = depth;
        if levels.len() <= depth {
            levels.resize_with(depth + 1, Vec::new);
        }
        levels[depth].push(index);
    }
    let mut keys: Vec<Option<StepKey>> = vec![None; plan.len()];
    for level in levels {
        let level_queries = queries.clone();
        let level_keys: Vec<(usize, StepKey)> = workers.install(|| {
            level
                .par_iter()
                .map_with(level_queries, |queries, &index| (index, queries.key(plan[index].input)))
                .collect()
        });
        for (index, key) in level_keys {
            keys[index] = Some(key);
        }
    }
    keys.into_iter().map(|key| key.expect("every node is on a level")).collect()
}

/// The local store's record of every recorded node (scratch and config changes have none),
/// read in parallel as the walk used to read them (one small file each).
pub(super) fn read_local_records(
    store: &Store,
    plan: &[PlannedNode],
    keys: &[StepKey],
    shapes: &[NodeShape],
) -> Result<Vec<Option<ActionRecord>>, StepFailure> {
    // Leased before they are looked up, so that a prune running beside the build keeps them
    // (and what they name) until the builder and its images are gone.
    let recorded = keys.iter().zip(shapes).filter(|(_, shape)| shape.recorded).map(|(key, _)| key);
    if let Err(error) = store.protect_keys(recorded) {
        let label = plan.last().map(|node| node.label.clone()).unwrap_or_default();
        return Err(StepFailure::new(label, error));
    }
    plan.par_iter()
        .zip(keys)
        .zip(shapes)
        .map(|((node, key), shape)| {
            if !shape.recorded {
                return Ok(None);
            }
            store.read_action(key).map_err(|error| StepFailure::new(node.label.clone(), error))
        })
        .collect()
}
