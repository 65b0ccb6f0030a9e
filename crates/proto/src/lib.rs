//! csnap wire types and framing. Filled in by the server/client work.
