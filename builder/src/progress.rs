//! Progress of a build as events: a step started or finished, a RUN command printed a line, or
//! something went wrong that does not fail the build (a warning).
//!
//! A library never prints: every event goes to the [`ProgressSink`] the user gave the builder.
//! Without a sink, warnings go to the `log` crate's `warn!` (silent unless the application
//! installs a logger) and the other events are dropped.
//!
//! What it deliberately is not: a display. The command-line front (`cli`) draws these events.

use std::sync::Arc;
use std::time::Duration;

use layerwright_cache::MissReason;

/// One line of progress: a step started or finished, a RUN step's command printed a line, or a
/// warning.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ProgressEvent {
    /// A step began to execute (after its cache lookup missed) or to be looked up.
    Started {
        /// The step's label.
        label: String,
    },
    /// A step is done.
    Finished(StepReport),
    /// A line of a RUN command's output (stdout and stderr interleaved), as it comes.
    Output {
        /// The RUN step's label.
        label: String,
        /// The line, without its newline.
        line: String,
    },
    /// Something the build worked around (a cache that could not be read or written, a registry
    /// that did not answer): the build goes on.
    Warning {
        /// The step the warning is about, when it is about one.
        step: Option<String>,
        /// What happened, in one sentence.
        message: String,
    },
}

/// Receives progress events (the CLI draws them; a library user may log them). Called from the
/// build's worker threads.
pub type ProgressSink = Arc<dyn Fn(&ProgressEvent) + Send + Sync>;

/// Called with a step's label (see `BuilderOptions::before_execute`).
pub type StepHook = Arc<dyn Fn(&str) + Send + Sync>;

/// What happened to one step of a build.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StepReport {
    /// The step's label (`RUN apt-get update`, `COPY src /app`, …).
    pub label: String,
    /// True when the step's result came from the cache (config steps, which build nothing,
    /// count as cached).
    pub cached: bool,
    /// True when the result came from a remote cache (then `cached` is true as well).
    pub remote: bool,
    /// How long the step took, cache lookup included.
    pub duration: Duration,
    /// The digest of the layer the step added, for steps that add one.
    pub layer: Option<String>,
    /// For a step that was built: why the cache could not serve it.
    pub miss: Option<MissReason>,
}

/// Where a build's events go: the user's sink, or nowhere (warnings then go to `log`).
#[derive(Clone, Default)]
pub(crate) struct Progress {
    sink: Option<ProgressSink>,
}

impl Progress {
    pub(crate) fn new(sink: Option<ProgressSink>) -> Progress {
        Progress { sink }
    }

    /// Hands `event` to the sink, if there is one.
    pub(crate) fn emit(&self, event: ProgressEvent) {
        if let Some(sink) = &self.sink {
            sink(&event);
        }
    }

    /// Reports a warning about `step` (or the build as a whole).
    pub(crate) fn warn(&self, step: Option<&str>, message: impl Into<String>) {
        let message = message.into();
        match &self.sink {
            Some(sink) => sink(&ProgressEvent::Warning { step: step.map(str::to_owned), message }),
            None => match step {
                Some(step) => log::warn!("{step}: {message}"),
                None => log::warn!("{message}"),
            },
        }
    }

    /// Whether events reach anyone (so callers can skip preparing them).
    pub(crate) fn is_attached(&self) -> bool {
        self.sink.is_some()
    }
}
