//! What the end-to-end tests share, by concern: the identity provider, launching a broker,
//! one broker with the standard setup, the leak scan, Redis, a fleet of brokers, and an OTLP
//! receiver.

mod app;
mod fleet;
mod idp;
mod launch;
mod leaks;
mod otlp;
mod redis_server;

pub use app::*;
pub use fleet::*;
pub use idp::*;
pub use launch::*;
pub use leaks::*;
pub use otlp::*;
pub use redis_server::*;
