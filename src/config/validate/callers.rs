//! Checks of the `[callers]` section: the mode, issuers and audiences, and each connection's allow-lists.

use super::*;

impl Validator<'_> {
    pub(super) fn callers(&mut self, raw: Option<RawCallers>) -> CallerSettings {
        let none = CallerSettings {
            mode: CallerMode::None,
        };
        let Some(raw) = raw else {
            return none;
        };
        let mode = raw.mode.as_deref().unwrap_or("none");
        if mode != "jwt" {
            // Settings that only `jwt` reads would be silently ignored: an operator who sets
            // `tenant` believes it is checked.
            for (field, set) in [
                ("issuer", raw.issuer.is_some()),
                ("audience", raw.audience.is_some()),
                ("tenant", raw.tenant.is_some()),
                ("jwks_uri", raw.jwks_uri.is_some()),
                ("clock_skew_seconds", raw.clock_skew_seconds.is_some()),
            ] {
                if set {
                    self.problems
                        .push(format!("callers.{field}: only used in mode \"jwt\""));
                }
            }
        }
        match mode {
            "none" => none,
            "easy_auth" => {
                // Without App Service Authentication the platform does not strip
                // client-supplied X-MS-CLIENT-PRINCIPAL headers: anyone could claim anyone.
                let enabled = self
                    .env
                    .var("WEBSITE_AUTH_ENABLED")
                    .is_some_and(|value| value.trim().eq_ignore_ascii_case("true"));
                if !enabled {
                    self.problems.push(
                        "callers.mode: \"easy_auth\" trusts X-MS-CLIENT-PRINCIPAL, which is safe only with App Service Authentication on, and WEBSITE_AUTH_ENABLED is not \"true\"; turn authentication on or use mode \"jwt\"".to_string(),
                    );
                }
                CallerSettings {
                    mode: CallerMode::EasyAuth,
                }
            }
            "jwt" => {
                let issuers = self.expand_list("callers.issuer", raw.issuer);
                for (index, issuer) in issuers.iter().enumerate() {
                    self.endpoint_url(&format!("callers.issuer[{index}]"), issuer);
                }
                let audiences: Vec<String> = self.expand_list("callers.audience", raw.audience);
                if audiences.iter().any(String::is_empty) {
                    self.problems
                        .push("callers.audience: must not be empty".to_string());
                }
                let tenant = raw
                    .tenant
                    .as_deref()
                    .and_then(|v| self.expand("callers.tenant", v));
                if tenant.as_deref() == Some("") {
                    self.problems
                        .push("callers.tenant: must not be empty".to_string());
                }
                let jwks_uri = raw
                    .jwks_uri
                    .as_deref()
                    .and_then(|v| self.expand("callers.jwks_uri", v))
                    .and_then(|v| self.endpoint_url("callers.jwks_uri", &v));
                let clock_skew_seconds = raw.clock_skew_seconds.unwrap_or(60);
                if clock_skew_seconds > MAX_CLOCK_SKEW_SECONDS {
                    self.problems.push(format!(
                        "callers.clock_skew_seconds: at most {MAX_CLOCK_SKEW_SECONDS} (leeway on exp and nbf)"
                    ));
                }
                if issuers.is_empty() || audiences.is_empty() {
                    self.problems.push(
                        "callers: mode \"jwt\" needs issuer and audience (a string or a list)"
                            .to_string(),
                    );
                    return none;
                }
                CallerSettings {
                    mode: CallerMode::Jwt {
                        issuers,
                        audiences,
                        tenant,
                        jwks_uri,
                        clock_skew: Duration::from_secs(
                            clock_skew_seconds.min(MAX_CLOCK_SKEW_SECONDS),
                        ),
                    },
                }
            }
            _ => {
                self.problems
                    .push("callers.mode: must be \"none\", \"jwt\" or \"easy_auth\"".to_string());
                none
            }
        }
    }

    /// Expands each entry of a string-or-list setting; entries that fail are reported and left out.
    pub(super) fn expand_list(&mut self, field: &str, raw: Option<OneOrMany>) -> Vec<String> {
        let values = raw.map(OneOrMany::into_vec).unwrap_or_default();
        let mut expanded = Vec::new();
        for (index, value) in values.iter().enumerate() {
            if let Some(value) = self.expand(&format!("{field}[{index}]"), value) {
                expanded.push(value);
            }
        }
        expanded
    }

    /// Fails closed: where callers are identified, every connection says who may use it, and
    /// where they are not, no connection pretends to restrict them.
    pub(super) fn caller_lists(
        &mut self,
        callers: &CallerSettings,
        connections: &BTreeMap<ConnectionName, ConnectionSettings>,
    ) {
        let identified = !matches!(callers.mode, CallerMode::None);
        for connection in connections.values() {
            let listed =
                !connection.allowed_callers.is_empty() || !connection.allowed_roles.is_empty();
            if !identified && listed {
                self.problems.push(format!(
                    "connections.{}.allowed_callers/allowed_roles: need [callers] mode \"jwt\" or \"easy_auth\" to know who the caller is",
                    connection.name
                ));
            }
            if identified && !listed {
                self.problems.push(format!(
                    "connections.{}.allowed_callers: required in [callers] mode \"jwt\" or \"easy_auth\" (or allowed_roles); write allowed_callers = [\"*\"] to serve every authenticated caller",
                    connection.name
                ));
            }
        }
    }
}
