//! The module trees of the workspace's crates, built from their files: `mod name;` declarations
//! (found at `name.rs`, `name/mod.rs` or a `#[path]`) and inline `mod name { .. }` blocks. Each
//! module records what it defines, what its `use` items import, and every path its own code
//! names (its child modules' code is theirs).
//!
//! Test-only modules (`#[cfg(test)] mod tests;`, inline `#[cfg(test)] mod tests { .. }`) are in
//! the tree, marked, with nothing collected from them: tests may import anything. Test-only items
//! elsewhere (`#[cfg(test)]`, `#[test]`) are left out the same way. Macro invocations are not
//! expanded; their tokens are searched for path-like runs (`a::b::c`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use proc_macro2::{Ident, Spacing, TokenStream, TokenTree};
use syn::visit::{self, Visit};
use syn::{Attribute, ImplItem, Item, ItemMod, ItemUse, TraitItem, UseTree};

use super::{
    CrateDirectory, Rule, Sources, Violation, impl_item_attributes, is_test_only, item_attributes,
    trait_item_attributes,
};

/// A module's index in its tree's `modules`.
pub type ModuleId = usize;

/// The crate root's id.
pub const ROOT: ModuleId = 0;

/// The modules of one crate (one library or binary target).
pub struct ModuleTree {
    pub crate_directory: CrateDirectory,
    /// How the tree is named in reports: `builder/src`, or the root file when a `src/` holds
    /// more than one crate (`bench/src/main.rs`, `bench/src/bin/x.rs`).
    pub label: String,
    /// The root first, then the modules in declaration order.
    pub modules: Vec<Module>,
    /// Every file of the tree (the root file first), and whether it only exists in test builds.
    pub files: Vec<(PathBuf, bool)>,
}

/// A module: a name in its parent, with everything declared under that name (a module declared
/// twice under different `cfg`s is one module, holding both declarations' contents).
pub struct Module {
    pub name: String,
    pub parent: Option<ModuleId>,
    pub children: BTreeMap<String, ModuleId>,
    /// Whether it only exists in test builds; nothing is collected from such a module.
    pub test_only: bool,
    /// The names of the items it defines (functions, types, traits, constants, macros...).
    pub items: BTreeSet<String>,
    /// What its `use` items bind, by the bound name: the paths as written (several when `cfg`s
    /// bind the name differently).
    pub imports: BTreeMap<String, Vec<Vec<String>>>,
    /// The paths of its glob imports (`use a::b::*`), as written.
    pub globs: Vec<Vec<String>>,
    /// Every path its own code names.
    pub references: Vec<Reference>,
}

/// A path named in a module's code, as written, and where.
pub struct Reference {
    pub segments: Vec<String>,
    pub file: PathBuf,
    pub line: usize,
}

impl Reference {
    pub fn text(&self) -> String {
        self.segments.join("::")
    }
}

/// The module trees of every crate target in `sources`; `mod name;` declarations whose file is
/// missing are added to `violations`.
pub fn build_all(sources: &Sources, violations: &mut Vec<Violation>) -> Vec<ModuleTree> {
    let mut trees = Vec::new();
    for (crate_directory, _) in &sources.crates {
        for (root, label) in crate_roots(sources, crate_directory) {
            trees.push(TreeBuilder::build(sources, *crate_directory, &root, label, violations));
        }
    }
    trees
}

/// The crate roots of a crate's `src/` that parsed: `lib.rs`, `main.rs`, `bin/*.rs` and
/// `bin/*/main.rs`, each with its label.
fn crate_roots(sources: &Sources, crate_directory: &CrateDirectory) -> Vec<(PathBuf, String)> {
    let source_directory = Path::new(crate_directory.path).join("src");
    let library = source_directory.join("lib.rs");
    let main = source_directory.join("main.rs");
    let binaries = source_directory.join("bin");
    let is_binary = |path: &Path| {
        path.parent() == Some(binaries.as_path())
            || (path.parent().and_then(Path::parent) == Some(binaries.as_path()) && path.ends_with("main.rs"))
    };
    let has_both = sources.files.contains_key(&library) && sources.files.contains_key(&main);
    let mut roots = Vec::new();
    for root in [&library, &main] {
        if sources.files.contains_key(root) {
            let label = if has_both { root.display().to_string() } else { source_directory.display().to_string() };
            roots.push((root.clone(), label));
        }
    }
    let binary_roots = sources.files.keys().filter(|path| path.starts_with(&binaries) && is_binary(path));
    roots.extend(binary_roots.map(|path| (path.clone(), path.display().to_string())));
    roots
}

struct TreeBuilder<'a> {
    sources: &'a Sources,
    modules: Vec<Module>,
    files: Vec<(PathBuf, bool)>,
    violations: &'a mut Vec<Violation>,
}

/// Where a module's items being added are written.
struct Placement {
    /// The file they are in.
    file: PathBuf,
    /// Whether they are in an inline `mod name { .. }` block.
    inline: bool,
    /// Where the files of their `mod name;` children are: the directory of a `mod.rs`, `lib.rs`,
    /// `main.rs` or `#[path]` file, `dir/name/` for `dir/name.rs`, and below that for inline
    /// modules.
    child_directory: PathBuf,
    /// Whether they only exist in test builds.
    test_only: bool,
}

impl<'a> TreeBuilder<'a> {
    fn build(
        sources: &'a Sources,
        crate_directory: CrateDirectory,
        root: &Path,
        label: String,
        violations: &'a mut Vec<Violation>,
    ) -> ModuleTree {
        let mut builder = TreeBuilder { sources, modules: Vec::new(), files: Vec::new(), violations };
        let syntax = &sources.files[root].syntax;
        let test_only = is_test_only(&syntax.attrs);
        let root_id = builder.add_module("crate".to_owned(), None, test_only);
        let child_directory = root.parent().unwrap_or(Path::new("")).to_owned();
        let placement = Placement { file: root.to_owned(), inline: false, child_directory, test_only };
        builder.files.push((root.to_owned(), test_only));
        builder.add_items(root_id, &syntax.items, &placement);
        ModuleTree { crate_directory, label, modules: builder.modules, files: builder.files }
    }

    /// Adds a module, or returns the parent's child of that name (declared again under another
    /// `cfg`), which is then test-only only if both declarations are.
    fn add_module(&mut self, name: String, parent: Option<ModuleId>, test_only: bool) -> ModuleId {
        if let Some(&existing) = parent.and_then(|parent| self.modules[parent].children.get(&name)) {
            self.modules[existing].test_only &= test_only;
            return existing;
        }
        let id = self.modules.len();
        if let Some(parent) = parent {
            self.modules[parent].children.insert(name.clone(), id);
        }
        self.modules.push(Module {
            name,
            parent,
            children: BTreeMap::new(),
            test_only,
            items: BTreeSet::new(),
            imports: BTreeMap::new(),
            globs: Vec::new(),
            references: Vec::new(),
        });
        id
    }

    /// Adds a module's items: child modules, definitions, imports and the paths they name.
    fn add_items(&mut self, module: ModuleId, items: &[Item], placement: &Placement) {
        for item in items {
            let test_only = placement.test_only || is_test_only(item_attributes(item));
            if let Item::Mod(declaration) = item {
                self.add_child_module(module, declaration, test_only, placement);
                continue;
            }
            if test_only {
                continue;
            }
            if let Item::Use(item_use) = item {
                self.add_imports(module, item_use);
            } else if let Some(name) = defined_name(item) {
                self.modules[module].items.insert(unraw(name));
            }
            let mut collector = ReferenceCollector { file: placement.file.clone(), references: Vec::new() };
            collector.visit_item(item);
            self.modules[module].references.extend(collector.references);
        }
    }

    fn add_child_module(&mut self, parent: ModuleId, declaration: &ItemMod, test_only: bool, placement: &Placement) {
        let name = unraw(&declaration.ident);
        if let Some((_, items)) = &declaration.content {
            let child = self.add_module(name.clone(), Some(parent), test_only);
            let child_placement = Placement {
                file: placement.file.clone(),
                inline: true,
                child_directory: placement.child_directory.join(&name),
                test_only,
            };
            self.add_items(child, items, &child_placement);
            return;
        }
        let candidates = module_file_candidates(placement, declaration, &name);
        let sources = self.sources;
        let Some(path) = candidates.iter().find(|candidate| sources.files.contains_key(*candidate)) else {
            let is_conditional = declaration.attrs.iter().any(|attribute| attribute.path().is_ident("cfg"));
            if !is_conditional {
                let looked_at = candidates.iter().map(|path| path.display().to_string()).collect::<Vec<_>>();
                self.violations.push(Violation::at(
                    Rule::UnreadableSource,
                    &placement.file,
                    declaration.ident.span().start().line,
                    format!("`mod {name};` has no parsed file: looked for {}", looked_at.join(" and ")),
                ));
            }
            return;
        };
        let syntax = &sources.files[path].syntax;
        let test_only = test_only || is_test_only(&syntax.attrs);
        let child = self.add_module(name, Some(parent), test_only);
        let owns_its_directory = path.ends_with("mod.rs") || has_path_attribute(&declaration.attrs);
        let child_directory = if owns_its_directory {
            path.parent().unwrap_or(Path::new("")).to_owned()
        } else {
            path.with_extension("")
        };
        let child_placement = Placement { file: path.clone(), inline: false, child_directory, test_only };
        self.files.push((path.clone(), test_only));
        self.add_items(child, &syntax.items, &child_placement);
    }

    fn add_imports(&mut self, module: ModuleId, item_use: &ItemUse) {
        if item_use.leading_colon.is_some() {
            return;
        }
        let module = &mut self.modules[module];
        for leaf in use_leaves(&item_use.tree) {
            match leaf.binding {
                UseBinding::Name(name) => module.imports.entry(name).or_default().push(leaf.path),
                UseBinding::Glob => module.globs.push(leaf.path),
                UseBinding::Anonymous => {}
            }
        }
    }
}

/// Where `mod name;` may be: at its `#[path]` (relative to the declaring file's directory, or
/// below an inline module's), else `name.rs` or `name/mod.rs` in the child directory.
fn module_file_candidates(placement: &Placement, declaration: &ItemMod, name: &str) -> Vec<PathBuf> {
    let path_attribute = declaration.attrs.iter().find_map(|attribute| match &attribute.meta {
        syn::Meta::NameValue(pair) if pair.path.is_ident("path") => match &pair.value {
            syn::Expr::Lit(syn::ExprLit { lit: syn::Lit::Str(path), .. }) => Some(path.value()),
            _ => None,
        },
        _ => None,
    });
    if let Some(path) = path_attribute {
        let base = if placement.inline {
            placement.child_directory.clone()
        } else {
            placement.file.parent().unwrap_or(Path::new("")).to_owned()
        };
        return vec![base.join(path)];
    }
    let directory = &placement.child_directory;
    vec![directory.join(format!("{name}.rs")), directory.join(name).join("mod.rs")]
}

fn has_path_attribute(attributes: &[Attribute]) -> bool {
    attributes.iter().any(|attribute| attribute.path().is_ident("path"))
}

/// The name an item defines in its module's namespace (modules and imports aside).
fn defined_name(item: &Item) -> Option<&Ident> {
    match item {
        Item::Const(item) => Some(&item.ident),
        Item::Enum(item) => Some(&item.ident),
        Item::ExternCrate(item) => Some(item.rename.as_ref().map_or(&item.ident, |(_, rename)| rename)),
        Item::Fn(item) => Some(&item.sig.ident),
        Item::Macro(item) => item.ident.as_ref(),
        Item::Static(item) => Some(&item.ident),
        Item::Struct(item) => Some(&item.ident),
        Item::Trait(item) => Some(&item.ident),
        Item::TraitAlias(item) => Some(&item.ident),
        Item::Type(item) => Some(&item.ident),
        Item::Union(item) => Some(&item.ident),
        _ => None,
    }
}

/// One imported path of a `use` tree: `use a::{b::C, d as e, f::*}` has three.
struct UseLeaf {
    /// The full path, without a trailing `self` (`use a::b::{self}` imports `a::b`).
    path: Vec<String>,
    binding: UseBinding,
    line: usize,
}

enum UseBinding {
    /// The name it is bound to in the importing module.
    Name(String),
    /// A glob: `path` is the module or enum whose names are imported.
    Glob,
    /// `use a::Trait as _`: nothing is named.
    Anonymous,
}

fn use_leaves(tree: &UseTree) -> Vec<UseLeaf> {
    let mut leaves = Vec::new();
    collect_use_leaves(tree, &mut Vec::new(), &mut leaves);
    leaves
}

fn collect_use_leaves(tree: &UseTree, prefix: &mut Vec<String>, leaves: &mut Vec<UseLeaf>) {
    match tree {
        UseTree::Path(path) => {
            prefix.push(unraw(&path.ident));
            collect_use_leaves(&path.tree, prefix, leaves);
            prefix.pop();
        }
        UseTree::Name(name) => leaves.push(named_use_leaf(prefix, &name.ident, &name.ident)),
        UseTree::Rename(rename) => leaves.push(named_use_leaf(prefix, &rename.ident, &rename.rename)),
        UseTree::Glob(glob) => {
            let line = glob.star_token.spans[0].start().line;
            leaves.push(UseLeaf { path: prefix.clone(), binding: UseBinding::Glob, line });
        }
        UseTree::Group(group) => {
            for tree in &group.items {
                collect_use_leaves(tree, prefix, leaves);
            }
        }
    }
}

fn named_use_leaf(prefix: &[String], imported: &Ident, bound_as: &Ident) -> UseLeaf {
    let line = imported.span().start().line;
    let mut path = prefix.to_vec();
    let imported = unraw(imported);
    if imported != "self" {
        path.push(imported);
    }
    let bound_as = unraw(bound_as);
    let binding = match bound_as.as_str() {
        "_" => UseBinding::Anonymous,
        "self" => prefix.last().map_or(UseBinding::Anonymous, |name| UseBinding::Name(name.clone())),
        _ => UseBinding::Name(bound_as),
    };
    UseLeaf { path, binding, line }
}

/// An identifier as a name: `r#type` is `type`.
pub fn unraw(ident: &Ident) -> String {
    let name = ident.to_string();
    match name.strip_prefix("r#") {
        Some(name) => name.to_owned(),
        None => name,
    }
}

/// Collects the paths an item's code names: every `use` leaf, every path of two or more segments
/// (a single segment is a local name, or names what a `use` or a definition already accounts
/// for), and path-like token runs inside macro invocations. Nested modules and test-only code
/// are skipped.
struct ReferenceCollector {
    /// The file the visited code is in.
    file: PathBuf,
    references: Vec<Reference>,
}

impl<'ast> Visit<'ast> for ReferenceCollector {
    fn visit_item(&mut self, item: &'ast Item) {
        if !matches!(item, Item::Mod(_)) && !is_test_only(item_attributes(item)) {
            visit::visit_item(self, item);
        }
    }

    fn visit_impl_item(&mut self, item: &'ast ImplItem) {
        if !is_test_only(impl_item_attributes(item)) {
            visit::visit_impl_item(self, item);
        }
    }

    fn visit_trait_item(&mut self, item: &'ast TraitItem) {
        if !is_test_only(trait_item_attributes(item)) {
            visit::visit_trait_item(self, item);
        }
    }

    fn visit_item_use(&mut self, item_use: &'ast ItemUse) {
        if item_use.leading_colon.is_none() {
            let leaves = use_leaves(&item_use.tree);
            let references = leaves.into_iter().map(|leaf| Reference {
                segments: leaf.path,
                file: self.file.clone(),
                line: leaf.line,
            });
            self.references.extend(references);
        }
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        if path.leading_colon.is_none() && path.segments.len() > 1 {
            let segments = path.segments.iter().map(|segment| unraw(&segment.ident)).collect();
            let line = path.segments[0].ident.span().start().line;
            self.references.push(Reference { segments, file: self.file.clone(), line });
        }
        visit::visit_path(self, path);
    }

    fn visit_macro(&mut self, invocation: &'ast syn::Macro) {
        visit::visit_macro(self, invocation);
        for (segments, line) in token_paths(invocation.tokens.clone()) {
            self.references.push(Reference { segments, file: self.file.clone(), line });
        }
    }
}

/// The runs `a::b(::c)*` in a macro's tokens (at any depth), with their lines, except those that
/// follow a `::` (absolute paths, or the tail of something like `Vec::<u8>::new`).
fn token_paths(tokens: TokenStream) -> Vec<(Vec<String>, usize)> {
    let mut paths = Vec::new();
    collect_token_paths(tokens, &mut paths);
    paths
}

fn collect_token_paths(tokens: TokenStream, paths: &mut Vec<(Vec<String>, usize)>) {
    let tokens: Vec<TokenTree> = tokens.into_iter().collect();
    let follows_separator = |index: usize| index >= 2 && is_path_separator(&tokens[index - 2], &tokens[index - 1]);
    let mut index = 0;
    while index < tokens.len() {
        match &tokens[index] {
            TokenTree::Group(group) => collect_token_paths(group.stream(), paths),
            TokenTree::Ident(first) if !follows_separator(index) => {
                let mut segments = vec![unraw(first)];
                while let (Some(colon), Some(second_colon), Some(TokenTree::Ident(segment))) =
                    (tokens.get(index + 1), tokens.get(index + 2), tokens.get(index + 3))
                {
                    if !is_path_separator(colon, second_colon) {
                        break;
                    }
                    segments.push(unraw(segment));
                    index += 3;
                }
                if segments.len() > 1 {
                    paths.push((segments, first.span().start().line));
                }
            }
            _ => {}
        }
        index += 1;
    }
}

fn is_path_separator(first: &TokenTree, second: &TokenTree) -> bool {
    match (first, second) {
        (TokenTree::Punct(first), TokenTree::Punct(second)) => {
            first.as_char() == ':' && first.spacing() == Spacing::Joint && second.as_char() == ':'
        }
        _ => false,
    }
}
