//! `GET|POST /api/token/{connection}`: the scopes asked for, the caller checked, the token
//! from the cache, and the answer counted, audited and written.

use std::borrow::Cow;
use std::sync::Arc;

use tokio::time::Instant;

use axum::body::{Body, Bytes};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, header};
use axum::response::Response;
use secrecy::ExposeSecret;

use super::label::{RequestLabel, invocation_id, truncate};
use super::limits::{HeadFacts, check_limits, read_body};
use crate::app_state::{AppState, Served};
use crate::cache::{CacheKey, CacheOutcome, CachedToken, Target};
use crate::caller_check::{self, CallerHeaders};
use crate::config::ScopeToken;
use crate::error::ApiError;
use crate::observe::Observers;
use crate::observe::stats::{CacheLookup, ConnectionStats};

/// Most scopes one request may name, and the longest `scope` value accepted.
pub(super) const MAX_SCOPES: usize = 32;

pub(super) const MAX_SCOPE_PARAMETER: usize = 2048;

/// `GET|POST /api/token/{connection}`.
pub(super) async fn token_request(
    state: &AppState,
    connection: &str,
    parts: &Parts,
    callers: CallerHeaders<'_>,
    body: Body,
    invocation_id: &str,
) -> Result<Response, ApiError> {
    let (method, uri, headers) = (&parts.method, &parts.uri, &parts.headers);
    let label = RequestLabel {
        invocation_id,
        method: method.as_str(),
        path: truncate(uri.path(), 200),
    };
    let form = if method == Method::POST {
        let bytes = Box::pin(read_body(body, headers)).await?;
        form_body(headers, bytes)?
    } else {
        Vec::new()
    };
    serve_token(state, connection, uri.query(), &form, callers, &label).await
}

/// A POST's body: empty, or an `application/x-www-form-urlencoded` form (RFC 6749 token
/// requests are forms) whose `scope` is honoured like the query's. Any other body is refused
/// rather than silently ignored.
pub(super) fn form_body(headers: &HeaderMap, bytes: Vec<u8>) -> Result<Vec<u8>, ApiError> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|media| {
            media
                .trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    if !is_form {
        return Err(ApiError::InvalidRequest(
            "a POST body must be an application/x-www-form-urlencoded form (or empty)".to_string(),
        ));
    }
    Ok(bytes)
}

/// The connection segment of `/api/token/{connection}`, prefix matched case-insensitively.
pub(super) fn token_route(path: &str) -> Option<&str> {
    const PREFIX: &str = "/api/token/";
    let head = path.get(..PREFIX.len())?;
    // The path as documented is one comparison; only another casing needs the slower one.
    if head != PREFIX && !head.eq_ignore_ascii_case(PREFIX) {
        return None;
    }
    let connection = &path[PREFIX.len()..];
    Some(connection.strip_suffix('/').unwrap_or(connection))
}

pub(super) async fn serve_token(
    state: &AppState,
    name: &str,
    query: Option<&str>,
    form: &[u8],
    callers: CallerHeaders<'_>,
    label: &RequestLabel<'_>,
) -> Result<Response, ApiError> {
    // Who is asking comes first: an unauthenticated caller learns nothing, not even which
    // connections exist.
    let caller = state.callers.authenticate(callers).await?;
    let asked = asked(state, name, query, form, &caller)?;
    let handing_out = asked.handing_out(state, &caller, label);
    // A hit this worker thread handed out lately needs no lock (`TokenCache::serve_hit`).
    let now = tokio::time::Instant::now();
    if let Some(response) = state.cache.serve_hit(&asked.key, now, |token| {
        handing_out.answer(token, CacheOutcome::Hit, now)
    }) {
        return Ok(response);
    }
    // The slow path, boxed: a hit never pays for the size of its state.
    let (token, outcome) = Box::pin(state.cache.get(&asked.key))
        .await
        .map_err(|error| ApiError::from(error.as_ref()))?;
    Ok(handing_out.answer(&token, outcome, tokio::time::Instant::now()))
}

/// The answer to a token request that a cache hit can give at once, before any future is
/// made: `None` whenever anything else may be needed (a body to read, a caller token to
/// validate in mode `jwt`, whose key set may have to be loaded, a fetch, an error to
/// explain), and the request then takes the full path ([`token_request`]), which does every
/// check again. What it hands out is counted and audited exactly as there. The caller skips
/// it at DEBUG, where every request gets the full path's span and "finished" line.
pub(super) fn hit_now(state: &AppState, parts: &Parts) -> Option<Response> {
    if parts.method != Method::GET || !state.callers.answers_at_once() {
        return None;
    }
    let name = token_route(parts.uri.path())?;
    let head = HeadFacts::scan(&parts.headers);
    check_limits(parts, &head).ok()?;
    let caller = state.callers.authenticate_now(head.callers)?.ok()?;
    let asked = asked(state, name, parts.uri.query(), &[], &caller).ok()?;
    let label = RequestLabel {
        invocation_id: invocation_id(head.invocation),
        method: parts.method.as_str(),
        path: truncate(parts.uri.path(), 200),
    };
    let handing_out = asked.handing_out(state, &caller, &label);
    let now = tokio::time::Instant::now();
    state.cache.serve_hit(&asked.key, now, |token| {
        handing_out.answer(token, CacheOutcome::Hit, now)
    })
}

/// What a token request asks for, once checked: the connection, and the cache key of the
/// scopes it names (its default key, borrowed, when it names none: cloning it would touch
/// three reference counts per request).
pub(super) struct Asked<'a> {
    pub served: &'a Served,
    pub key: Cow<'a, CacheKey>,
}

/// The connection called `name`, which `caller` must be allowed to use, and the scopes the
/// query and form ask for, each allowed for it.
pub(super) fn asked<'a>(
    state: &'a AppState,
    name: &str,
    query: Option<&str>,
    form: &[u8],
    caller: &caller_check::Caller,
) -> Result<Asked<'a>, ApiError> {
    // Configured names are valid by construction: anything malformed, a traversal attempt
    // included, is simply not a configured connection.
    let (key_name, served) = state.connection(name).ok_or(ApiError::UnknownConnection)?;
    let connection = &served.settings;
    caller_check::authorize(caller, connection)?;
    let requested = requested(query, form)?;
    // Most requests name nothing: their key is the connection's default, built once.
    if requested == Requested::default() {
        return Ok(Asked {
            served,
            key: Cow::Borrowed(&served.default_key),
        });
    }
    let target = Target {
        audience: chosen(
            "audience",
            requested.audience,
            &connection.audience,
            &connection.allowed_audiences,
            &connection.name,
        )?,
        resource: chosen(
            "resource",
            requested.resource,
            &connection.resource,
            &connection.allowed_resources,
            &connection.name,
        )?,
    };
    let key = match requested.scopes {
        None if target == Target::default() => Cow::Borrowed(&served.default_key),
        scopes => {
            let scopes = scopes.unwrap_or_else(|| connection.scopes.clone());
            if let Some(refused) = scopes
                .iter()
                .find(|s| !connection.allowed_scopes.contains(s))
            {
                return Err(ApiError::InvalidScope(format!(
                    "scope '{refused}' is not allowed for connection '{}'",
                    connection.name
                )));
            }
            Cow::Owned(CacheKey::with_target(key_name, scopes, Some(target)))
        }
    };
    Ok(Asked { served, key })
}

/// The audience or resource (`what`) a request chose, checked against the connection's
/// allowed list: `None` when it chose nothing or the connection's default (which then shares
/// the default's cache entry), `invalid_target` (RFC 8707 §2) when outside the list.
fn chosen(
    what: &str,
    requested: Option<String>,
    default: &Option<String>,
    allowed: &[String],
    connection: &str,
) -> Result<Option<String>, ApiError> {
    match requested {
        None => Ok(None),
        Some(value) if default.as_ref() == Some(&value) => Ok(None),
        Some(value) if allowed.contains(&value) => Ok(Some(value)),
        Some(value) => Err(ApiError::InvalidTarget(format!(
            "{what} '{}' is not allowed for connection '{connection}'",
            truncate(&value, 200)
        ))),
    }
}

impl<'a> Asked<'a> {
    fn handing_out(
        &'a self,
        state: &'a AppState,
        caller: &'a caller_check::Caller,
        label: &'a RequestLabel<'a>,
    ) -> HandingOut<'a> {
        HandingOut {
            observers: &state.observers,
            observed: &self.served.observed,
            connection: &self.served.settings,
            key: &self.key,
            caller,
            label,
        }
    }
}

/// What a token answer is accounted to: the connection, the key, the caller, the request.
pub(super) struct HandingOut<'a> {
    observers: &'a Observers,
    observed: &'a ConnectionStats,
    connection: &'a crate::config::ConnectionSettings,
    key: &'a CacheKey,
    caller: &'a caller_check::Caller,
    label: &'a RequestLabel<'a>,
}

impl HandingOut<'_> {
    /// The answer carrying `token`, counted, audited and observed for `/api/health`.
    fn answer(&self, token: &Arc<CachedToken>, outcome: CacheOutcome, now: Instant) -> Response {
        // In the stats, an answer that waited for a fetch is a miss, whoever started it.
        self.observers.stats.record_cache_outcome(match outcome {
            CacheOutcome::Hit => CacheLookup::Hit,
            CacheOutcome::Stale => CacheLookup::Stale,
            CacheOutcome::Miss | CacheOutcome::Joined => CacheLookup::Miss,
        });
        if let Some(otel) = &self.observers.otel {
            otel.cache_lookup("memory", outcome.as_str());
        }
        self.observed
            .handed_out(token.expires_on, outcome == CacheOutcome::Stale);
        let record = crate::observe::audit::AuditRecord {
            connection: &self.connection.name,
            caller: self.caller.audit_name(),
            scopes: self.key.scopes_display(),
            audience: self.key.audience().or(self.connection.audience.as_deref()),
            resource: self.key.resource().or(self.connection.resource.as_deref()),
            cache: outcome.as_str(),
            expires_on: token.expires_on,
            fingerprint: &token.fingerprint,
            count: 1,
            invocation_id: self.label.invocation_id,
            method: self.label.method,
            path: self.label.path,
        };
        // Hits are counted and written once per interval; a fetch or a stale answer is worth
        // a record of its own, at once.
        if outcome == CacheOutcome::Hit {
            self.observers.hits.record_hit(token, &record);
        } else {
            crate::observe::audit::record(&record);
        }
        let mut response = Response::new(Body::from(answer_body(token, token.expires_in(now))));
        // A copy of headers made once: no name is hashed per request.
        *response.headers_mut() = TOKEN_ANSWER_HEADERS.clone();
        response
    }
}

/// The headers of every token answer: JSON, and never stored by a cache (RFC 6749 §5.1).
pub(super) static TOKEN_ANSWER_HEADERS: std::sync::LazyLock<HeaderMap> =
    std::sync::LazyLock::new(|| {
        HeaderMap::from_iter([
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            (header::PRAGMA, HeaderValue::from_static("no-cache")),
        ])
    });

thread_local! {
    /// The last answer body this worker thread wrote: the token's id, its `expires_in`, and
    /// the bytes. The same token within the same second has the same body, so a hit reuses
    /// it (a reference count on memory only this thread touches) instead of writing a
    /// kilobyte again. It holds the token, like the cache, until the thread answers with
    /// another token.
    static LAST_ANSWER: std::cell::RefCell<Option<(u64, u64, Bytes)>> =
        const { std::cell::RefCell::new(None) };
}

/// The answer's JSON for `token` with `expires_in`: built once per token (prefix and suffix)
/// and once per second per worker thread (the whole), never per request.
pub(super) fn answer_body(token: &CachedToken, expires_in: u64) -> Bytes {
    LAST_ANSWER.with(|last| {
        let mut last = last.borrow_mut();
        if let Some((id, seconds, body)) = last.as_ref()
            && *id == token.id
            && *seconds == expires_in
        {
            return body.clone();
        }
        let (prefix, suffix) = token.answer_parts();
        // The token leaves the broker here, in the response body and nowhere else.
        let prefix = prefix.expose_secret();
        let mut body = Vec::with_capacity(prefix.len() + 20 + suffix.len());
        body.extend_from_slice(prefix);
        body.extend_from_slice(itoa::Buffer::new().format(expires_in).as_bytes());
        body.extend_from_slice(suffix);
        let body = Bytes::from(body);
        *last = Some((token.id, expires_in, body.clone()));
        body
    })
}

/// What a request names besides its connection: scopes, an audience, a resource.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Requested {
    /// `None` when absent or empty: the connection's default scopes.
    pub scopes: Option<Vec<ScopeToken>>,
    pub audience: Option<String>,
    pub resource: Option<String>,
}

/// The `scope`, `audience` and `resource` parameters of the query and of a POST form.
/// Repeated `scope` parameters are joined, as are the comma-joined values the Functions host
/// makes of them; `audience` and `resource` name one value each (a repeat of the same value
/// is that value).
pub(super) fn requested(query: Option<&str>, form: &[u8]) -> Result<Requested, ApiError> {
    // Most requests name nothing: nothing to parse when none of the words is there at all
    // (and no `%`, which could spell one of them).
    if form.is_empty()
        && query.is_none_or(|query| {
            !query.contains("scope")
                && !query.contains("audience")
                && !query.contains("resource")
                && !query.contains('%')
        })
    {
        return Ok(Requested::default());
    }
    let query = query.unwrap_or_default().as_bytes();
    let mut requested = Requested::default();
    let mut scopes = Vec::new();
    let mut length = 0;
    let parameters = url::form_urlencoded::parse(query).chain(url::form_urlencoded::parse(form));
    for (name, value) in parameters {
        let single = match name.as_ref() {
            "scope" => None,
            "audience" => Some(&mut requested.audience),
            "resource" => Some(&mut requested.resource),
            _ => continue,
        };
        length += value.len();
        if length > MAX_SCOPE_PARAMETER {
            return Err(ApiError::InvalidRequest(format!(
                "the scope, audience and resource parameters are longer than {MAX_SCOPE_PARAMETER} bytes together"
            )));
        }
        if let Some(slot) = single {
            if value.is_empty() {
                continue;
            }
            match slot {
                Some(earlier) if *earlier != value => {
                    return Err(ApiError::InvalidTarget(format!(
                        "one {name} per request: two different values were given"
                    )));
                }
                _ => *slot = Some(value.into_owned()),
            }
            continue;
        }
        for scope in value.split([' ', ',']).filter(|s| !s.is_empty()) {
            let scope = ScopeToken::parse(scope).ok_or_else(|| {
                ApiError::InvalidRequest(
                    "the scope parameter holds a character RFC 6749 does not allow in a scope"
                        .to_string(),
                )
            })?;
            scopes.push(scope);
        }
    }
    if scopes.len() > MAX_SCOPES {
        return Err(ApiError::InvalidRequest(format!(
            "at most {MAX_SCOPES} scopes may be requested"
        )));
    }
    requested.scopes = (!scopes.is_empty()).then_some(scopes);
    Ok(requested)
}
