//! Where `${NAME}` references in the configuration are resolved: the process environment (app
//! settings in Azure), or a function in tests.

/// The environment the configuration is resolved against. A trait object rather than
/// `std::env` so that validation can be tested without touching the process environment.
pub trait Environment {
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment (app settings in Azure).
pub struct ProcessEnvironment;

impl Environment for ProcessEnvironment {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl<F: Fn(&str) -> Option<String>> Environment for F {
    fn var(&self, name: &str) -> Option<String> {
        self(name)
    }
}
