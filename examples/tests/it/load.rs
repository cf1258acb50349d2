//! `BuiltImage::load`: an image goes into the Docker engine at `DOCKER_HOST` and runs there, and
//! a rebuild after one file changed sends that layer only. Needs a running engine (`cargo xtask
//! test` starts one); without it the test fails saying so, unless `LAYERWRIGHT_SKIP_PRIVILEGED=1`.

use layerwright::{Builder, Image};

use crate::support;

/// The busybox example with one app file on top, which `docker run` prints.
fn app(message: &str) -> Image {
    let busybox = (layerwright_examples::find("busybox").unwrap().declare)(&support::environment()).unwrap();
    busybox.write_file("/app/message", format!("{message}\n")).cmd(["cat", "/app/message"])
}

#[test]
fn a_load_sends_only_the_layers_the_engine_lacks_and_the_image_runs() {
    let Some(docker) = support::docker() else { return };
    let dir = tempfile::tempdir().unwrap();
    let builder = Builder::new(dir.path().join("cache")).unwrap();
    let tag = "layerwright-load-test:dev";
    docker.remove_image(tag);

    let first = builder.build(&app("first")).unwrap();
    let report = first.load(tag).unwrap();
    assert_eq!(report.layers_sent + report.layers_skipped, first.layers().len(), "{report:?}");
    let output = docker.run(tag, &[]);
    assert_eq!(String::from_utf8_lossy(&output.stdout), "first\n", "{output:?}");

    // The same image again: the engine holds every layer.
    let again = first.load(tag).unwrap();
    assert_eq!((again.layers_sent, again.layers_skipped, again.layer_bytes_sent), (0, first.layers().len(), 0));

    let second = builder.build(&app("second")).unwrap();
    let report = second.load(tag).unwrap();
    let changed = second.layers().last().unwrap();
    assert_eq!((report.layers_sent, report.layer_bytes_sent), (1, changed.size), "{report:?}");
    assert!(!report.resent_whole, "{report:?}");
    let output = docker.run(tag, &[]);
    assert_eq!(String::from_utf8_lossy(&output.stdout), "second\n", "{output:?}");
    let inspected = docker.command().args(["image", "inspect", "--format", "{{.Id}}", tag]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&inspected.stdout).trim(), second.config_digest());
    docker.remove_image(tag);
}
