//! Configuration tests of the `[callers]` section: modes, issuers, audiences, allow-lists.

use super::*;

/// `FULL` with a `[callers]` section; `lists` goes into every connection.
fn with_callers(callers: &str, lists: &str) -> String {
    let text = FULL.replace(
        "[connections.Contoso]",
        &format!("[callers]\n{callers}\n[connections.Contoso]"),
    );
    text.replace(
        "client_secret = { app_setting = \"LOCAL_SECRET\" }",
        &format!("client_secret = {{ app_setting = \"LOCAL_SECRET\" }}\n{lists}"),
    )
    .replace(
        "extra_params = { tenant = \"x\" }",
        &format!("extra_params = {{ tenant = \"x\" }}\n{lists}"),
    )
}

const JWT: &str = r#"mode = "jwt"
        issuer = "https://login.microsoftonline.com/t/v2.0"
        audience = "api://token-broker""#;

#[test]
fn identified_callers_need_every_connection_to_say_who_may_use_it() {
    let error = parse_with(&with_callers(JWT, ""), &full_env())
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("connections.Contoso.allowed_callers: required in [callers] mode"),
        "{error}"
    );
    assert!(
        error.contains("connections.local.allowed_callers"),
        "{error}"
    );
    for lists in [
        r#"allowed_callers = ["*"]"#,
        r#"allowed_roles = ["Tokens.Contoso"]"#,
    ] {
        parse_with(&with_callers(JWT, lists), &full_env()).expect(lists);
    }
    // Lists without a caller mode restrict nobody, and say so.
    let error = parse_with(&with_callers("", r#"allowed_callers = ["*"]"#), &full_env())
        .unwrap_err()
        .to_string();
    assert!(error.contains("need [callers] mode"), "{error}");
}

#[test]
fn easy_auth_needs_app_service_authentication_on() {
    let text = with_callers(r#"mode = "easy_auth""#, r#"allowed_callers = ["*"]"#);
    let error = parse_with(&text, &full_env()).unwrap_err().to_string();
    assert!(error.contains("WEBSITE_AUTH_ENABLED"), "{error}");
    for off in ["false", "", "1"] {
        let mut pairs = full_env();
        pairs.push(("WEBSITE_AUTH_ENABLED", off));
        let error = parse_with(&text, &pairs).unwrap_err().to_string();
        assert!(error.contains("WEBSITE_AUTH_ENABLED"), "{off}: {error}");
    }
    for on in ["true", "True", "TRUE"] {
        let mut pairs = full_env();
        pairs.push(("WEBSITE_AUTH_ENABLED", on));
        let settings = parse_with(&text, &pairs).expect(on);
        assert!(matches!(settings.callers.mode, CallerMode::EasyAuth));
    }
}

#[test]
fn issuer_and_audience_take_a_string_or_a_list_and_tenant_is_optional() {
    let callers = r#"mode = "jwt"
            issuer = ["https://sts.windows.net/${TENANT}/", "https://login.microsoftonline.com/${TENANT}/v2.0"]
            audience = ["api://token-broker", "6e1f3a2b-0000-4000-8000-00000000b20c"]
            tenant = "${TENANT}""#;
    let mut pairs = full_env();
    pairs.push(("TENANT", "72f988bf-86f1-41af-91ab-2d7cd011db47"));
    let settings =
        parse_with(&with_callers(callers, r#"allowed_callers = ["*"]"#), &pairs).unwrap();
    let CallerMode::Jwt {
        issuers,
        audiences,
        tenant,
        clock_skew,
        ..
    } = settings.callers.mode
    else {
        panic!("jwt mode expected");
    };
    assert_eq!(
        issuers,
        [
            "https://sts.windows.net/72f988bf-86f1-41af-91ab-2d7cd011db47/",
            "https://login.microsoftonline.com/72f988bf-86f1-41af-91ab-2d7cd011db47/v2.0"
        ]
    );
    assert_eq!(audiences.len(), 2);
    assert_eq!(
        tenant.as_deref(),
        Some("72f988bf-86f1-41af-91ab-2d7cd011db47")
    );
    assert_eq!(clock_skew, Duration::from_secs(60));
    let settings = parse_with(
        &with_callers(JWT, r#"allowed_callers = ["*"]"#),
        &full_env(),
    )
    .unwrap();
    assert!(matches!(
        settings.callers.mode,
        CallerMode::Jwt { ref issuers, ref audiences, tenant: None, .. }
            if issuers.len() == 1 && audiences.len() == 1
    ));
    let error = parse_with(
        &with_callers(
            r#"mode = "jwt"
                issuer = []
                audience = "api://token-broker""#,
            r#"allowed_callers = ["*"]"#,
        ),
        &full_env(),
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("needs issuer and audience"), "{error}");
}

#[test]
fn clock_skew_is_bounded_and_jwt_settings_are_refused_in_other_modes() {
    let skewed = format!("{JWT}\nclock_skew_seconds = 301");
    let error = parse_with(
        &with_callers(&skewed, r#"allowed_callers = ["*"]"#),
        &full_env(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("callers.clock_skew_seconds: at most 300"),
        "{error}"
    );
    let at_most = format!("{JWT}\nclock_skew_seconds = 300");
    parse_with(
        &with_callers(&at_most, r#"allowed_callers = ["*"]"#),
        &full_env(),
    )
    .expect("300 is allowed");
    let mut pairs = full_env();
    pairs.push(("WEBSITE_AUTH_ENABLED", "true"));
    let error = parse_with(
        &with_callers(
            "mode = \"easy_auth\"\ntenant = \"t\"",
            r#"allowed_callers = ["*"]"#,
        ),
        &pairs,
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("callers.tenant: only used in mode \"jwt\""),
        "{error}"
    );
}
