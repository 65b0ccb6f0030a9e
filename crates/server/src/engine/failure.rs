//! The engine's error chain: what the shell reports back when a copy or a commit failed
//! ([`Failure`]), and why the engine stopped serving ([`Fatal`], carried by
//! `Action::Fatal`). Every link keeps its cause as `source`, so the log line and
//! `RunningServer::failed()` can name the device, the offset and the OS error.

use super::meta_store::MetaError;
use std::error::Error;
use std::fmt;
use std::sync::Arc;

/// An error kept whole (message and sources) behind a cheap clone, so events and actions
/// stay `Clone`: the shell's own error when work it carried out for the engine failed
/// ([`Action::Copy`], [`Action::Commit`](super::Action)), or the store's error behind a
/// [`Fatal::Store`].
///
/// [`Action::Copy`]: super::Action::Copy
#[derive(Clone)]
pub struct Failure(Arc<dyn Error + Send + Sync + 'static>);

impl Failure {
    /// Keeps `e` (shared: a failure may be reported more than once).
    pub fn new(e: impl Error + Send + Sync + 'static) -> Failure {
        Failure(Arc::new(e))
    }

    /// The shell's error itself (its own sources follow from it).
    pub fn inner(&self) -> &(dyn Error + Send + Sync + 'static) {
        &*self.0
    }
}

impl fmt::Debug for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// Displays as the shell's error; its source is the shell's error's source (transparent).
impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.0, f)
    }
}

impl Error for Failure {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.0.source()
    }
}

/// Two shell errors are equal when they are the same error (one report cloned), or say
/// the same: enough for comparing events in tests.
impl PartialEq for Failure {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0.to_string() == other.0.to_string()
    }
}

impl Eq for Failure {}

impl From<MetaError> for Failure {
    fn from(e: MetaError) -> Self {
        Failure::new(e)
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::new(e)
    }
}

/// Why the engine stopped serving (`Action::Fatal`): the store failed under it, a commit or
/// a copy the shell ran failed. The server must stop at once; the next server recovers
/// from the journal. The message is the same as the log line's; the cause is the source.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Fatal {
    /// A store operation failed while the engine handled an event (I/O, corruption).
    #[error("snapshot store failed: {0}")]
    Store(#[source] Failure),
    /// The journal commit the engine asked for failed.
    #[error("store commit failed: {0}")]
    Commit(#[source] Failure),
    /// A chunk copy into the store failed (read, write or flush).
    #[error("copy into store chunk {to} failed: {source}")]
    Copy {
        /// The store chunk it copied to.
        to: u64,
        /// Why.
        #[source]
        source: Failure,
    },
}

/// The whole chain of `e` on one line, each cause after a colon, skipping a cause whose
/// text its parent's message already ends with (this crate's errors repeat their cause in
/// their message, as `StoreError::Io` does).
pub fn chain(e: &(dyn Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let text = cause.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fatal_keeps_the_store_error_as_its_source_chain() {
        let io = std::io::Error::other("EIO on /dev/store");
        let meta = MetaError::from(io);
        let fatal = Fatal::Store(Failure::from(meta));
        assert_eq!(
            fatal.to_string(),
            "snapshot store failed: store I/O failed: EIO on /dev/store"
        );
        // The chain goes Fatal -> MetaError -> the io::Error, not lost as text.
        let source = fatal.source().expect("a source");
        assert_eq!(source.to_string(), "store I/O failed: EIO on /dev/store");
        let cause = source.source().expect("the store error's cause");
        assert_eq!(cause.to_string(), "EIO on /dev/store");
        assert_eq!(chain(&fatal), fatal.to_string(), "no cause said twice");
    }

    #[test]
    fn chain_adds_a_cause_the_message_does_not_say() {
        #[derive(Debug, thiserror::Error)]
        #[error("commit failed")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("disk gone"));
        assert_eq!(chain(&e), "commit failed: disk gone");
    }
}
