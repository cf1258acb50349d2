//! No module imports a module that imports it back, in any crate or module folder.
//!
//! For every module folder (a crate root, or a module with child modules), tidy draws a graph of
//! its children: child A depends on sibling B when any code in A's subtree names something in
//! B's subtree. Each path a module names is resolved by name against the module tree:
//! - its start: `crate`, `super` (any number), `self`, or a plain name looked up in the module
//!   (a child module, an item it defines, a name it imports, a name its globs import);
//! - each further segment in the module reached so far, the same way; an item ends the walk
//!   (what follows is a variant, an associated item or a field);
//! - imports are followed where they are declared, so a re-export counts: `crate::BuildError`
//!   through the root's `pub use build::BuildError` lands in `build`.
//!
//! Every module a path passes through by name counts, as well as the one it lands in. A cycle of
//! any length among siblings is a violation, reported with one naming (file, line, path) for
//! each of its edges. Every edge inside a tangle (a strongly connected component) is shown in at
//! least one reported cycle: the shortest cycle through it.
//!
//! Known limits, since this is name resolution without a compiler: macros are not expanded (a
//! path assembled by a macro, or a `macro_rules!` macro used through its textual scope, is not
//! seen; paths written in a macro's tokens are); `cfg`s other than test ones are not evaluated,
//! so every configuration's paths count at once; a plain name that a function-local item or
//! `use` shadows resolves as the module-level name; method calls (`value.method()`) name no
//! path, so only the trait's `use` ties the caller to the trait's module; items of external
//! crates, the prelude and generic parameters resolve to nothing.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;

use super::module_tree::{ModuleId, ModuleTree, ROOT};
use super::{Rule, Violation};

/// Resolution follows imports and globs at most this deep (re-exports of re-exports).
const MAXIMUM_LOOKUP_DEPTH: usize = 16;

/// The module cycles of every tree, one violation per distinct cycle.
pub fn check(trees: &[ModuleTree]) -> Vec<Violation> {
    trees.iter().flat_map(check_tree).collect()
}

fn check_tree(tree: &ModuleTree) -> Vec<Violation> {
    let resolver = Resolver { tree };
    let landings: Vec<Vec<Vec<ModuleId>>> = (0..tree.modules.len())
        .map(|module| {
            let references = &tree.modules[module].references;
            references.iter().map(|reference| resolver.modules_named(module, &reference.segments)).collect()
        })
        .collect();
    let mut violations = Vec::new();
    for folder in 0..tree.modules.len() {
        if tree.modules[folder].test_only || tree.modules[folder].children.is_empty() {
            continue;
        }
        let graph = folder_graph(tree, &landings, folder);
        for cycle in find_cycles(&graph.nodes, &graph.edges.keys().copied().collect()) {
            violations.push(describe_cycle(tree, folder, &graph, &cycle));
        }
    }
    violations
}

/// Where a path ends up: in a module's namespace (the path names the module itself), or on an
/// item defined in a module.
#[derive(Clone, Copy)]
enum Target {
    Module(ModuleId),
    ItemIn(ModuleId),
}

impl Target {
    fn module(self) -> ModuleId {
        match self {
            Target::Module(module) | Target::ItemIn(module) => module,
        }
    }
}

struct Resolver<'a> {
    tree: &'a ModuleTree,
}

impl Resolver<'_> {
    /// The modules a path written in `from` passes through by name and lands in; none when it
    /// does not resolve within the crate.
    fn modules_named(&self, from: ModuleId, segments: &[String]) -> Vec<ModuleId> {
        let mut passed = Vec::new();
        match self.resolve(from, segments, &mut passed, &mut Vec::new()) {
            Some(target) => {
                passed.push(target.module());
                passed
            }
            None => Vec::new(),
        }
    }

    /// Resolves a path written in `from`, recording in `passed` the modules entered by name.
    /// `lookups` holds the lookups under way, so that import and glob loops end.
    fn resolve(
        &self,
        from: ModuleId,
        segments: &[String],
        passed: &mut Vec<ModuleId>,
        lookups: &mut Vec<(ModuleId, String)>,
    ) -> Option<Target> {
        let (first, rest) = segments.split_first()?;
        let mut target = match first.as_str() {
            "crate" => Target::Module(ROOT),
            "self" => Target::Module(from),
            "super" => Target::Module(self.tree.modules[from].parent?),
            name => self.lookup(from, name, passed, lookups)?,
        };
        for segment in rest {
            let Target::Module(current) = target else { break };
            target = match segment.as_str() {
                "super" => Target::Module(self.tree.modules[current].parent?),
                "self" => target,
                name => self.lookup(current, name, passed, lookups).unwrap_or(Target::ItemIn(current)),
            };
        }
        Some(target)
    }

    /// Looks `name` up in `module`: a child module, an item, an import, a glob-imported name.
    fn lookup(
        &self,
        module: ModuleId,
        name: &str,
        passed: &mut Vec<ModuleId>,
        lookups: &mut Vec<(ModuleId, String)>,
    ) -> Option<Target> {
        let lookup = (module, name.to_owned());
        if lookups.contains(&lookup) || lookups.len() >= MAXIMUM_LOOKUP_DEPTH {
            return None;
        }
        lookups.push(lookup);
        let found = self.lookup_in_namespace(module, name, passed, lookups);
        lookups.pop();
        found
    }

    fn lookup_in_namespace(
        &self,
        module: ModuleId,
        name: &str,
        passed: &mut Vec<ModuleId>,
        lookups: &mut Vec<(ModuleId, String)>,
    ) -> Option<Target> {
        let definition = &self.tree.modules[module];
        if let Some(&child) = definition.children.get(name).filter(|&&child| !self.tree.modules[child].test_only) {
            passed.push(child);
            return Some(Target::Module(child));
        }
        if definition.items.contains(name) {
            return Some(Target::ItemIn(module));
        }
        for path in definition.imports.get(name).into_iter().flatten() {
            let mut tentative = Vec::new();
            if let Some(target) = self.resolve(module, path, &mut tentative, lookups) {
                passed.extend(tentative);
                return Some(target);
            }
        }
        for glob in &definition.globs {
            let mut tentative = Vec::new();
            let Some(Target::Module(source)) = self.resolve(module, glob, &mut tentative, lookups) else { continue };
            if let Some(target) = self.lookup(source, name, &mut tentative, lookups) {
                passed.extend(tentative);
                return Some(target);
            }
        }
        None
    }
}

/// The dependency graph among one folder's children.
struct FolderGraph {
    /// The folder's children that exist outside tests, by id.
    nodes: Vec<ModuleId>,
    /// `(from, to)` with every place `from`'s subtree names something in `to`'s.
    edges: BTreeMap<(ModuleId, ModuleId), Vec<Naming>>,
}

/// One place a path names a sibling module.
#[derive(PartialEq, Eq)]
struct Naming {
    file: PathBuf,
    line: usize,
    path: String,
}

fn folder_graph(tree: &ModuleTree, landings: &[Vec<Vec<ModuleId>>], folder: ModuleId) -> FolderGraph {
    let children = tree.modules[folder].children.values().copied();
    let nodes: Vec<ModuleId> = children.filter(|&child| !tree.modules[child].test_only).collect();
    let mut edges: BTreeMap<(ModuleId, ModuleId), Vec<Naming>> = BTreeMap::new();
    for &child in &nodes {
        for module in subtree(tree, child) {
            let references = tree.modules[module].references.iter().zip(&landings[module]);
            for (reference, landed) in references {
                for &target in landed {
                    let Some(sibling) = child_containing(tree, folder, target) else { continue };
                    if sibling == child {
                        continue;
                    }
                    let naming = Naming { file: reference.file.clone(), line: reference.line, path: reference.text() };
                    let namings = edges.entry((child, sibling)).or_default();
                    if !namings.contains(&naming) {
                        namings.push(naming);
                    }
                }
            }
        }
    }
    FolderGraph { nodes, edges }
}

/// A module and its descendants, leaving out test-only ones.
fn subtree(tree: &ModuleTree, top: ModuleId) -> Vec<ModuleId> {
    let mut modules = vec![top];
    let mut index = 0;
    while let Some(&module) = modules.get(index) {
        let children = tree.modules[module].children.values().copied();
        modules.extend(children.filter(|&child| !tree.modules[child].test_only));
        index += 1;
    }
    modules
}

/// The child of `folder` whose subtree holds `module`, if any.
fn child_containing(tree: &ModuleTree, folder: ModuleId, module: ModuleId) -> Option<ModuleId> {
    let mut current = module;
    loop {
        let parent = tree.modules[current].parent?;
        if parent == folder {
            return Some(current);
        }
        current = parent;
    }
}

/// The distinct cycles of a graph that between them use every edge lying on a cycle: for each
/// such edge `a -> b`, `a -> b` then the shortest way back from `b` to `a`. Each cycle is given
/// as its nodes, starting at its smallest, without repeating the start at the end.
fn find_cycles(nodes: &[ModuleId], edges: &BTreeSet<(ModuleId, ModuleId)>) -> Vec<Vec<ModuleId>> {
    let mut cycles = BTreeSet::new();
    for component in strongly_connected_components(nodes, edges).into_iter().filter(|component| component.len() > 1) {
        let component: BTreeSet<ModuleId> = component.into_iter().collect();
        let inner_edges = edges.iter().filter(|(from, to)| component.contains(from) && component.contains(to));
        for &(from, to) in inner_edges {
            if let Some(way_back) = shortest_path(to, from, edges, &component) {
                let mut cycle = vec![from];
                cycle.extend(&way_back[..way_back.len() - 1]);
                cycles.insert(rotated_to_smallest(cycle));
            }
        }
    }
    let mut cycles: Vec<Vec<ModuleId>> = cycles.into_iter().collect();
    cycles.sort_by(|left, right| (left.len(), left).cmp(&(right.len(), right)));
    cycles
}

fn rotated_to_smallest(mut cycle: Vec<ModuleId>) -> Vec<ModuleId> {
    let smallest = (0..cycle.len()).min_by_key(|&index| cycle[index]).unwrap_or(0);
    cycle.rotate_left(smallest);
    cycle
}

/// The nodes from `start` to `end` (both included) along a shortest path within `allowed`.
fn shortest_path(
    start: ModuleId,
    end: ModuleId,
    edges: &BTreeSet<(ModuleId, ModuleId)>,
    allowed: &BTreeSet<ModuleId>,
) -> Option<Vec<ModuleId>> {
    let mut came_from: BTreeMap<ModuleId, ModuleId> = BTreeMap::new();
    let mut queue = VecDeque::from([start]);
    while let Some(node) = queue.pop_front() {
        if node == end {
            let mut path = vec![end];
            while let Some(&previous) = came_from.get(path.last()?) {
                path.push(previous);
            }
            path.reverse();
            return Some(path);
        }
        for &(_, next) in edges.range((node, ModuleId::MIN)..=(node, ModuleId::MAX)) {
            if allowed.contains(&next) && next != start && !came_from.contains_key(&next) {
                came_from.insert(next, node);
                queue.push_back(next);
            }
        }
    }
    None
}

/// Tarjan's algorithm: the strongly connected components, each a set of nodes that all reach
/// one another.
fn strongly_connected_components(nodes: &[ModuleId], edges: &BTreeSet<(ModuleId, ModuleId)>) -> Vec<Vec<ModuleId>> {
    struct Search<'a> {
        edges: &'a BTreeSet<(ModuleId, ModuleId)>,
        next_index: usize,
        index: BTreeMap<ModuleId, usize>,
        lowest_link: BTreeMap<ModuleId, usize>,
        stack: Vec<ModuleId>,
        components: Vec<Vec<ModuleId>>,
    }
    impl Search<'_> {
        fn visit(&mut self, node: ModuleId) {
            self.index.insert(node, self.next_index);
            self.lowest_link.insert(node, self.next_index);
            self.next_index += 1;
            self.stack.push(node);
            let successors: Vec<ModuleId> =
                self.edges.range((node, ModuleId::MIN)..=(node, ModuleId::MAX)).map(|&(_, next)| next).collect();
            for next in successors {
                if !self.index.contains_key(&next) {
                    self.visit(next);
                    let lowest = self.lowest_link[&node].min(self.lowest_link[&next]);
                    self.lowest_link.insert(node, lowest);
                } else if self.stack.contains(&next) {
                    let lowest = self.lowest_link[&node].min(self.index[&next]);
                    self.lowest_link.insert(node, lowest);
                }
            }
            if self.lowest_link[&node] == self.index[&node] {
                let mut component = Vec::new();
                while let Some(member) = self.stack.pop() {
                    component.push(member);
                    if member == node {
                        break;
                    }
                }
                self.components.push(component);
            }
        }
    }
    let mut search = Search {
        edges,
        next_index: 0,
        index: BTreeMap::new(),
        lowest_link: BTreeMap::new(),
        stack: Vec::new(),
        components: Vec::new(),
    };
    for &node in nodes {
        if !search.index.contains_key(&node) {
            search.visit(node);
        }
    }
    search.components
}

/// `builder/src: build -> solver -> build`, then each edge with where it is named.
fn describe_cycle(tree: &ModuleTree, folder: ModuleId, graph: &FolderGraph, cycle: &[ModuleId]) -> Violation {
    let name = |module: ModuleId| tree.modules[module].name.as_str();
    let mut around: Vec<&str> = cycle.iter().map(|&module| name(module)).collect();
    around.push(name(cycle[0]));
    let mut message = format!("{}: {}", folder_label(tree, folder), around.join(" -> "));
    let mut location = None;
    for (index, &from) in cycle.iter().enumerate() {
        let to = cycle[(index + 1) % cycle.len()];
        let namings = &graph.edges[&(from, to)];
        let first = &namings[0];
        location.get_or_insert_with(|| (first.file.clone(), first.line));
        message.push_str(&format!(
            "\n{} -> {}: {}:{} `{}`",
            name(from),
            name(to),
            first.file.display(),
            first.line,
            first.path
        ));
        if namings.len() > 1 {
            message.push_str(&format!(" (and {} more)", namings.len() - 1));
        }
    }
    let (file, line) = location.unwrap_or_default();
    Violation::at(Rule::ModuleCycle, &file, line, message)
}

/// `builder/src` for a crate root, `builder/src/run` for the module `run` in it.
fn folder_label(tree: &ModuleTree, folder: ModuleId) -> String {
    let mut names = Vec::new();
    let mut current = folder;
    while let Some(parent) = tree.modules[current].parent {
        names.push(tree.modules[current].name.as_str());
        current = parent;
    }
    names.push(&tree.label);
    names.reverse();
    names.join("/")
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::Path;

    use super::super::{CrateDirectory, CrateKind, source_violations};
    use super::*;

    /// A crate with a three-module cycle through a re-export and a `super::` path, a cycle
    /// inside a module folder through `crate::` and `super::` paths (beside a `self::` path that
    /// stays inside), a cycle named only inside macro invocations, and paths that must not
    /// count: in comments, strings and test-only code.
    const DEMO_CRATE: &[(&str, &str)] = &[
        ("Cargo.toml", "[package]\nname = \"demo\"\n"),
        (
            "src/lib.rs",
            "//! Demo.\n#![forbid(unsafe_code)]\n#![deny(missing_docs)]\nmod a;\nmod b;\nmod c;\nmod d;\nmod e;\nmod f;\npub use c::Gamma;\n#[cfg(test)]\nmod tests;\n",
        ),
        (
            "src/a.rs",
            "//! A.\nuse crate::{b::{Beta, beta}, e::Epsilon};\n/// Alpha.\npub struct Alpha;\n// crate::d::inner_one::one is only a comment\nfn text() -> &'static str { \"crate::f::F\" }\n",
        ),
        ("src/b.rs", "//! B.\npub struct Beta;\npub fn beta() -> crate::Gamma {\n    crate::Gamma\n}\n"),
        ("src/c.rs", "//! C.\npub struct Gamma;\nfn make() {\n    let _ = super::a::Alpha;\n}\n"),
        ("src/d/mod.rs", "//! D.\nmod inner_one;\nmod inner_two;\n"),
        (
            "src/d/inner_one.rs",
            "//! One.\npub fn one() {\n    self::helper();\n    crate::d::inner_two::two();\n}\nfn helper() {}\n",
        ),
        ("src/d/inner_two.rs", "//! Two.\npub fn two() {\n    super::inner_one::one();\n}\n"),
        (
            "src/e.rs",
            "//! E.\npub struct Epsilon;\npub fn g() -> bool {\n    format!(\"{:?}\", crate::f::F).is_empty()\n}\n#[cfg(test)]\nmod tests {\n    use crate::a::Alpha;\n}\n",
        ),
        ("src/f.rs", "//! F.\npub struct F;\npub fn f() {\n    assert!(crate::e::g());\n}\n"),
        ("src/tests.rs", "use crate::a::Alpha;\n"),
    ];

    fn write_crate(root: &Path, directory: &str, files: &[(&str, &str)]) {
        for (path, text) in files {
            let path = root.join(directory).join(path);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, text).unwrap();
        }
    }

    #[test]
    fn cycles_are_found_through_reexports_relative_paths_and_macros_but_not_tests_or_comments() {
        let workspace = tempfile::tempdir().unwrap();
        write_crate(workspace.path(), "demo", DEMO_CRATE);
        let directories = [CrateDirectory { path: "demo", kind: CrateKind::Tool }];
        let violations = source_violations(workspace.path(), &directories).unwrap();
        let reports: Vec<String> = violations.iter().map(ToString::to_string).collect();
        assert_eq!(
            reports,
            [
                "demo/src/a.rs:2: module cycle: demo/src: a -> b -> c -> a\n    \
                 a -> b: demo/src/a.rs:2 `crate::b::Beta` (and 1 more)\n    \
                 b -> c: demo/src/b.rs:3 `crate::Gamma` (and 1 more)\n    \
                 c -> a: demo/src/c.rs:4 `super::a::Alpha`",
                "demo/src/d/inner_one.rs:4: module cycle: demo/src/d: inner_one -> inner_two -> inner_one\n    \
                 inner_one -> inner_two: demo/src/d/inner_one.rs:4 `crate::d::inner_two::two`\n    \
                 inner_two -> inner_one: demo/src/d/inner_two.rs:3 `super::inner_one::one`",
                "demo/src/e.rs:4: module cycle: demo/src: e -> f -> e\n    \
                 e -> f: demo/src/e.rs:4 `crate::f::F`\n    \
                 f -> e: demo/src/f.rs:4 `crate::e::g`",
            ]
        );
    }

    #[test]
    fn every_edge_of_a_tangle_is_in_a_reported_cycle() {
        // 0 -> 1 -> 2 -> 0 and 1 -> 0; 3 -> 0 is outside every cycle.
        let edges: BTreeSet<(ModuleId, ModuleId)> = [(0, 1), (1, 2), (2, 0), (1, 0), (3, 0)].into();
        assert_eq!(find_cycles(&[0, 1, 2, 3], &edges), [vec![0, 1], vec![0, 1, 2]]);
    }
}
