//! Checks of one `[connections.<name>]` section: its endpoint, timing, and credential (a secret, a key or certificate in Key Vault, or managed identity federation).

use super::*;

impl Validator<'_> {
    pub(super) fn connection(
        &mut self,
        name: &str,
        raw: RawConnection,
    ) -> Option<ConnectionSettings> {
        let at = |field: &str| format!("connections.{name}.{field}");
        let before = self.problems.len();

        let (token_url, issuer) = self.token_endpoint(name, &raw);
        let client_id = self.expand(&at("client_id"), &raw.client_id);
        if client_id.as_deref() == Some("") {
            self.problems
                .push(format!("{}: must not be empty", at("client_id")));
        }
        let auth_method = match raw.auth_method.as_deref() {
            None | Some("client_secret_basic") => Some(AuthMethod::ClientSecretBasic),
            Some("client_secret_post") => Some(AuthMethod::ClientSecretPost),
            Some("private_key_jwt") => Some(AuthMethod::PrivateKeyJwt),
            Some("managed_identity_federation") => Some(AuthMethod::ManagedIdentityFederation),
            Some("tls_client_auth") => Some(AuthMethod::TlsClientAuth),
            Some("self_signed_tls_client_auth") => Some(AuthMethod::SelfSignedTlsClientAuth),
            Some(_) => {
                self.problems.push(format!(
                    "{}: must be \"client_secret_basic\", \"client_secret_post\", \"private_key_jwt\", \"managed_identity_federation\", \"tls_client_auth\" or \"self_signed_tls_client_auth\"",
                    at("auth_method")
                ));
                None
            }
        };
        if let Some(method) = auth_method {
            self.mutual_tls_endpoint(name, method, token_url.as_ref(), issuer.as_ref());
        }
        let credential = auth_method
            .and_then(|method| self.credential_source(name, method, &raw, token_url.as_ref()));
        let mut scopes = Vec::new();
        for (index, scope) in raw.scopes.iter().enumerate() {
            let field = format!("{}[{index}]", at("scopes"));
            if let Some(scope) = self.expand(&field, scope) {
                if let Some(scope) = ScopeToken::parse(&scope) {
                    scopes.push(scope);
                } else {
                    self.problems.push(format!(
                        "{field}: not a valid OAuth scope token (printable ASCII, no spaces, quotes or backslashes)"
                    ));
                }
            }
        }
        let allowed_scopes = match &raw.allowed_scopes {
            None => scopes.clone(),
            Some(allowed) => {
                let mut valid = Vec::new();
                for (index, scope) in allowed.iter().enumerate() {
                    let field = format!("{}[{index}]", at("allowed_scopes"));
                    if let Some(scope) = self.expand(&field, scope) {
                        if let Some(scope) = ScopeToken::parse(&scope) {
                            valid.push(scope);
                        } else {
                            self.problems
                                .push(format!("{field}: not a valid OAuth scope token"));
                        }
                    }
                }
                valid
            }
        };
        let mut allowed_callers = Vec::new();
        for (index, caller) in raw.allowed_callers.iter().enumerate() {
            if let Some(caller) =
                self.expand(&format!("{}[{index}]", at("allowed_callers")), caller)
            {
                allowed_callers.push(caller);
            }
        }
        let mut allowed_roles = Vec::new();
        for (index, role) in raw.allowed_roles.iter().enumerate() {
            if let Some(role) = self.expand(&format!("{}[{index}]", at("allowed_roles")), role) {
                allowed_roles.push(role);
            }
        }
        let audience = raw.audience.and_then(|v| self.expand(&at("audience"), &v));
        let resource = raw.resource.and_then(|v| self.expand(&at("resource"), &v));
        let allowed_audiences = self.targets(
            &at("allowed_audiences"),
            raw.allowed_audiences,
            &audience,
            "audience",
        );
        let allowed_resources = self.targets(
            &at("allowed_resources"),
            raw.allowed_resources,
            &resource,
            "resource",
        );
        let min_invalidation_interval = self.seconds(
            &at("min_invalidation_interval_seconds"),
            raw.min_invalidation_interval_seconds.unwrap_or(30),
            1..=3600,
        );
        let mut extra_params = BTreeMap::new();
        for (key, value) in &raw.extra_params {
            let field = format!("{}.{key}", at("extra_params"));
            if RESERVED_PARAMS.contains(&key.as_str()) {
                self.problems.push(format!(
                    "{field}: the broker sets this form field itself; use the dedicated setting"
                ));
                continue;
            }
            if let Some(value) = self.expand(&field, value) {
                extra_params.insert(key.clone(), value);
            }
        }
        // Every duration is bounded: no configured value can overflow the clock, and none can
        // outlast what the platform allows a request (230 s at the Functions front end).
        let default_lifetime = self.seconds(
            &at("default_lifetime_seconds"),
            raw.default_lifetime_seconds.unwrap_or(300),
            1..=86_400,
        );
        let connect_timeout = self.seconds(
            &at("connect_timeout_seconds"),
            raw.connect_timeout_seconds.unwrap_or(3),
            1..=60,
        );
        let timeout = self.seconds(
            &at("timeout_seconds"),
            raw.timeout_seconds.unwrap_or(10),
            1..=120,
        );
        let deadline = self.seconds(
            &at("deadline_seconds"),
            raw.deadline_seconds.unwrap_or(20),
            1..=230,
        );
        let breaker_open = self.seconds(
            &at("breaker_open_seconds"),
            raw.breaker_open_seconds.unwrap_or(15),
            1..=3600,
        );
        let negative_cache = self.seconds(
            &at("negative_cache_seconds"),
            raw.negative_cache_seconds.unwrap_or(30),
            0..=3600,
        );
        let breaker_failures = raw.breaker_failures.unwrap_or(5);
        if breaker_failures == 0 {
            self.problems
                .push(format!("{}: must be at least 1", at("breaker_failures")));
        }
        if deadline < timeout {
            self.problems.push(format!(
                "{}: must be at least timeout_seconds",
                at("deadline_seconds")
            ));
        }
        // Each attempt sends a newly signed assertion; it must still be valid when the
        // provider reads it, at the end of the attempt's timeout.
        if let Some(CredentialSource::Assertion(assertion)) = &credential
            && assertion.lifetime <= timeout
        {
            self.problems.push(format!(
                "{}: must be longer than timeout_seconds (each attempt sends a newly signed assertion that must outlive it)",
                at("assertion_lifetime_seconds")
            ));
        }

        if self.problems.len() != before {
            return None;
        }
        Some(ConnectionSettings {
            name: name.to_string(),
            token_url: token_url?,
            issuer,
            client_id: client_id?,
            credential: credential?,
            auth_method: auth_method?,
            scopes,
            audience,
            resource,
            allowed_audiences,
            allowed_resources,
            extra_params,
            allowed_callers,
            allowed_roles,
            allowed_scopes,
            default_lifetime,
            connect_timeout,
            timeout,
            max_retries: raw.max_retries.unwrap_or(2),
            deadline,
            negative_cache,
            breaker_failures,
            breaker_open,
            min_invalidation_interval,
        })
    }

    /// Only a user-assigned identity can be a federated credential of an app registration:
    /// without its client id, `managed_identity_federation` cannot work, so it is refused here
    /// (and by `token-broker check`) instead of failing at the first token request.
    pub(super) fn federation_identity(
        &mut self,
        key_vault: Option<&KeyVaultSettings>,
        connections: &BTreeMap<ConnectionName, ConnectionSettings>,
    ) {
        let named = key_vault.is_some_and(|kv| kv.managed_identity_client_id.is_some());
        if named {
            return;
        }
        for connection in connections.values() {
            if matches!(connection.credential, CredentialSource::Federation { .. }) {
                self.problems.push(format!(
                    "connections.{}.auth_method: \"managed_identity_federation\" needs a user-assigned identity (system-assigned identities cannot be federated credentials); set key_vault.managed_identity_client_id",
                    connection.name
                ));
            }
        }
    }

    /// What the connection authenticates with, checked against its `auth_method`: each method
    /// takes its own settings, and a setting another method reads is refused rather than
    /// silently ignored (a `client_secret` left beside an assertion would suggest it is used).
    pub(super) fn credential_source(
        &mut self,
        name: &str,
        method: AuthMethod,
        raw: &RawConnection,
        token_url: Option<&EndpointUrl>,
    ) -> Option<CredentialSource> {
        let at = |field: &str| format!("connections.{name}.{field}");
        let assertion_fields = [
            ("client_assertion_key", raw.client_assertion_key.is_some()),
            ("signing_algorithm", raw.signing_algorithm.is_some()),
            ("assertion_audience", raw.assertion_audience.is_some()),
            (
                "assertion_lifetime_seconds",
                raw.assertion_lifetime_seconds.is_some(),
            ),
            ("assertion_key_id", raw.assertion_key_id.is_some()),
        ];
        let refuse = |problems: &mut Vec<String>, field: &str, used_by: &str| {
            problems.push(format!(
                "{}: only used with auth_method = {used_by}; remove it",
                at(field)
            ));
        };
        if method != AuthMethod::PrivateKeyJwt {
            for (field, set) in assertion_fields {
                if set {
                    refuse(&mut self.problems, field, "\"private_key_jwt\"");
                }
            }
        }
        let mutual_tls = method.is_mutual_tls();
        if !mutual_tls && raw.client_certificate.is_some() {
            refuse(
                &mut self.problems,
                "client_certificate",
                "\"tls_client_auth\" or \"self_signed_tls_client_auth\"",
            );
        }
        if method != AuthMethod::ManagedIdentityFederation && raw.federation_audience.is_some() {
            refuse(
                &mut self.problems,
                "federation_audience",
                "\"managed_identity_federation\"",
            );
        }
        match method {
            AuthMethod::ClientSecretBasic | AuthMethod::ClientSecretPost => self
                .secret_source(name, raw.client_secret.clone())
                .map(CredentialSource::Secret),
            AuthMethod::TlsClientAuth | AuthMethod::SelfSignedTlsClientAuth => {
                if raw.client_secret.is_some() {
                    self.problems.push(format!(
                        "{}: not used with auth_method = \"{}\", which authenticates with the certificate in the TLS handshake (RFC 8705); remove it",
                        at("client_secret"),
                        method.as_str()
                    ));
                }
                self.client_certificate(name, method, raw.client_certificate.as_ref())
            }
            AuthMethod::PrivateKeyJwt | AuthMethod::ManagedIdentityFederation => {
                if raw.client_secret.is_some() {
                    self.problems.push(format!(
                        "{}: not used with auth_method = \"{}\", which sends no secret; remove it (and the secret, once the identity provider no longer needs it)",
                        at("client_secret"),
                        method.as_str()
                    ));
                }
                if method == AuthMethod::PrivateKeyJwt {
                    self.assertion(name, raw, token_url)
                        .map(CredentialSource::Assertion)
                } else {
                    if let Some(url) = token_url
                        && !entra_authority::may_receive_federation_token(url)
                    {
                        self.problems.push(format!(
                            "{}: must be an Entra token endpoint (host {}) or loopback: auth_method = \"managed_identity_federation\" sends the identity's token there, and every app that federates the identity accepts it",
                            at("token_url"),
                            entra_authority::ENTRA_AUTHORITY_HOSTS.join(", ")
                        ));
                    }
                    let audience = match &raw.federation_audience {
                        Some(value) => self.expand(&at("federation_audience"), value)?,
                        None => DEFAULT_FEDERATION_AUDIENCE.to_string(),
                    };
                    if audience.is_empty() {
                        self.problems
                            .push(format!("{}: must not be empty", at("federation_audience")));
                        return None;
                    }
                    Some(CredentialSource::Federation { audience })
                }
            }
        }
    }

    pub(super) fn assertion(
        &mut self,
        name: &str,
        raw: &RawConnection,
        token_url: Option<&EndpointUrl>,
    ) -> Option<AssertionSettings> {
        let at = |field: &str| format!("connections.{name}.{field}");
        let before = self.problems.len();
        let key = self.assertion_key(
            &at("client_assertion_key"),
            raw.client_assertion_key.as_ref(),
        );
        let algorithm = match raw.signing_algorithm.as_deref() {
            None => None,
            Some(value) => match SigningAlgorithm::parse(value) {
                Some(algorithm) => Some(algorithm),
                None => {
                    self.problems.push(format!(
                        "{}: must be one of {}",
                        at("signing_algorithm"),
                        SigningAlgorithm::ALL
                            .map(SigningAlgorithm::as_str)
                            .join(", ")
                    ));
                    None
                }
            },
        };
        if let (Some(AssertionKey::KeyVaultCertificate(_)), Some(algorithm)) = (&key, algorithm)
            && !algorithm.is_rsa()
        {
            self.problems.push(format!(
                "{}: a certificate credential signs with its RSA key: RS256 or PS256 (PS384, PS512, RS384, RS512)",
                at("signing_algorithm")
            ));
        }
        let audience = match &raw.assertion_audience {
            Some(value) => self.expand(&at("assertion_audience"), value),
            None => token_url.map(|url| url.as_str().to_string()),
        };
        if audience.as_deref() == Some("") {
            self.problems
                .push(format!("{}: must not be empty", at("assertion_audience")));
        }
        let lifetime_seconds = raw
            .assertion_lifetime_seconds
            .unwrap_or(DEFAULT_ASSERTION_LIFETIME_SECONDS);
        if !(1..=MAX_ASSERTION_LIFETIME_SECONDS).contains(&lifetime_seconds) {
            self.problems.push(format!(
                "{}: 1 to {MAX_ASSERTION_LIFETIME_SECONDS} (identity providers refuse long-lived assertions)",
                at("assertion_lifetime_seconds")
            ));
        }
        let key_id = match &raw.assertion_key_id {
            Some(value) => self.expand(&at("assertion_key_id"), value),
            None => None,
        };
        if key_id.as_deref() == Some("") {
            self.problems
                .push(format!("{}: must not be empty", at("assertion_key_id")));
        }
        if self.problems.len() != before {
            return None;
        }
        Some(AssertionSettings {
            key: key?,
            algorithm,
            audience: audience?,
            lifetime: Duration::from_secs(lifetime_seconds),
            key_id,
        })
    }

    pub(super) fn assertion_key(
        &mut self,
        field: &str,
        raw: Option<&toml::Value>,
    ) -> Option<AssertionKey> {
        let expected = "must be { key_vault_key = \"<key name>\" } or { key_vault_certificate = \"<certificate name>\" }";
        let Some(raw) = raw else {
            self.problems.push(format!(
                "{field}: required by auth_method = \"private_key_jwt\"; {expected}"
            ));
            return None;
        };
        let (kind, object_name) = self.vault_object_entry(
            field,
            raw,
            &["key_vault_key", "key_vault_certificate"],
            expected,
        )?;
        match kind.as_str() {
            "key_vault_key" => Some(AssertionKey::KeyVaultKey(object_name)),
            "key_vault_certificate" => Some(AssertionKey::KeyVaultCertificate(object_name)),
            _ => {
                self.problems.push(format!("{field}: {expected}"));
                None
            }
        }
    }

    /// `token_url`, or `issuer` for a token endpoint read from the discovery document: exactly
    /// one of them. Without `token_url`, the issuer stands in as the connection's identity.
    fn token_endpoint(
        &mut self,
        name: &str,
        raw: &RawConnection,
    ) -> (Option<EndpointUrl>, Option<EndpointUrl>) {
        let at = |field: &str| format!("connections.{name}.{field}");
        let mut read = |field: &str, value: &Option<String>| {
            let value = value.as_ref()?;
            let url = self.expand(&at(field), value)?;
            self.endpoint_url(&at(field), &url)
        };
        let token_url = read("token_url", &raw.token_url);
        let issuer = read("issuer", &raw.issuer);
        match (&raw.token_url, &raw.issuer) {
            (None, None) => {
                self.problems.push(format!(
                    "{}: required (or issuer, for a mutual-TLS method, to read it from the discovery document)",
                    at("token_url")
                ));
                (None, None)
            }
            (Some(_), Some(_)) => {
                self.problems.push(format!(
                    "{}: set token_url or issuer, not both",
                    at("issuer")
                ));
                (None, None)
            }
            (Some(_), None) => (token_url, None),
            (None, Some(_)) => (issuer.clone(), issuer),
        }
    }

    /// Mutual TLS needs TLS: the token endpoint (or the issuer it is discovered from) must be
    /// https, loopback included. `issuer` is for the mutual-TLS methods only.
    fn mutual_tls_endpoint(
        &mut self,
        name: &str,
        method: AuthMethod,
        token_url: Option<&EndpointUrl>,
        issuer: Option<&EndpointUrl>,
    ) {
        let at = |field: &str| format!("connections.{name}.{field}");
        if !method.is_mutual_tls() {
            if issuer.is_some() {
                self.problems.push(format!(
                    "{}: only used with auth_method = \"tls_client_auth\" or \"self_signed_tls_client_auth\"; set token_url",
                    at("issuer")
                ));
            }
            return;
        }
        let (field, url) = match issuer {
            Some(issuer) => ("issuer", Some(issuer)),
            None => ("token_url", token_url),
        };
        if let Some(url) = url
            && url.url().scheme() != "https"
        {
            self.problems.push(format!(
                "{}: must be https: auth_method = \"{}\" presents the client certificate in the TLS handshake",
                at(field),
                method.as_str()
            ));
        }
    }

    /// A `{ <kind> = "<Key Vault object name>" }` table at `field`, `kind` one of `kinds`: the
    /// kind and the name, expanded and checked.
    fn vault_object_entry(
        &mut self,
        field: &str,
        raw: &toml::Value,
        kinds: &[&str],
        expected: &str,
    ) -> Option<(String, String)> {
        let entry = match raw {
            toml::Value::Table(table) if table.len() == 1 => table.iter().next(),
            _ => None,
        };
        let Some((kind, toml::Value::String(value))) =
            entry.filter(|(kind, _)| kinds.contains(&kind.as_str()))
        else {
            self.problems.push(format!("{field}: {expected}"));
            return None;
        };
        let object_name = self.expand(&format!("{field}.{kind}"), value)?;
        if !is_valid_key_vault_name(&object_name) {
            self.problems.push(format!(
                "{field}.{kind}: a Key Vault object name is 1 to 127 letters, digits and '-'"
            ));
            return None;
        }
        Some((kind.clone(), object_name))
    }

    /// `client_certificate = { key_vault_certificate = "<name>" }`, required by the mutual-TLS
    /// methods.
    fn client_certificate(
        &mut self,
        name: &str,
        method: AuthMethod,
        raw: Option<&toml::Value>,
    ) -> Option<CredentialSource> {
        let field = format!("connections.{name}.client_certificate");
        let expected = "must be { key_vault_certificate = \"<certificate name>\" }";
        let Some(raw) = raw else {
            self.problems.push(format!(
                "{field}: required by auth_method = \"{}\"; {expected}",
                method.as_str()
            ));
            return None;
        };
        let (_, certificate_name) =
            self.vault_object_entry(&field, raw, &["key_vault_certificate"], expected)?;
        Some(CredentialSource::ClientCertificate { certificate_name })
    }

    /// `allowed_audiences` or `allowed_resources` at `field`: absolute URIs (RFC 8707 §2), the
    /// connection's default (`default_field`) among them; when not configured, the default
    /// alone (or nothing), so a request can only name the value the connection sends anyway.
    fn targets(
        &mut self,
        field: &str,
        raw: Option<Vec<String>>,
        default: &Option<String>,
        default_field: &str,
    ) -> Vec<String> {
        let Some(raw) = raw else {
            return default.iter().cloned().collect();
        };
        let mut allowed = Vec::new();
        for (index, value) in raw.iter().enumerate() {
            let at = format!("{field}[{index}]");
            let Some(value) = self.expand(&at, value) else {
                continue;
            };
            // An absolute URI with no fragment (RFC 8707 §2); the parser forgives spaces, the
            // form field must not carry them.
            let uri = url::Url::parse(&value).is_ok_and(|url| url.fragment().is_none());
            if !uri || value.chars().any(|c| c.is_whitespace() || c.is_control()) {
                self.problems.push(format!(
                    "{at}: must be an absolute URI without a fragment (RFC 8707)"
                ));
                continue;
            }
            if !allowed.contains(&value) {
                allowed.push(value);
            }
        }
        if let Some(default) = default
            && !allowed.contains(default)
        {
            self.problems.push(format!(
                "{field}: must contain the connection's {default_field} ('{default}'), which requests that name none are sent"
            ));
        }
        allowed
    }
}
