//! `layerwright::watch`: one long-lived builder rebuilds when a context file changes, and the
//! rebuild costs only the steps that read it.

use std::ops::ControlFlow;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc;
use std::time::Duration;

use layerwright::cache::MissReason;
use layerwright::watch::{WatchOptions, WatchedBuild, watch};
use layerwright::{Builder, Context, Image};

use crate::support;

/// What the test sees of each delivered build.
struct Delivered {
    rebuilt: Vec<String>,
    miss: Option<MissReason>,
    changed: Vec<String>,
    key_queries: Vec<String>,
}

#[test]
fn a_changed_context_file_rebuilds_only_the_steps_that_read_it() {
    let dir = tempfile::tempdir().unwrap();
    let context_dir = dir.path().join("app");
    support::write(&context_dir.join("src/main.rs"), "fn main() {}\n");
    support::write(&context_dir.join("README"), "read me\n");
    let context = Context::dir(&context_dir).unwrap();
    let image = Image::scratch()
        .write_file("/etc/motd", "hello\n")
        .copy(&context, "src", "/app/src")
        .copy(&context, "README", "/app/README")
        .cmd(["/app/run"]);
    let builder = Builder::new(dir.path().join("cache")).unwrap();

    let (sender, received) = mpsc::channel::<Delivered>();
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let watcher = scope.spawn(|| {
            let mut builds = 0;
            watch(&builder, &[&image], &WatchOptions::default(), &stop, |build: WatchedBuild| {
                builds += 1;
                let built = build.result.expect("the build succeeds");
                let steps = built[0].steps();
                let rebuilt = steps.iter().filter(|step| !step.cached).map(|step| step.label.clone()).collect();
                let miss =
                    steps.iter().find(|step| step.label == "COPY src /app/src").and_then(|step| step.miss.clone());
                let changed = build.changed.iter().map(|path| path.file_name().unwrap().to_string_lossy().into_owned());
                let key_queries = builder.take_key_query_log();
                let delivered = Delivered { rebuilt, miss, changed: changed.collect(), key_queries };
                sender.send(delivered).unwrap();
                if builds == 2 { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
            })
        });
        let first = received.recv_timeout(Duration::from_secs(30)).expect("the first build is delivered");
        assert_eq!(first.rebuilt.len(), 3, "{:?}", first.rebuilt);

        support::write(&context_dir.join("src/main.rs"), "fn main() { println!(\"changed\"); }\n");
        let second = received.recv_timeout(Duration::from_secs(30)).expect("the change starts a rebuild");
        assert_eq!(second.rebuilt, ["COPY src /app/src", "COPY README /app/README"]);
        assert_eq!(
            second.miss,
            Some(MissReason::FilesChanged { changed: vec!["main.rs".into()], added: vec![], removed: vec![] })
        );
        assert!(second.changed.contains(&"main.rs".to_owned()), "{:?}", second.changed);
        // In the same process only the changed file's input re-executes its key queries: the
        // steps below it and the README's file set are memoized.
        assert!(!second.key_queries.is_empty());
        assert!(
            second.key_queries.len() < first.key_queries.len(),
            "{:?} vs {:?}",
            second.key_queries,
            first.key_queries
        );
        watcher.join().unwrap().expect("the loop ends when the delivery breaks");
    });
}
