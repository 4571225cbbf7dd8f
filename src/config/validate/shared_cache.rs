//! Checks of the `[shared_cache]` section: the Redis URL and its TLS, authentication, the encryption key.

use super::*;

impl Validator<'_> {
    /// `[shared_cache]`: messages name the field, never the URL's or a secret's value.
    pub(super) fn shared_cache(&mut self, raw: RawSharedCache) -> Option<SharedCacheSettings> {
        let before = self.problems.len();
        let redis_url = self
            .expand("shared_cache.redis_url", &raw.redis_url)
            .and_then(|url| match Url::parse(&url) {
                // A socket on this machine: nothing crosses a network, like loopback.
                Ok(url) if matches!(url.scheme(), "redis+unix" | "unix") => {
                    let credentials = !url.username().is_empty()
                        || url.password().is_some()
                        || url
                            .query_pairs()
                            .any(|(name, _)| matches!(name.as_ref(), "user" | "pass"));
                    if credentials {
                        self.problems.push(
                            "shared_cache.redis_url: must not hold credentials; use auth, username and password".into(),
                        );
                        return None;
                    }
                    if url.host_str().is_some_and(|host| !host.is_empty())
                        || url.path().len() < 2
                    {
                        self.problems.push(
                            "shared_cache.redis_url: a socket is redis+unix:///path/to/socket (no host)"
                                .into(),
                        );
                        return None;
                    }
                    Some(url)
                }
                Ok(url)
                    if matches!(url.scheme(), "redis" | "rediss")
                        && url.host_str().is_some_and(|host| !host.is_empty()) =>
                {
                    if !url.username().is_empty() || url.password().is_some() {
                        self.problems.push(
                            "shared_cache.redis_url: must not hold credentials; use auth, username and password".into(),
                        );
                        return None;
                    }
                    Some(url)
                }
                Ok(_) => {
                    self.problems.push(
                        "shared_cache.redis_url: must be redis://host:port, rediss://host:port (TLS) or redis+unix:///path/to/socket"
                            .into(),
                    );
                    None
                }
                Err(error) => {
                    self.problems
                        .push(format!("shared_cache.redis_url: not a valid URL ({error})"));
                    None
                }
            });
        let encryption_key =
            self.secret_source_at("shared_cache.encryption_key", raw.encryption_key);
        if let Some(SecretSource::AppSetting { setting, value }) = &encryption_key
            && super::decode_encryption_key(value).is_none()
        {
            self.problems.push(format!(
                "shared_cache.encryption_key.app_setting: app setting {setting} is not base64 of {ENCRYPTION_KEY_BYTES} bytes"
            ));
        }
        let username = raw
            .username
            .as_deref()
            .and_then(|name| self.expand("shared_cache.username", name))
            .filter(|name| !name.is_empty());
        let auth = match raw.auth.as_deref().unwrap_or("none") {
            "none" => {
                for (field, set) in [
                    ("password", raw.password.is_some()),
                    ("username", raw.username.is_some()),
                ] {
                    if set {
                        self.problems.push(format!(
                            "shared_cache.{field}: only used with auth \"password\" or \"entra\""
                        ));
                    }
                }
                Some(RedisAuth::None)
            }
            "password" => self
                .secret_source_at("shared_cache.password", raw.password)
                .map(|password| RedisAuth::Password { username, password }),
            "entra" => {
                if raw.password.is_some() {
                    self.problems.push(
                        "shared_cache.password: not used with auth \"entra\" (the identity's token is the password)".into(),
                    );
                }
                match username {
                    Some(username) => Some(RedisAuth::Entra { username }),
                    None => {
                        self.problems.push(
                            "shared_cache.username: auth \"entra\" needs the identity's object (principal) id".into(),
                        );
                        None
                    }
                }
            }
            _ => {
                self.problems
                    .push("shared_cache.auth: must be \"none\", \"password\" or \"entra\"".into());
                None
            }
        };
        // A password or the identity's Redis token sent over plain `redis://` can be read by
        // anyone on the path. Sealed entries alone can be (they open only with the key), so
        // `auth = "none"` may use plain redis:// to any host; credentials need TLS off loopback.
        if let (Some(url), Some(method @ ("password" | "entra"))) =
            (&redis_url, raw.auth.as_deref())
            && url.scheme() == "redis"
            && !is_loopback(url)
        {
            self.problems.push(format!(
                "shared_cache.redis_url: auth \"{method}\" sends credentials, which need rediss:// (TLS); plain redis:// is accepted only on loopback (localhost, 127.0.0.0/8, ::1)"
            ));
        }
        let key_prefix = match raw.key_prefix {
            None => "token-broker".to_string(),
            Some(prefix) => self
                .expand("shared_cache.key_prefix", &prefix)
                .unwrap_or_default(),
        };
        if key_prefix.is_empty()
            || key_prefix.len() > 64
            || !key_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
        {
            self.problems.push(
                "shared_cache.key_prefix: 1 to 64 letters, digits, '-', '_', '.' or ':'".into(),
            );
        }
        let timeout_ms = raw.timeout_ms.unwrap_or(100);
        if !(1..=10_000).contains(&timeout_ms) {
            self.problems
                .push("shared_cache.timeout_ms: between 1 and 10000".into());
        }
        if self.problems.len() != before {
            return None;
        }
        Some(SharedCacheSettings {
            redis_url: redis_url?,
            encryption_key: encryption_key?,
            auth: auth?,
            key_prefix,
            timeout: Duration::from_millis(timeout_ms),
        })
    }
}
