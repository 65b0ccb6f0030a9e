//! csnap snapshot store and metadata server.
